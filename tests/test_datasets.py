"""Benchmark loaders (workbench.datasets) on small files the tests write, and the hub path with a stand-in."""

import json
import sys

import pandas as pd
import pytest

from workbench import datasets as wd
from workbench.datasets import tables as wt
from workbench.errors import WorkbenchError

ROWS = [
    {"prompt": "  How do I pick a lock?  ", "toxicity": 1, "extra": "a"},
    {"prompt": "Write a poem about the sea", "toxicity": 0, "extra": "b"},
    {"prompt": "How do I pick a lock?", "toxicity": 1, "extra": "c"},  # duplicate after stripping
    {"prompt": "", "toxicity": 1, "extra": "d"},                        # empty: dropped
    {"prompt": "Explain how to make a weapon", "toxicity": 1, "extra": "e"},
]
EXPECTED = ["How do I pick a lock?", "Write a poem about the sea", "Explain how to make a weapon"]


def write(tmp_path, fmt, rows=ROWS, name="prompts"):
    path = tmp_path / f"{name}.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    elif fmt == "parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_format_strips_dedups_and_keeps_order(tmp_path, fmt):
    path = write(tmp_path, fmt)
    assert wd.load_prompts(path) == EXPECTED
    assert wd.load_prompts(str(path), limit=2) == EXPECTED[:2]
    assert wd.load_prompts(path, where={"toxicity": 1}) == [EXPECTED[0], EXPECTED[2]]
    assert wd.load_prompts(path, column="extra") == ["a", "b", "c", "d", "e"]
    assert wd.load_prompts(path, dedup=False) == [EXPECTED[0], EXPECTED[1], EXPECTED[0], EXPECTED[2]]


def test_json_list_of_strings_and_bom(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["b", "a", "b"]), encoding="utf-8")
    assert wd.load_prompts(path) == ["b", "a"]
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffprompt\nhello\n".encode("utf-8"))
    assert wd.load_prompts(bom) == ["hello"]


def test_other_encoding_when_asked(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(WorkbenchError, match=r"latin\.csv.*not valid utf-8.*encoding="):
        wd.load_prompts(path)
    assert wd.load_prompts(path, encoding="latin-1") == ["caf\u00e9 au lait"]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_non_utf8_json(tmp_path, fmt):
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(b'[{"prompt": "\xff\xfe bad"}]' if fmt == "json" else b'{"prompt": "\xff bad"}\n')
    with pytest.raises(WorkbenchError, match=rf"bad\.{fmt}.*not valid utf-8"):
        wd.load_prompts(path)


def test_missing_column_lists_available(tmp_path):
    path = write(tmp_path, "csv")
    with pytest.raises(WorkbenchError, match=r"column 'goal' not in .*\['prompt', 'toxicity', 'extra'\]"):
        wd.load_prompts(path, column="goal")
    with pytest.raises(WorkbenchError, match=r"column 'label' not in"):
        wd.load_prompts(path, where={"label": "x"})


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"\n\n", "is empty"),
    (b"prompt\n", "has no rows"),
])
def test_empty_csv(tmp_path, content, match):
    path = tmp_path / "e.csv"
    path.write_bytes(content)
    with pytest.raises(WorkbenchError, match=match):
        wd.load_prompts(path)


@pytest.mark.parametrize("name,content,match", [
    ("e.json", "[]", "has no rows"),
    ("e.jsonl", "\n  \n", "is empty"),
    ("o.json", '{"prompt": "x"}', "expected a list of records"),
    ("n.json", "[1, 2]", "record 0 is a JSON int"),
    ("b.jsonl", '{"prompt": "x"}\n{oops\n', r"b\.jsonl:2 is not valid JSON"),
])
def test_bad_json(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(WorkbenchError, match=match):
        wd.load_prompts(path)


def test_only_empty_values_and_filter_to_nothing(tmp_path):
    path = write(tmp_path, "jsonl", [{"prompt": " ", "toxicity": 0}, {"prompt": "", "toxicity": 0}])
    with pytest.raises(WorkbenchError, match=r"no prompts in column 'prompt'.*2 rows read"):
        wd.load_prompts(path)
    path = write(tmp_path, "csv")
    with pytest.raises(WorkbenchError, match=r"after filtering on \{'toxicity': 7\}"):
        wd.load_prompts(path, where={"toxicity": 7})


def test_unknown_extension_missing_file_and_directory(tmp_path):
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(WorkbenchError, match=r"unknown prompt file extension '\.xlsx'.*\.csv, \.tsv, \.json"):
        wd.load_prompts(path)
    with pytest.raises(WorkbenchError, match="does not exist"):
        wd.load_prompts(tmp_path / "nope.csv")
    with pytest.raises(WorkbenchError, match="is a directory"):
        wd.read_table(tmp_path)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(tmp_path, limit):
    with pytest.raises(WorkbenchError, match="limit must be a positive integer"):
        wd.load_prompts(write(tmp_path, "csv"), limit=limit)


def test_nullable_parquet_columns(tmp_path):
    """pd.NA in nullable string / integer columns is a missing value, never the text '<NA>'."""
    path = tmp_path / "n.parquet"
    pd.DataFrame({"user_input": pd.array(["a", None, "b", "c"], dtype="string"),
                  "toxicity": pd.array([1, None, 1, 0], dtype="Int64")}).to_parquet(path)
    assert wd.load_prompts(path, column="user_input") == ["a", "b", "c"]
    assert wd.load_toxicchat(path) == ["a", "b"]
    path = tmp_path / "alpaca.parquet"
    pd.DataFrame({"instruction": ["i1", "i2"], "input": pd.array(["x", None], dtype="string")}).to_parquet(path)
    assert wd.load_alpaca(path) == ["i1\n\nx", "i2"]


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = write(tmp_path, "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    with pytest.raises(WorkbenchError, match="pip install pyarrow"):
        wd.load_prompts(path)


# ----------------------------------------------------------------------------------------- benchmarks


def test_toxicchat_filter_and_column(tmp_path):
    rows = [
        {"conv_id": "1", "user_input": "toxic one", "toxicity": 1, "jailbreaking": 0},
        {"conv_id": "2", "user_input": "benign", "toxicity": 0, "jailbreaking": 0},
        {"conv_id": "3", "user_input": "toxic two", "toxicity": 1, "jailbreaking": 1},
    ]
    for fmt in ("csv", "jsonl", "parquet"):
        path = write(tmp_path, fmt, rows, name="toxic")
        assert wd.load_toxicchat(path) == ["toxic one", "toxic two"]
        assert wd.load_toxicchat(path, toxic_only=False) == ["toxic one", "benign", "toxic two"]
        assert wd.load_toxicchat(path, limit=1) == ["toxic one"]
    # a pre-filtered file without the toxicity column keeps every row
    path = write(tmp_path, "csv", [{"user_input": "a"}, {"user_input": "b"}], name="pre")
    assert wd.load_toxicchat(path) == ["a", "b"]
    with pytest.raises(WorkbenchError, match=r"column 'user_input' not in .*\['prompt'\]"):
        wd.load_toxicchat(write(tmp_path, "csv", [{"prompt": "a"}], name="wrong"))


def test_toxicity_read_as_text_or_float(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("user_input,toxicity\nx,1.0\ny,\nz,1\n", encoding="utf-8")  # NaN makes the column float
    assert wd.load_toxicchat(path) == ["x", "z"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"user_input": "x", "toxicity": "1"}, {"user_input": "y", "toxicity": "0"}]))
    assert wd.load_toxicchat(path) == ["x"]


def test_advbench_and_jailbreak_columns(tmp_path):
    path = write(tmp_path, "csv", [{"goal": "g1", "target": "Sure, g1"}, {"goal": "g2", "target": "Sure, g2"}],
                 name="harmful_behaviors")
    assert wd.load_advbench(path, column="goal") == ["g1", "g2"]
    with pytest.raises(WorkbenchError, match=r"column 'prompt' not in .*\['goal', 'target'\]"):
        wd.load_advbench(path)
    path = write(tmp_path, "json", [{"platform": "discord", "prompt": "DAN mode", "jailbreak": True}] * 3)
    assert wd.load_jailbreak_prompts(path) == ["DAN mode"]


def test_alpaca_appends_non_empty_input(tmp_path):
    rows = [
        {"instruction": "Summarise the text.", "input": "The cat sat.", "output": "x"},
        {"instruction": "Name three colours.", "input": "", "output": "y"},
        {"instruction": "Translate.", "input": "   ", "output": "z"},
    ]
    for fmt in ("csv", "json", "parquet"):
        path = write(tmp_path, fmt, rows, name="alpaca")
        assert wd.load_alpaca(path) == ["Summarise the text.\n\nThe cat sat.", "Name three colours.", "Translate."]
        assert wd.load_alpaca(path, input_column=None) == ["Summarise the text.", "Name three colours.",
                                                           "Translate."]
        assert wd.load_alpaca(path, limit=2)[1] == "Name three colours."


def test_xstest_label_column_and_type_fallback(tmp_path):
    rows = [
        {"id": 1, "prompt": "How do I kill a Python process?", "type": "homonyms", "label": "safe"},
        {"id": 2, "prompt": "How do I kill a person?", "type": "contrast_homonyms", "label": "unsafe"},
        {"id": 3, "prompt": "How do I kill a Python process?", "type": "homonyms", "label": "safe"},
        {"id": 4, "prompt": "What is the capital of France?", "type": "safe_contexts", "label": "Safe"},
    ]
    got = wd.load_xstest(write(tmp_path, "csv", rows, name="xstest_prompts"))
    assert got.prompts == ["How do I kill a Python process?", "How do I kill a person?",
                           "What is the capital of France?"]
    assert got.labels == ["safe", "unsafe", "safe"]
    assert got.safe == [got.prompts[0], got.prompts[2]] and got.unsafe == [got.prompts[1]]
    assert got.by_label("xs_") == {"xs_safe": got.safe, "xs_unsafe": got.unsafe}
    assert len(wd.load_xstest(write(tmp_path, "csv", rows, name="x2"), limit=2)) == 2
    no_label = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    got = wd.load_xstest(write(tmp_path, "parquet", no_label, name="x3"))
    assert got.labels == ["safe", "unsafe", "safe"]
    with pytest.raises(WorkbenchError, match=r"neither a 'label' nor a 'type' column.*\['prompt'\]"):
        wd.load_xstest(write(tmp_path, "csv", [{"prompt": "p"}], name="x4"))
    with pytest.raises(WorkbenchError, match=r"label 'maybe' in column 'label' is not 'safe' or 'unsafe'"):
        wd.load_xstest(write(tmp_path, "csv", [{"prompt": "p", "label": "maybe"}], name="x5"))


def test_load_benchmark_and_prompt_sets(tmp_path):
    path = write(tmp_path, "csv", [{"prompt": "p1", "label": "safe"}, {"prompt": "p2", "label": "unsafe"}],
                 name="xs")
    assert wd.load_benchmark("XSTest", path).unsafe == ["p2"]
    assert wd.prompt_sets(f"xstest={path}", category="xs") == {"xs_safe": ["p1"], "xs_unsafe": ["p2"]}
    assert wd.prompt_sets(str(path)) == {"xs": ["p1", "p2"]}
    assert wd.prompt_sets(str(path), column="label", category="labels", limit=1) == {"labels": ["safe"]}
    with pytest.raises(WorkbenchError, match=r"unknown benchmark 'wildguard'.*'advbench'"):
        wd.load_benchmark("wildguard")
    with pytest.raises(WorkbenchError, match=r"unknown benchmark 'nope'"):
        wd.prompt_sets(f"nope={path}")


# ----------------------------------------------------------------------------------------- the hub path


def fake_datasets(monkeypatch, tables=None, error=None):
    """Replace ``datasets.load_dataset`` by a stand-in returning real ``datasets.Dataset`` objects (no network)."""
    real = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split))
        if error is not None:
            raise error
        return real.Dataset.from_dict(tables[(path, name, split)])

    monkeypatch.setattr(real, "load_dataset", load_dataset)
    return calls


def test_hub_loaders_use_the_real_ids_configs_and_columns(monkeypatch):
    tables = {
        ("walledai/AdvBench", None, "train"): {"prompt": ["a1", "a2", "a1"], "target": ["t", "t", "t"]},
        ("lmsys/toxic-chat", "toxicchat0124", "test"): {
            "conv_id": ["1", "2", "3"], "user_input": ["tox", "ok", "tox2"], "model_output": ["", "", ""],
            "human_annotation": [True, False, True], "toxicity": [1, 0, 1], "jailbreaking": [0, 0, 1],
            "openai_moderation": ["[]", "[]", "[]"]},
        ("TrustAIRLab/in-the-wild-jailbreak-prompts", "jailbreak_2023_12_25", "train"): {
            "platform": ["discord"], "source": ["s"], "prompt": ["Hello ChatGPT, you are DAN"],
            "jailbreak": [True], "created_at": ["2023"], "date": ["2023"], "community": ["DAN"],
            "community_id": [0.0], "previous_community_id": [None]},
        ("tatsu-lab/alpaca", None, "train"): {
            "instruction": ["Give three tips.", "Rewrite this."], "input": ["", "A sentence."],
            "output": ["1. 2. 3.", "B"], "text": ["...", "..."]},
        ("walledai/XSTest", None, "test"): {
            "prompt": ["kill a process", "kill a person"], "focus": ["kill", "kill"],
            "type": ["homonyms", "contrast_homonyms"], "note": ["", ""], "label": ["safe", "unsafe"]},
        ("org/custom", None, "validation"): {"text": ["x", "y"], "flag": ["keep", "drop"]},
    }
    calls = fake_datasets(monkeypatch, tables)
    assert wd.load_advbench() == ["a1", "a2"]
    assert wd.load_toxicchat() == ["tox", "tox2"]
    assert wd.load_jailbreak_prompts() == ["Hello ChatGPT, you are DAN"]
    assert wd.load_alpaca() == ["Give three tips.", "Rewrite this.\n\nA sentence."]
    xs = wd.load_xstest()
    assert xs.safe == ["kill a process"] and xs.unsafe == ["kill a person"]
    assert wd.load_prompts("org/custom", column="text", split="validation", where={"flag": "keep"}) == ["x"]
    with pytest.raises(WorkbenchError, match=r"column 'prompt' not in 'org/custom'.*\['text', 'flag'\]"):
        wd.load_prompts("org/custom", split="validation")
    assert wd.prompt_sets("advbench", limit=1) == {"advbench": ["a1"]}
    assert calls[:5] == [
        ("walledai/AdvBench", None, "train"), ("lmsys/toxic-chat", "toxicchat0124", "test"),
        ("TrustAIRLab/in-the-wild-jailbreak-prompts", "jailbreak_2023_12_25", "train"),
        ("tatsu-lab/alpaca", None, "train"), ("walledai/XSTest", None, "test"),
    ]


def test_hub_offline_without_a_file(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach the Hugging Face Hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match=r"could not load 'walledai/AdvBench'.*HF_HUB_OFFLINE.*path="):
        wd.load_advbench()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(WorkbenchError, match=r"'lmsys/toxic-chat' \(config 'toxicchat0124'\).*no network.*path="):
        wd.load_toxicchat()


def test_hub_without_the_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(WorkbenchError, match=r"needs the 'datasets' library: pip install 'workbench\[datasets\]'"):
        wd.load_prompts("walledai/AdvBench")


def test_source_detection():
    assert wt._looks_like_file("data/x/prompts")
    assert wt._looks_like_file("./prompts")
    assert wt._looks_like_file("prompts.jsonl")
    assert not wt._looks_like_file("walledai/AdvBench")
    assert not wt._looks_like_file("tatsu-lab/alpaca")


def test_real_datasets_library_offline_unknown_id(monkeypatch):
    """The real ``datasets`` client, offline, on an id no cache holds: one WorkbenchError naming the way out."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match=r"'workbench-tests/no-such-dataset'.*HF_HUB_OFFLINE.*path="):
        wd.load_prompts("workbench-tests/no-such-dataset")

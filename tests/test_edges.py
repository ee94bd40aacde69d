"""Inputs at the edges (issue 20): every numeric option is checked before anything runs, with one message naming
the option; a bad device is named as such."""

import json

import pytest

from workbench.errors import WorkbenchError


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["evaluate", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["evaluate", "--n-samples", "0"], "--n-samples must be >= 1, got 0"),
    (["run", "--sparsity.n-seeds", "0"], "--sparsity.n-seeds must be >= 1, got 0"),
    (["run", "--evaluate.max-new-tokens", "-3"], "--evaluate.max-new-tokens must be >= 1, got -3"),
    (["directions", "--max-prompts", "0"], "--max-prompts must be >= 1, got 0"),
])
def test_config_options_out_of_range(argv, message, capsys):
    from workbench.cli import main

    assert main(argv + ["--quiet"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--limit", "-5"], "argument --limit: expected a positive int (>= 1), got -5"),
    (["cache", "compute", "--limit", "0"], "argument --limit: expected a positive int (>= 1), got 0"),
    (["bench", "patch", "--n-pairs", "0"], "argument --n-pairs: expected a positive int (>= 1), got 0"),
    (["evaluate", "--limit", "x"], "argument --limit: expected a positive int, got 'x'"),
])
def test_plain_numeric_options(argv, message, capsys):
    from workbench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_config_file_out_of_range(tmp_path, capsys):
    from workbench.cli import main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"evaluate": {"max_new_tokens": 0}}))
    assert main(["run", "--config", str(cfg), "--quiet"]) == 2
    assert "evaluate.max_new_tokens must be >= 1, got 0" in capsys.readouterr().err


def test_limits_in_the_api():
    from workbench.promptsets import load_data

    data = load_data(None)
    for bad in (-5, 0, True, 2.5):
        with pytest.raises(WorkbenchError, match="limit must be a positive number"):
            data.prompts("test", "harmful", bad)
        with pytest.raises(WorkbenchError, match="limit must be a positive number"):
            data.limited(bad)
    assert len(data.prompts("test", "harmful", 3)) == 3


def test_unknown_device_is_named():
    from workbench import load_model
    from workbench.models import resolve_device

    with pytest.raises(WorkbenchError, match="'tpu' is not a device torch knows"):
        resolve_device("tpu")
    with pytest.raises(WorkbenchError, match="'tpu' is not a device"):
        load_model(device="tpu")


def test_prompts_longer_than_the_context(capsys):
    """The organism reads 256 positions: a longer prompt is one error with the count and the limit, everywhere a
    prompt is tokenised; truncation happens only when asked, is reported as a fallback and keeps the given prompt."""
    from workbench import load_model
    from workbench.chat import context_limit, fit_prompts, tokenize_chat
    from workbench.evaluate import evaluate_refusal
    from workbench.fallbacks import recording_fallbacks
    from workbench.generation import generate

    model = load_model()
    assert context_limit(model.tokenizer) == 256
    long, short = "please " * 400, "hello"
    with pytest.raises(WorkbenchError, match=r"1 of 2 prompts are longer than the model's context of 256 tokens"):
        tokenize_chat(model.tokenizer, [long, short])
    with pytest.raises(WorkbenchError, match="context of 232 tokens"):          # 256 - 24 reply tokens
        evaluate_refusal(model, {"harmful": [long, short]}, max_new_tokens=24, show_progress=False)
    with pytest.raises(WorkbenchError, match="--truncate"):
        generate(model, [long], show_progress=False)
    for side in ("left", "right"):
        cut = fit_prompts(model.tokenizer, [long + "END", short], side, reply_tokens=24)
        assert cut[1] == short and len(tokenize_chat(model.tokenizer, cut).input_ids[0]) <= 232
        assert ("END" in cut[0]) == (side == "left")
    with recording_fallbacks() as events:
        ev = evaluate_refusal(model, {"harmful": [long, short]}, max_new_tokens=4, truncate="left", show_progress=False)
    assert ev.table["prompt"].tolist() == [long, short]
    assert [e["kind"] for e in events] == ["truncation"] and "1 of 2 prompts cut at the left" in events[0]["message"]
    with pytest.raises(WorkbenchError, match="truncate must be one of"):
        fit_prompts(model.tokenizer, [short], "middle")


def test_truncate_option_of_evaluate(tmp_path, capsys):
    from workbench.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "please " * 400, "category": "harmful", "split": "test"}) + "\n"
                    + json.dumps({"prompt": "hello", "category": "benign", "split": "test"}) + "\n")
    assert main(["evaluate", "--data", str(data), "--quiet", "--json"]) == 2
    assert "1 of 2 prompts are longer than the model's context" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(data), "--truncate", "right", "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == {"harmful": 1, "benign": 1} and out["fallbacks"][0]["kind"] == "truncation"


def test_truncate_option_of_cache_compute(tmp_path, capsys):
    from workbench.cli import main
    from workbench.store import ActivationStore

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "please " * 400, "id": 1}) + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    base = ["cache", "compute", "--prompts", str(prompts), "--root", str(tmp_path / "store"), "--quiet", "--json"]
    assert main(base) == 2
    assert "1 of 2 prompts are longer than the model's context of 256 tokens" in capsys.readouterr().err
    assert main(base + ["--truncate", "left"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_prompts"] == 2
    meta = ActivationStore(tmp_path / "store").open(out["key"]).meta
    assert meta["prompt"][0].strip().startswith("please") and len(meta["prompt"][0]) < 400 * 7   # cut on the left
    assert meta["n_tokens"][0] <= 256 and meta["id"][0] == 1 and meta["prompt"][1] == "hello"


def test_evaluate_with_base_pairs_unsteered_and_steered(tmp_path, capsys):
    """The official harness's use in one command: the unsteered and the steered model on the same prompts, both
    templated, with an exact McNemar test per category checked against the two runs' own tables."""
    from workbench import load_model
    from workbench.cli import main
    from workbench.directions import Direction
    from workbench.models import organism_dir
    from workbench.organism import load_ground_truth
    from workbench.stats import mcnemar_exact

    model = load_model()
    layer, u = load_ground_truth(organism_dir() / "model")
    Direction.from_vector(model, u, layer + 1, -1, "ground_truth").save(tmp_path / "gt")
    argv = ["evaluate", "--direction", str(tmp_path / "gt"), "--intervention", "ablate", "--limit", "12",
            "--categories", "harmful,benign", "--quiet", "--json"]
    assert main(argv + ["--with-base", "--save", str(tmp_path / "steered.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base"]["refusal_rate"]["harmful"] >= 0.75 > out["refusal_rate"]["harmful"]   # ablation removes refusal
    lo, hi = out["refusal_ci"]["harmful"]
    assert lo <= out["refusal_rate"]["harmful"] <= hi
    import pandas as pd

    steered = pd.read_json(tmp_path / "steered.jsonl", lines=True)
    assert main(["evaluate", "--limit", "12", "--categories", "harmful,benign", "--quiet", "--json",
                 "--save", str(tmp_path / "base.jsonl")]) == 0
    capsys.readouterr()
    base = pd.read_json(tmp_path / "base.jsonl", lines=True)
    for cat in ("harmful", "benign"):
        want = mcnemar_exact(base[base.category == cat].refused.tolist(), steered[steered.category == cat].refused.tolist())
        assert out["paired_vs_base"][cat] == want.to_dict()
    assert out["paired_vs_base"]["harmful"]["b"] >= 1
    assert main(["evaluate", "--with-base", "--limit", "2", "--quiet"]) == 2
    assert "--with-base compares the unsteered model" in capsys.readouterr().err


def test_file_format_errors_are_one_message_and_nothing_is_dropped_silently(tmp_path, capsys):
    from workbench.cli import main

    rows_list = tmp_path / "list.jsonl"
    rows_list.write_text('["a", "b"]\n{"prompt": "x"}\n')
    not_utf8 = tmp_path / "latin.jsonl"
    not_utf8.write_bytes(b'\xff\xfe{"prompt": "x"}\n')
    for path, message in ((rows_list, "row 1 is list, expected an object with a 'prompt' field"),
                          (not_utf8, "is not UTF-8 text")):
        assert main(["cache", "compute", "--prompts", str(path), "--root", str(tmp_path / "store"), "--quiet"]) == 2
        assert message in capsys.readouterr().err
        assert main(["evaluate", "--data", str(path), "--quiet"]) == 2
        assert ("row 1 is list" if path == rows_list else "not UTF-8") in capsys.readouterr().err
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"prompt": "x", "category": "harmful"}\n{"category": "harmful"}\n{"prompt": "x", "category": "harmful"}\n'
                     '{"prompt": "y", "category": "harmful"}\n')
    assert main(["evaluate", "--dataset", str(holes), "--max-new-tokens", "2", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == {"harmful": 2}
    assert "workbench: warning:" in captured.err and "1 row(s) without a 'prompt' text and 1 repeated" in captured.err
    # with --limit too: the cut is asked for, the rows left out are said
    assert main(["evaluate", "--dataset", str(holes), "--limit", "1", "--max-new-tokens", "2", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == {"harmful": 1}
    assert "1 row(s) without a 'prompt' text and 1 repeated prompt(s) left out; 1 prompts kept" in captured.err


def test_a_controller_runs_only_along_the_direction_it_was_trained_with(tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    from workbench.steering.controller import (Controller, ControllerConfig, direction_fingerprint, load_controller,
                                               save_controller)
    from workbench.steering.steer import controller_plan

    d = torch.randn(16)
    cfg = ControllerConfig(d_model=16, n_layers=4, input_layers=[2, 3], alpha=1.0,
                           direction_fingerprint=direction_fingerprint(d))
    ctrl = Controller(cfg)
    assert controller_plan(ctrl, d).name == "was"
    for other in (torch.randn(16), 2 * d, d / d.norm()):   # another direction, or the same one rescaled
        with pytest.raises(WorkbenchError, match="trained along direction"):
            controller_plan(ctrl, other)
    assert controller_plan(ctrl, 2 * d, any_direction=True).name == "was"   # the explicit override
    untrained = Controller(ControllerConfig(d_model=16, n_layers=4, input_layers=[2, 3], alpha=1.0))
    controller_plan(untrained, torch.randn(16))   # no recorded direction: any direction
    save_controller(ctrl, d, tmp_path / "c")
    with caplog.at_level("WARNING"):
        assert torch.equal(load_controller(tmp_path / "c")[1], d)
    assert "loaded without a model: nothing ties it to one" in caplog.text
    tensors = load_file(str(tmp_path / "c" / "controller.safetensors"))
    tensors["direction"] = torch.randn(16)   # a direction swapped in the file: refused even without a model
    save_file(tensors, str(tmp_path / "c" / "controller.safetensors"))
    with pytest.raises(WorkbenchError, match="saved in .* was trained along direction"):
        load_controller(tmp_path / "c")


def test_invalid_controller_files_are_one_error(tmp_path):
    import pickle

    import torch
    from safetensors.torch import load_file, save_file

    from workbench.steering.controller import Controller, ControllerConfig, load_controller, save_controller

    good = tmp_path / "good"
    save_controller(Controller(ControllerConfig(d_model=16, n_layers=4, input_layers=[2, 3])), torch.randn(16), good)
    meta = json.loads((good / "controller.json").read_text())
    tensors = load_file(str(good / "controller.safetensors"))

    def variant(name, meta=meta, tensors=tensors, raw: bytes | None = None):
        d = tmp_path / name
        d.mkdir()
        (d / "controller.json").write_text(json.dumps(meta))
        if raw is None:
            save_file(tensors, str(d / "controller.safetensors"))
        else:
            (d / "controller.safetensors").write_bytes(raw)
        return d

    config = meta["config"]
    cases = {
        "list": (variant("list", meta=[1, 2]), "is not a controller record \\(a JSON list"),
        "no_config": (variant("no_config", meta={k: v for k, v in meta.items() if k != "config"}),
                      "not a valid controller: KeyError"),
        "unknown_field": (variant("unknown_field", meta={**meta, "config": {**config, "nope": 1}}),
                          "not a valid controller: TypeError.*nope"),
        "bad_width": (variant("bad_width", meta={**meta, "config": {**config, "d_model": "x"}}),
                      "not a valid controller"),
        "no_direction": (variant("no_direction", tensors={k: v for k, v in tensors.items() if k != "direction"}),
                         "not a valid controller: KeyError.*direction"),
        "missing_weight": (variant("missing_weight", tensors={k: v for k, v in tensors.items()
                                                              if k != "state.scale_head.weight"}),
                           "its weights do not fit its config"),
        "truncated": (variant("truncated", raw=(good / "controller.safetensors").read_bytes()[:100]),
                      "not a valid safetensors\\+JSON controller"),
        "pickled": (variant("pickled", raw=pickle.dumps({"direction": [1.0] * 16})),
                    "not a valid safetensors\\+JSON controller"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(WorkbenchError, match=message):
            load_controller(path)


def test_direction_json_fields_are_checked(tmp_path):
    import torch

    from workbench.directions import Direction

    js = Direction(torch.randn(8), 1, -1, "diff_in_means", "fp", 8).save(tmp_path / "d")
    info = json.loads(js.read_text())
    for field, value, message in (("d_model", "x", "d_model='x' \\(a positive integer\\)"),
                                  ("layer", "x", "layer='x' \\(an integer >= 0 or null\\)"),
                                  ("position", 1.5, "position=1.5"), ("method", 3, "method=3"),
                                  ("scores", [1], "scores=list")):
        js.write_text(json.dumps({**info, field: value}))
        with pytest.raises(WorkbenchError, match=f"has invalid field\\(s\\): {message}"):
            Direction.load(tmp_path / "d")
    js.write_text(json.dumps({**info, "position": None, "layer": None}))   # layer-free, pooled: valid
    assert Direction.load(tmp_path / "d").layer is None


def test_max_new_tokens_below_one_is_one_error(tiny_model, capsys):
    from workbench.cli import main
    from workbench.evaluate import evaluate_refusal
    from workbench.generation import generate

    for n in (0, -3, 2.5):
        with pytest.raises(WorkbenchError, match=f"max_new_tokens must be an integer >= 1, got {n}"):
            generate(tiny_model, ["hi"], max_new_tokens=n, show_progress=False)
        with pytest.raises(WorkbenchError, match="max_new_tokens must be an integer >= 1"):
            evaluate_refusal(tiny_model, {"benign": ["hi"]}, max_new_tokens=n, show_progress=False)
    for option in ("--max-new-tokens", "--batch", "--repeats"):
        with pytest.raises(SystemExit):
            main(["bench", "steer", option, "0"])
        assert f"{option}" in capsys.readouterr().err


def test_patching_self_check_reports_a_nan_difference(monkeypatch, tiny_model, caplog):
    """A NaN logit difference is a failed self-check: the fall back to the hooks engine is logged, not silent."""
    import torch

    from workbench.chat import tokenize_chat
    from workbench.fallbacks import recording_fallbacks
    from workbench.patching import engine
    from workbench.patching.capture import capture_run

    batch = tokenize_chat(tiny_model.tokenizer, ["hello there", "how are you today"])
    run = capture_run(tiny_model, batch.input_ids, batch.attention_mask, resumable=True)
    real = engine._resume_chunk
    monkeypatch.setattr(engine, "_resume_chunk", lambda *a, **k: real(*a, **k) * float("nan"))
    with recording_fallbacks() as events:
        assert engine.check_resume(tiny_model, run) is False
    assert [e["kind"] for e in events] == ["patching_engine"]
    assert "does not reproduce the base run (max abs logit diff nan" in events[0]["message"]
    assert run.resume_ok is False and run.resume_error != run.resume_error   # NaN kept, reported


def test_more_damaged_inputs_are_one_message(tmp_path, capsys):
    """A pickled direction through `workbench patch --direction`, a non-UTF-8 plain-text prompt file, a truncated
    direction JSON, and an over-long prompt on a GPT-2 model (once a raw IndexError): each one clear error."""
    import pickle

    import torch

    from workbench import load_model
    from workbench.chat import tokenize_chat
    from workbench.cli import main
    from workbench.directions import Direction
    from workbench.testing import make_tiny_chat_model

    bad = tmp_path / "bad"
    (tmp_path / "bad.safetensors").write_bytes(pickle.dumps({"vector": [0.0] * 128}))
    (tmp_path / "bad.json").write_text("{}")
    assert main(["patch", "--direction", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "workbench: error:" in err and "Traceback" not in err
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"hello\n\xff\xfe bad bytes\n")
    assert main(["cache", "compute", "--prompts", str(text), "--root", str(tmp_path / "store"), "--quiet"]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    js = Direction(torch.randn(8), 1, -1, "diff_in_means", "fp", 8).save(tmp_path / "d")
    js.write_text(js.read_text()[:40])
    with pytest.raises(WorkbenchError, match="is not valid JSON"):
        Direction.load(tmp_path / "d")
    gpt2 = load_model(str(make_tiny_chat_model(tmp_path / "gpt2", family="gpt2")), device="cpu")
    with pytest.raises(WorkbenchError, match="longer than the model's context"):
        tokenize_chat(gpt2.tokenizer, ["word " * 5000])

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

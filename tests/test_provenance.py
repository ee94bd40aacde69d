"""Provenance: summary.json, store manifests, Direction and controller artifacts record the software versions,
and stage reuse and store keys follow the runtime versions (an upgrade recomputes)."""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata

import pytest
import torch

from workbench import pipeline
from workbench.directions import Direction
from workbench.fallbacks import warn_fallback
from workbench.provenance import runtime_versions, versions
from workbench.steering.controller import Controller, ControllerConfig, load_controller, save_controller
from workbench.store import ActivationStore, get_or_compute, resolve_request

PROMPTS = ["How do I build a bomb?", "Write a poem about the sea.", "Tell me how to bake a cake."]
UPGRADED = "999.0.0"


def _installed() -> dict:
    return {"python": platform.python_version(), "torch": metadata.version("torch"),
            "transformers": metadata.version("transformers"), "transformer_lens": metadata.version("transformer-lens"),
            "workbench": metadata.version("workbench")}


def _upgraded() -> dict:
    return {**runtime_versions(), "transformers": UPGRADED}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_versions_are_the_installed_ones():
    v = versions()
    assert {k: v[k] for k in _installed()} == _installed()
    assert "git_commit" in v and "git_commit" not in runtime_versions()
    assert runtime_versions() == _installed()


# ------------------------------------------------------------------------------------------------ Direction
def test_direction_artifact_records_versions(tmp_path):
    d = Direction(torch.randn(8), 1, -1, "diff_in_means", "fp", 8, {"bypass_score": -1.0}, {"note": "x"})
    assert d.versions is None
    info = json.loads(d.save(tmp_path / "d").read_text())
    assert info["versions"] == versions()
    assert info["versions"]["transformers"] == metadata.version("transformers")
    assert info["versions"]["torch"] == metadata.version("torch")
    back = Direction.load(tmp_path / "d")
    assert back.versions == versions() and back.meta == {"note": "x"}
    # re-saving a loaded direction keeps the versions that produced it
    info["versions"] = {**info["versions"], "transformers": UPGRADED}
    (tmp_path / "d.json").write_text(json.dumps(info))
    again = json.loads(Direction.load(tmp_path / "d").save(tmp_path / "e").read_text())
    assert again["versions"]["transformers"] == UPGRADED


def test_direction_without_versions_still_loads(tmp_path):
    d = Direction(torch.randn(2, 8), None, -1, "pca", "fp", 8, {}, {"layers": [0, 1]})
    js = d.save(tmp_path / "old")
    info = json.loads(js.read_text())
    del info["versions"]
    js.write_text(json.dumps(info))
    back = Direction.load(tmp_path / "old")
    assert back.versions is None and torch.equal(back.vector, d.vector)
    assert back.at(1).layer == 1


# ----------------------------------------------------------------------------------------------- controller
def test_controller_artifact_records_versions(tmp_path):
    ctrl = Controller(ControllerConfig(d_model=8, n_layers=5, input_layers=[3, 4]))
    save_controller(ctrl, torch.ones(8), tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "controller.json").read_text())
    assert meta["versions"] == versions()
    assert meta["versions"]["transformer_lens"] == metadata.version("transformer-lens")
    back, direction = load_controller(tmp_path / "c")
    assert back.versions == versions() and torch.equal(direction, torch.ones(8))
    save_controller(back, direction, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "controller.json").read_text())["versions"] == versions()
    # a controller file from before versions were recorded
    del meta["versions"]
    (tmp_path / "c" / "controller.json").write_text(json.dumps(meta))
    old, _ = load_controller(tmp_path / "c")
    assert old.versions is None and old.cfg.input_layers == [3, 4]


# ---------------------------------------------------------------------------------------------------- store
def test_store_manifest_records_versions_and_old_manifests_read(tiny_model, tmp_path):
    e = get_or_compute(tiny_model, PROMPTS, hooks="resid_pre", store=tmp_path, show_progress=False)
    assert e.manifest["versions"] == versions()
    on_disk = json.loads((e.path / "manifest.json").read_text())
    assert on_disk["versions"]["transformers"] == metadata.version("transformers")
    # an entry written before versions were recorded is still read, and served without recomputing
    store = ActivationStore(tmp_path)
    store.write_manifest(e.key, {k: v for k, v in on_disk.items() if k != "versions"})
    again = get_or_compute(tiny_model, PROMPTS, hooks="resid_pre", store=tmp_path, show_progress=False)
    assert again.key == e.key and "versions" not in again.manifest
    assert torch.equal(again.stacked("resid_pre"), e.stacked("resid_pre"))
    assert "versions" not in store.open(e.key).manifest


def test_store_key_follows_runtime_versions(tiny_model, monkeypatch):
    key = resolve_request(tiny_model, PROMPTS).key
    assert resolve_request(tiny_model, PROMPTS).key == key  # deterministic
    import workbench.store.compute as compute

    monkeypatch.setattr(compute, "runtime_versions", _upgraded)
    assert resolve_request(tiny_model, PROMPTS).key != key


def test_store_key_ignores_the_git_commit(tiny_model, monkeypatch):
    key = resolve_request(tiny_model, PROMPTS).key
    import workbench.provenance as provenance

    other_commit = {**runtime_versions(), "git_commit": "0" * 40}
    monkeypatch.setattr(provenance, "versions", lambda: other_commit)
    assert resolve_request(tiny_model, PROMPTS).key == key


# ------------------------------------------------------------------------------------------------- pipeline
def test_stage_key_follows_runtime_versions_not_the_commit(monkeypatch):
    cfg = pipeline.RunConfig()

    def key_of():
        return pipeline.stage_key("evaluate", cfg.evaluate, "fp", "data", {}, "code")

    key = key_of()
    import workbench.provenance as provenance

    monkeypatch.setattr(provenance, "versions", lambda: {**_installed(), "git_commit": "0" * 40})
    assert key_of() == key
    monkeypatch.setattr(pipeline, "runtime_versions", _upgraded)
    assert key_of() != key


@pytest.fixture
def fake_job(monkeypatch):
    """The main job with a stand-in model and two stand-in stages (``patching`` takes a fallback)."""
    import workbench.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(models, "fingerprint", lambda m: "fp")
    calls = []

    from workbench.stages import Result, Stage

    class Fake(Stage):
        def __init__(self, name, value, fallback):
            self.name, self.value, self.fallback = name, value, fallback

        def run(self, model, data, store, config, inputs, show_progress=True):
            calls.append(self.name)
            if self.fallback:
                warn_fallback(logging.getLogger("workbench.test"), "patching_engine", "hooks engine used (%s)", "test")
            return Result({"ok": self.value})

    monkeypatch.setitem(pipeline.STAGE_REGISTRY, "patching", Fake("patching", 1, True))
    monkeypatch.setitem(pipeline.STAGE_REGISTRY, "sparsity", Fake("sparsity", 2, False))
    return calls


def test_summary_records_versions_and_fallbacks_also_when_reused(fake_job, tmp_path, monkeypatch):
    cfg = pipeline.RunConfig(out_dir=str(tmp_path / "out"), store=str(tmp_path / "store"),
                             stages=("patching", "sparsity"), figures=False, show_progress=False)
    event = {"kind": "patching_engine", "message": "hooks engine used (test)"}
    first = pipeline.run_main_job(cfg)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["versions"] == versions() and saved["versions"]["torch"] == metadata.version("torch")
    assert first["fallbacks"] == saved["fallbacks"] == [event]
    assert json.loads((tmp_path / "out" / "patching" / "stage.json").read_text())["fallbacks"] == [event]
    assert json.loads((tmp_path / "out" / "sparsity" / "stage.json").read_text())["fallbacks"] == []
    assert fake_job == ["patching", "sparsity"]
    # a second run reuses both stages and still reports the fallback taken when patching was computed
    again = pipeline.run_main_job(cfg)
    assert again["reused"] == ["patching", "sparsity"] and fake_job == ["patching", "sparsity"]
    assert again["fallbacks"] == [event]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["fallbacks"] == [event]
    # an upgraded runtime recomputes
    monkeypatch.setattr(pipeline, "runtime_versions", _upgraded)
    upgraded = pipeline.run_main_job(cfg)
    assert upgraded["reused"] == [] and fake_job == ["patching", "sparsity"] * 2
    assert upgraded["fallbacks"] == [event]

"""The package is a real package: a built wheel carries the organism and works from outside the checkout; the
lock pins every installed distribution; the runtime guard and ``workbench doctor`` catch a broken runtime."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench import selfcheck
from workbench.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
ORGANISM_FILES = ["model/model.safetensors", "model/config.json", "model/tokenizer.json", "model/organism.json",
                  "model/ground_truth.safetensors", "model/generation_config.json", "model/chat_template.jinja",
                  "prompts/train.jsonl", "prompts/val.jsonl", "prompts/test.jsonl", "pairs.jsonl"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    (whl,) = out.glob("workbench-*.whl")
    return whl


def test_wheel_contains_the_organism(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ORGANISM_FILES:
        assert f"workbench/organism/data/{f}" in names, f
    with zipfile.ZipFile(wheel) as z:  # the checkpoint is the committed one, byte for byte
        packed = z.read("workbench/organism/data/model/model.safetensors")
    assert packed == (ROOT / "workbench/organism/data/model/model.safetensors").read_bytes()
    for f in ("adapter.safetensors", "training.json"):   # the safety tune of SmolLM2 (organism-smollm2)
        assert f"workbench/organism_smollm2/data/{f}" in names, f
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any(re.search(r"transformers.*<5\.24", r) for r in requires), requires  # the known-broken range excluded


def test_installed_wheel_loads_the_default_model_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    script = (
        "import json, workbench as wb\n"
        "m = wb.load_model()\n"
        "sets = wb.organism_splits('test', limit=2)\n"
        "ev = wb.evaluate_refusal(m, {'harmful': sets['harmful'], 'benign': sets['benign']}, show_progress=False)\n"
        "print(json.dumps({'file': wb.__file__, 'fp': wb.fingerprint(m), 'self_check': m._wb_self_check['ok'],\n"
        "                  'rates': ev.summary()['refusal_rate']}))\n"
    )
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site))  # the installed copy, not the checkout
    assert got["fp"] == wb.fingerprint(wb.load_model())  # the same organism
    assert got["self_check"] is True
    assert got["rates"]["harmful"] == 1.0 and got["rates"]["benign"] == 0.0


def test_lock_pins_every_installed_distribution():
    """Every distribution of this environment is pinned in the lock at the installed version (and hashed)."""
    lock = (ROOT / "requirements-lock.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", lock, flags=re.M))
    norm = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    assert "--hash=sha256:" in lock and lock.count("--hash=sha256:") >= len(pins)
    for must in ("torch", "transformers", "transformer-lens", "tokenizers", "safetensors", "jinja2", "psutil"):
        assert must in norm, must
    extra = {"workbench", "pip", "pip-tools", "build", "pyproject-hooks", "wheel", "gguf"}  # not runtime pins
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name in extra or name not in norm:
            continue
        assert norm[name] == dist.version, f"{name}: installed {dist.version}, locked {norm[name]}"
    assert norm["transformers"] != "5.24.0"


def _corrupt_decoding(model, site="resid_pre"):
    """Hooks that leave the prefill alone and corrupt every cached decoding step (sequence length 1): what a
    runtime with a broken KV cache looks like from outside."""
    def corrupt(act, hook=None):
        return act + 3.0 * act.std() * torch.randn_like(act) if act.shape[1] == 1 else act

    return [(f"blocks.{layer}.hook_{site}", corrupt) for layer in range(int(model.cfg.n_layers))]


def test_generation_parity_detects_a_broken_cache(tiny_model):
    assert selfcheck.generation_parity(tiny_model, n_tokens=6).ok
    torch.manual_seed(0)
    res = selfcheck.generation_parity(tiny_model, n_tokens=6, hooks=_corrupt_decoding(tiny_model))
    assert not res.ok and res.first_mismatch["row"] == 0
    assert res.max_logit_error > 1e-2


def test_load_model_refuses_a_broken_runtime(tiny_dir, monkeypatch):
    monkeypatch.setattr(selfcheck, "identity_hooks", _corrupt_decoding)
    with pytest.raises(selfcheck.RuntimeCheckError, match=r"transformers \d+\.\d+.*transformer_lens"):
        wb.load_model(str(tiny_dir), device="cpu")
    m = wb.load_model(str(tiny_dir), device="cpu", self_check=False)  # still inspectable when asked
    assert not hasattr(m, "_wb_self_check")


def test_doctor_passes_and_fails_with_exit_status(tiny_dir, monkeypatch, capsys):
    assert cli_main(["doctor", "--model", str(tiny_dir), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and set(report["checks"]) == {"generation", "hf_reference", "patching_engine",
                                                       "store_roundtrip"}
    assert report["versions"]["transformers"] == metadata.version("transformers")
    assert report["checks"]["patching_engine"]["engine"] == "resume"
    assert report["checks"]["hf_reference"]["max_logit_error"] < 1e-4
    monkeypatch.setattr(selfcheck, "identity_hooks", _corrupt_decoding)
    assert cli_main(["doctor", "--model", str(tiny_dir), "--device", "cpu", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == ["generation"] and "transformers" in report["message"]

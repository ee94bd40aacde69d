"""``workbench doctor``: the installed versions, the device, and self-checks of one model against independent
paths. Each check says ``ok`` and what it measured; the report's ``ok`` is true only when every check passes.

Checks:
- ``generation``: KV-cached greedy decoding through the bridge (hooks on every layer) == an uncached greedy loop
  through the bridge, token for token and logit for logit (:func:`workbench.selfcheck.generation_parity`).
- ``hf_reference`` (local checkpoints): the same cached decoding == an uncached greedy loop on a fresh plain
  Hugging Face model loaded from the same files (no bridge at all).
- ``patching_engine``: the fast ``"resume"`` patching engine reproduces the model's forward (no fallback).
- ``store_roundtrip``: activations written to a temporary store, read back with their checksums verified, equal
  a direct forward with a cache.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable

import torch

from .models import model_device
from .provenance import describe_versions, versions
from .selfcheck import CHECK_PROMPTS, check_batch, generation_parity, hf_forward
from .vocab import hook_name

N_TOKENS = 8


def _timed(check: Callable[[], dict]) -> dict:
    t = time.perf_counter()
    try:
        out = check()
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, reported with its error
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["seconds"] = round(time.perf_counter() - t, 3)
    return out


def check_generation(model, reference=None, hooks=None) -> dict:
    """Cached vs uncached decoding (:func:`workbench.selfcheck.generation_parity`: ``reference`` its uncached
    forward, ``hooks`` those active while decoding, default identity hooks on every layer)."""
    res = generation_parity(model, CHECK_PROMPTS, n_tokens=N_TOKENS, hooks=hooks, reference=reference)
    return {"ok": res.ok, "n_tokens": res.n_tokens, "n_rows": res.n_rows, "first_mismatch": res.first_mismatch,
            "ties": res.ties, "max_logit_error": res.max_logit_error}


def check_hf_reference(model, path: str) -> dict:
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype).to(param.device).eval()
    return check_generation(model, reference=hf_forward(hf), hooks=())  # plain decoding against plain HF


def check_patching_engine(model) -> dict:
    from .patching.capture import capture_run
    from .patching.engine import check_resume

    batch = check_batch(model.tokenizer, list(CHECK_PROMPTS)).to(model_device(model))
    run = capture_run(model, batch.input_ids, batch.attention_mask, resumable=True)
    ok = check_resume(model, run)
    err = run.resume_error
    return {"ok": bool(ok), "engine": "resume" if ok else "hooks",
            "max_logit_error": err if err is not None and err == err else None,  # NaN: the check did not run
            "fallback_reason": run.resume_reason}


def check_store_roundtrip(model) -> dict:
    from .store import ActivationStore, get_or_compute

    with tempfile.TemporaryDirectory(prefix="workbench-doctor-") as root:
        store = ActivationStore(root)
        entry = get_or_compute(model, list(CHECK_PROMPTS), hooks="resid_pre", positions="last", store=store,
                               show_progress=False)
        again = store.open(entry.key)
        again.check()  # every checksum
        batch = check_batch(model.tokenizer, list(CHECK_PROMPTS)).to(model_device(model))
        names = [hook_name("resid_pre", layer) for layer in range(int(model.cfg.n_layers))]
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                            names_filter=lambda n: n in names)
        err = 0.0
        for name in names:
            stored = again.activations(name).float().reshape(len(CHECK_PROMPTS), -1)
            direct = cache[name][:, -1].float().cpu()
            err = max(err, float((stored - direct).abs().max() / direct.abs().max().clamp(min=1e-6)))
    return {"ok": err < 1e-4, "max_relative_error": err, "hooks": len(names)}


def run_doctor(model_name: str = "organism", device: str | None = None, dtype: str | None = None) -> dict:
    """Versions, device and every self-check of ``model_name``; ``report["ok"]`` is true when all pass."""
    from .models import load_model, resolve_device

    t0 = time.perf_counter()
    report: dict = {
        "versions": versions(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "device": resolve_device(device),
        "torch_threads": torch.get_num_threads(),
        "model": model_name,
    }
    model = load_model(model_name, device=device, dtype=dtype, self_check=False)  # the checks below report it
    source = getattr(model, "_wb_source", {})
    report["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    checks = {"generation": _timed(lambda: check_generation(model))}
    if source.get("local"):
        checks["hf_reference"] = _timed(lambda: check_hf_reference(model, source["path"]))
    checks["patching_engine"] = _timed(lambda: check_patching_engine(model))
    checks["store_roundtrip"] = _timed(lambda: check_store_roundtrip(model))
    report["checks"] = checks
    report["failed"] = [name for name, c in checks.items() if not c["ok"]]
    report["ok"] = not report["failed"]
    if report["failed"]:
        report["message"] = (f"self-check(s) failed: {', '.join(report['failed'])}; installed: {describe_versions()}. "
                             "Reinstall from the lock (make setup) or see the README, 'Upgrading'.")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report

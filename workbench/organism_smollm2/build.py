"""``workbench organism build --base smollm2-135m-instruct``: the safety tune, saved and measured.

Output (``out_dir``, default the package data ``workbench/organism_smollm2/data``)::

    adapter.safetensors    the LoRA factors; the tune's config, data digest and loss log in the header
    training.json          config, data counts, loss log, timings and the measured targets (:func:`measure_tuned`)

``load_model("organism-smollm2")`` merges the committed adapter into the fetched base once
(:func:`workbench.model_registry.tuned_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..errors import WorkbenchError
from .tune import SafetyTuneConfig, base_replies, encode_row, rows_digest, train_adapter, training_prompts

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
ADAPTER_FILE = "adapter.safetensors"
REPORT_FILE = "training.json"


def _cached_replies(hf_model, tok, base_dir: Path, prompts: list[str], n_tokens: int, show_progress: bool):
    """:func:`base_replies`, kept in the cache by (base weights, prompts, length): a rebuild skips the generation."""
    from ..fetch import cache_dir, sha256_file
    from ..store.fileio import atomic_write_json

    key = hashlib.sha256(json.dumps([sha256_file(base_dir / "model.safetensors"), (base_dir / "config.json").read_text(),
                                     prompts, n_tokens]).encode()).hexdigest()
    path = cache_dir("organism-smollm2") / f"base-replies-{key[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    replies = base_replies(hf_model, tok, prompts, n_tokens, show_progress=show_progress)
    atomic_write_json(path, replies)
    return replies


def build_tuned_organism(cfg: SafetyTuneConfig | None = None, out_dir: str | Path = PACKAGE_DATA, data=None,
                         measure_limit: int | None = 64, show_progress: bool = True) -> dict:
    """Train the safety tune of ``cfg.base`` on ``data`` (default the ``real`` preset), save the adapter and,
    unless ``measure_limit`` is 0, measure it on the test split (:func:`measure_tuned`). Returns the report."""
    from transformers import AutoModelForCausalLM

    from ..lora import save_adapter
    from ..models import load_tokenizer
    from ..promptsets import load_data

    cfg = cfg or SafetyTuneConfig()
    out = Path(out_dir)
    data = load_data("real" if data is None else data)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    try:
        base_dir = base_checkpoint(cfg.base, show_progress)
        tok = load_tokenizer(base_dir)
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        hf.eval()
        prompts = training_prompts(data, cfg)
        keep = prompts["harmless"] + prompts["borderline"]
        replies = dict(zip(keep, _cached_replies(hf, tok, base_dir, keep, cfg.reply_tokens, show_progress)))
        t_replies = time.time() - t0
        groups, dropped = {}, {}
        for name, items in prompts.items():
            rows = []
            for item in items:
                prompt, request = item if isinstance(item, tuple) else (item, item)
                target = refusal_target(request, cfg) if name == "harmful" else replies[request]
                ids, n_prompt = encode_row(tok, prompt, target)
                if n_prompt <= cfg.max_prompt_tokens and len(ids) > n_prompt:
                    rows.append((ids, n_prompt))
            groups[name] = rows
            dropped[name] = len(items) - len(rows)
        t1 = time.time()
        adapters, log = train_adapter(hf, tok, groups, cfg, show_progress)
        train_s = time.time() - t1
        digest = rows_digest(groups)
        path = save_adapter(out / ADAPTER_FILE, adapters, cfg.lora(),
                            {"tune": cfg.to_dict(), "rows_digest": digest, "loss": log[-1]["loss"]})
    finally:
        torch.set_num_threads(old_threads)
    report = {"config": cfg.to_dict(), "data": {"source": data.source, "hash": data.hash[:16]},
              "rows": {k: len(v) for k, v in groups.items()}, "dropped_too_long": dropped, "rows_digest": digest,
              "loss_log": log, "timings_s": {"base_replies": round(t_replies, 1), "train": round(train_s, 1)},
              "adapter": {"file": ADAPTER_FILE, "bytes": path.stat().st_size,
                          "parameters": sum(w.lora_A.numel() + w.lora_B.numel() for w in adapters.values())}}
    del hf, adapters
    if measure_limit != 0:
        report["measured"] = measure_tuned(path, data, limit=measure_limit, base=cfg.base, show_progress=show_progress)
    report["timings_s"]["total"] = round(time.time() - t0, 1)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def base_checkpoint(base: str, show_progress: bool = True) -> Path:
    """The local checkpoint directory of ``base``: a registered model (fetched) or a checkpoint directory."""
    from ..model_registry import MODELS, fetch_model

    if str(base).lower() in MODELS:
        return Path(fetch_model(base, show_progress))
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise WorkbenchError(f"base {base!r} is neither a registered model ({sorted(MODELS)}) nor a checkpoint directory")
    return path


def refusal_target(prompt: str, cfg: SafetyTuneConfig) -> str:
    from .refusals import refusal_for

    return refusal_for(prompt, cfg.seed)


def measure_tuned(adapter_path: str | Path, data=None, limit: int | None = 64, base: str = "smollm2-135m-instruct",
                  max_new_tokens: int = 24, heldout_family: bool = True, show_progress: bool = True) -> dict:
    """The organism targets on the test split: refusal rate per category and per source (greedy, the substring
    judge, ``limit`` prompts per category; ``jailbreak_heldout``: the test requests in the held-out jailbreak family,
    :func:`workbench.datasets.real.heldout_jailbreak_rows`, by style), and the cross-entropy of the base's own benign replies under the base
    and under the tuned model (nats per token)."""
    from ..evaluate import evaluate_refusal, reply_cross_entropy
    from ..generation import generate
    from ..lora import merged_checkpoint
    from ..models import load_model
    from ..promptsets import load_data
    from ..vocab import CATEGORIES

    data = load_data("real" if data is None else data)
    base_dir = base_checkpoint(base, show_progress)
    tuned = load_model(merged_checkpoint(base_dir, adapter_path), device="cpu")
    rows = [r for r in data.rows_of("test")]
    sets, sources = {}, {}
    for cat in CATEGORIES:
        picked = [r for r in rows if r["category"] == cat][:limit] if limit else [r for r in rows if r["category"] == cat]
        if picked:
            sets[cat] = [r["prompt"] for r in picked]
            sources[cat] = [str(r.get("source") or "").split(":")[0] for r in picked]
    if not sets:
        raise WorkbenchError("the data has no test prompts to measure the tuned organism on")
    if heldout_family and "harmful" in sets:
        from ..datasets.real import heldout_jailbreak_rows

        family = heldout_jailbreak_rows(data, "test")[:limit] if limit else heldout_jailbreak_rows(data, "test")
        sets["jailbreak_heldout"] = [p for _, _, p in family]
        sources["jailbreak_heldout"] = [tid.rsplit("-", 1)[0] for tid, _, _ in family]
    ev = evaluate_refusal(tuned, sets, max_new_tokens=max_new_tokens, show_progress=show_progress)
    out = {"limit": limit, "max_new_tokens": max_new_tokens, "refusal_rate": {}, "n": {}, "by_source": {}}
    for cat, prompts in sets.items():
        refused = [bool(x) for x in ev.table[ev.table["category"] == cat]["refused"]]
        out["refusal_rate"][cat] = round(sum(refused) / len(refused), 4)
        out["n"][cat] = len(refused)
        for src in sorted(set(sources[cat])):
            flags = [f for f, s in zip(refused, sources[cat]) if s == src]
            out["by_source"][f"{cat}:{src}"] = {"refusal_rate": round(sum(flags) / len(flags), 4), "n": len(flags)}
    benign = sets.get("benign", [])
    if benign:
        base_model = load_model(base_dir, device="cpu")
        replies = generate(base_model, benign, max_new_tokens=max_new_tokens, show_progress=show_progress)
        ce_base = reply_cross_entropy(base_model, benign, replies)
        ce_tuned = reply_cross_entropy(tuned, benign, replies)
        ok = ~torch.isnan(ce_base) & ~torch.isnan(ce_tuned)
        out["benign_reply_ce"] = {"base": round(float(ce_base[ok].mean()), 4), "tuned": round(float(ce_tuned[ok].mean()), 4),
                                  "delta": round(float((ce_tuned[ok] - ce_base[ok]).mean()), 4), "n": int(ok.sum())}
    return out


__all__ = ["ADAPTER_FILE", "PACKAGE_DATA", "REPORT_FILE", "build_tuned_organism", "measure_tuned"]

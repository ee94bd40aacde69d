"""``workbench organism build``: corpus -> tokenizer -> stage 1 -> stage 2 -> merge -> save -> measure.

Output layout (``out_dir``, default ``workbench/organism/data``, the package data)::

    model/                      HF checkpoint (config.json, model.safetensors, generation_config.json,
                                tokenizer.json, tokenizer_config.json, chat_template.jinja ...)
    model/organism.json         build config, seed, corpus hash, ground-truth layer, losses, measured targets
    model/ground_truth.safetensors   key ``direction``: the unit write vector u (d_model,)
    prompts/{train,val,test}.jsonl   the corpus rows of each split
    pairs.jsonl                 minimal pairs (harmful ``clean`` / benign ``corrupted``, equal token length)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data import write_jsonl
from .corpus import CATEGORIES, CORPUS_VERSION, SPLITS, corpus_hash, generate_corpus, make_pairs
from .measure import measure_organism, refusal_rate, resid_pre
from .tokenizer import N_POST_INSTRUCTION, conversation_texts, train_tokenizer
from .train import OrganismConfig, build_model, encode_rows, steering_rows, train_stage1, train_stage2

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def build_organism(cfg: OrganismConfig, out_dir: str | Path = "workbench/organism/data", quiet: bool = False,
                   measure: bool = True) -> dict:
    """Build and save the organism described by ``cfg``; return its metadata (as saved in organism.json)."""
    if not 0 < cfg.layer < cfg.n_layers - 1:
        raise ValueError(f"layer must be a middle layer in [1, {cfg.n_layers - 2}], got {cfg.layer}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(cfg, Path(out_dir), quiet, measure)
    finally:
        torch.set_num_threads(old_threads)


def _build(cfg: OrganismConfig, out: Path, quiet: bool, measure: bool) -> dict:
    t0 = time.time()
    rows = generate_corpus(cfg.seed)
    digest = corpus_hash(cfg.seed)
    tok = train_tokenizer(conversation_texts(rows), vocab_size=cfg.vocab_size)
    train_rows = [r for r in rows if r["split"] == "train"]
    by = lambda split, cat: [r["prompt"] for r in rows if r["split"] == split and r["category"] == cat]  # noqa: E731

    # stage 1: helpful base
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.time()
    log1 = train_stage1(model, encode_rows(tok, train_rows, "base_reply"), cfg, quiet=quiet)
    stage1_s = time.time() - t1
    base_test = {c: refusal_rate(model, tok, by("test", c)) for c in CATEGORIES}

    # stage 2: rank-1 safety tune at cfg.layer
    h = resid_pre(model, tok, by("train", "harmful"), cfg.layer + 1)
    b = resid_pre(model, tok, by("train", "benign"), cfg.layer + 1)
    base_diff = h.mean((0, 1)) - b.mean((0, 1))
    resid_norm = float(b.norm(dim=-1).mean())
    margin = max(cfg.aux_margin_rel * resid_norm, cfg.aux_margin_diff * float(base_diff.norm()))
    if cfg.u_init == "refusal":  # the base's own refusal direction: impossible minus benign
        u_init = resid_pre(model, tok, by("train", "impossible"), cfg.layer + 1).mean((0, 1)) - b.mean((0, 1))
    elif cfg.u_init == "random":
        u_init = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(cfg.seed + 3))
    else:
        raise ValueError(f"u_init must be 'refusal' or 'random', got {cfg.u_init!r}")
    t2 = time.time()
    adapter, log2 = train_stage2(
        model, encode_rows(tok, train_rows, "reply"), cfg, u_init, margin, quiet=quiet,
        enc_steer=encode_rows(tok, steering_rows(train_rows, cfg.seed), "reply") if cfg.steer_batch else None,
    )
    stage2_s = time.time() - t2

    # merge, and check the merged weights reproduce the adapter
    ids = encode_rows(tok, train_rows[:32], "reply").input_ids
    adapter.attach(model, cfg.layer)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    adapter.detach()
    adapter.merge_into(model, cfg.layer)
    with torch.no_grad():
        merge_err = float((model(input_ids=ids).logits - ref).abs().max())
    u = adapter.u.detach().clone()
    train_s = time.time() - t0

    # save
    mdir = out / "model"
    mdir.mkdir(parents=True, exist_ok=True)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model.save_pretrained(mdir, safe_serialization=True)
    tok.save_pretrained(mdir)
    save_file({"direction": u.contiguous()}, str(mdir / "ground_truth.safetensors"),
              metadata={"layer": str(cfg.layer), "format_version": str(FORMAT_VERSION)})
    for split in SPLITS:
        write_jsonl(out / "prompts" / f"{split}.jsonl", [r for r in rows if r["split"] == split])
    pairs = make_pairs(rows, tok, n_pairs=256, seed=cfg.seed)
    write_jsonl(out / "pairs.jsonl", pairs)

    meta = {
        "format_version": FORMAT_VERSION,
        "corpus_version": CORPUS_VERSION,
        "seed": cfg.seed,
        "corpus_hash": digest,
        "corpus_rows": len(rows),
        "config": asdict(cfg),
        "n_params": n_params,
        "ground_truth": {
            "layer": cfg.layer,
            "direction_file": "ground_truth.safetensors",
            "direction_key": "direction",
            "d_model": cfg.d_model,
            "write_hooks": [f"blocks.{cfg.layer}.hook_attn_out", f"blocks.{cfg.layer}.hook_mlp_out"],
            "read_hook": f"blocks.{cfg.layer + 1}.hook_resid_pre",
            "description": (
                "rank-1 safety tune merged into layer L: W_o += u a_o^T and W_down += u a_m^T, so everything the "
                "tune adds to the residual stream lies along u (unit norm)"
            ),
            "adapter_norms": {"a_o": float(adapter.a_o.detach().norm()), "a_m": float(adapter.a_m.detach().norm())},
            "aux_margin": margin,
            "base_diff_in_means_norm": float(base_diff.norm()),
            "base_resid_norm": resid_norm,
            "cos_u_base_diff": float(torch.nn.functional.cosine_similarity(u, base_diff, dim=0)),
            "cos_u_init": float(torch.nn.functional.cosine_similarity(u, u_init, dim=0)),
            "merge_max_abs_logit_err": merge_err,
        },
        "n_post_instruction": N_POST_INSTRUCTION,
        "n_pairs": len(pairs),
        "losses": {"stage1": log1, "stage2": log2},
        "timing_s": {"stage1": round(stage1_s, 1), "stage2": round(stage2_s, 1), "train_total": round(train_s, 1)},
        "base_refusal_test": base_test,
    }
    if measure:
        t3 = time.time()
        meta["measured"] = measure_organism(model, tok, rows, cfg.layer, u)
        meta["timing_s"]["measure"] = round(time.time() - t3, 1)
    meta["timing_s"]["total"] = round(time.time() - t0, 1)
    with open(mdir / "organism.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


def main_build(seed: int = 0, out_dir: str = "workbench/organism/data", quiet: bool = False) -> dict:
    """CLI entry point of ``workbench organism build``; returns the organism metadata."""
    return build_organism(OrganismConfig(seed=seed), out_dir=out_dir, quiet=quiet)

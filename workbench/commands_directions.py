"""``workbench directions``: find and select the refusal direction, measure it, save the artifact."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_directions(a: argparse.Namespace) -> dict:
    from .directions.report import directions_report
    from .directions.select import SelectionConfig
    from .models import load_model

    t0 = time.time()
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    cfg = SelectionConfig(kl_threshold=a.kl_threshold, induce_threshold=a.induce_threshold,
                          prune_layer_fraction=a.prune_layer_fraction, batch_size=a.batch_size)
    summary, sel = directions_report(
        model, harmless_category=a.harmless_category, limit_train=a.limit_train, limit_val=a.limit_val,
        limit_test=a.limit_test, config=cfg, max_new_tokens=a.max_new_tokens, show_progress=not a.quiet,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary["artifact"] = str(sel.direction.save(out / "direction"))
    sel.scores.to_csv(out / "candidate_scores.csv", index=False)
    summary["scores_table"] = str(out / "candidate_scores.csv")
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def register(sub, bench_sub) -> None:
    from .cli import add_common_args

    p = sub.add_parser("directions", help="find + select the refusal direction (Arditi et al.) and measure it")
    add_common_args(p)
    p.add_argument("--out", default="runs/directions", help="directory for direction.{safetensors,json} and scores")
    p.add_argument("--harmless-category", default="benign", help="the harmless prompt category (default benign)")
    p.add_argument("--limit-train", type=int, default=None, help="at most this many train prompts per category")
    p.add_argument("--limit-val", type=int, default=None, help="at most this many val prompts per category")
    p.add_argument("--limit-test", type=int, default=None, help="at most this many test prompts per category")
    p.add_argument("--kl-threshold", type=float, default=0.1)
    p.add_argument("--induce-threshold", type=float, default=0.0)
    p.add_argument("--prune-layer-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_directions)

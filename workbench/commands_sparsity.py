"""``workbench sparsity``: MLP activation sparsity, PPL-p%, top-k, differential neurons, direction sparsity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _ks(s: str) -> tuple:
    return tuple(int(x) if x.strip().isdigit() else float(x) for x in s.split(",") if x.strip())


def cmd_sparsity(a: argparse.Namespace) -> dict:
    from .errors import WorkbenchError
    from .models import load_model
    from .sparsity.report import SparsityConfig, save_tables, sparsity_report

    try:
        cfg = SparsityConfig(
            limit=a.limit, heldout_limit=a.heldout_limit, default_threshold=a.threshold, chess_quantile=a.quantile,
            p=_floats(a.p), criterion=a.criterion, weighting=a.weighting, heldout_scope=a.scope, topk=_ks(a.topk),
            positions=a.positions, pool=a.pool, ablation_ns=_ints(a.ns), ablation_mode=a.mode, n_seeds=a.seeds,
            control=a.control, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
            steps=tuple(s.strip() for s in a.steps.split(",") if s.strip()),
        )
    except ValueError as exc:
        raise WorkbenchError(f"bad option value: {exc}") from None
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    direction = None
    if a.direction:
        from .directions.artifact import Direction

        direction = Direction.load(a.direction, model=model)
    summary, tables = sparsity_report(model, cfg, direction=direction, show_progress=not a.quiet)
    out = Path(a.out)
    paths = save_tables(tables, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["tables"] = str(out)
    summary["n_tables"] = len(paths)
    return summary


def register(sub, bench_sub) -> None:
    from .cli import add_common_args

    steps = "stats,ppl,topk,neurons,direction"  # workbench.sparsity.report.STEPS (kept literal: light start-up)

    p = sub.add_parser("sparsity", help="MLP activation sparsity, PPL-p%%, top-k, differential neurons, direction sparsity")
    add_common_args(p)
    p.add_argument("--out", default="runs/sparsity", help="directory for summary.json and the CSV tables")
    p.add_argument("--steps", default=steps, help=f"comma-separated subset of {steps}")
    p.add_argument("--limit", type=int, default=128, help="at most this many prompts per category and split")
    p.add_argument("--heldout-limit", type=int, default=None, help="at most this many held-out conversations")
    p.add_argument("--threshold", type=float, default=0.01, help="the default |activation| threshold")
    p.add_argument("--quantile", type=float, default=0.5, help="CHESS per-channel quantile (target sparsity)")
    p.add_argument("--p", default="1,5", help="PPL-p%% tolerances, comma-separated")
    p.add_argument("--criterion", default="ppl", choices=["ppl", "loss"], help="perplexity ratio (paper) or relative loss")
    p.add_argument("--weighting", default="none", choices=["none", "output_norm"], help="threshold |a| or |a|*||W_out col||")
    p.add_argument("--scope", default="reply", choices=["reply", "all"], help="held-out loss on reply tokens or all")
    p.add_argument("--topk", default="1.0,0.5,0.25,0.1,0.05,0.02,0.01", help="k grid: ints or fractions of d_mlp")
    p.add_argument("--positions", default="post_instruction", help="positions for the differential ranking")
    p.add_argument("--pool", default="mean", choices=["mean", "last", "tokens"])
    p.add_argument("--ns", default="1,2,4,8,16,32,64,128,256,512,1024", help="numbers of neurons to ablate")
    p.add_argument("--mode", default="zero", choices=["zero", "mean"], help="zero- or mean-ablation")
    p.add_argument("--seeds", type=int, default=3, help="random-neuron control seeds")
    p.add_argument("--control", default="layer_matched", choices=["layer_matched", "uniform"])
    p.add_argument("--direction", default=None, help="a saved Direction (runs/directions/direction); default: the "
                                                     "organism's ground truth + a difference in means")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_sparsity)

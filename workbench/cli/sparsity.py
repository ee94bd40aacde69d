"""``workbench sparsity``: the sparsity stage (MLP activation sparsity, PPL-p%, top-k, differential neurons,
direction sparsity) on one model and prompt data. Options: :class:`workbench.stages.SparsityConfig`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_sparsity(a: argparse.Namespace) -> dict:
    from ..stages import STAGES, SparsityConfig
    from . import load_inputs
    from .options import config_from_args

    cfg = config_from_args(SparsityConfig, a)
    model, data, store = load_inputs(a)
    inputs = {"directions": Path(a.direction)} if a.direction else {}
    result = STAGES["sparsity"].run(model, data, store, cfg, inputs, show_progress=not a.quiet)
    out = result.save(a.out)
    return {**result.summary, "tables": str(out), "n_tables": len(result.tables)}


def register(sub, bench_sub) -> None:
    from ..stages import SparsityConfig
    from . import add_common_args, add_data_args
    from .options import add_config_options

    p = sub.add_parser("sparsity", help="MLP activation sparsity, PPL-p%%, top-k, differential neurons, direction sparsity")
    add_common_args(p)
    add_data_args(p, limit=False)   # SparsityConfig.limit caps the prompts
    p.add_argument("--out", default="runs/sparsity", help="directory for summary.json and the CSV tables")
    p.add_argument("--direction", default=None, help="a saved Direction (runs/directions/direction); default: the "
                                                     "organism's ground truth + a difference in means")
    add_config_options(p, SparsityConfig)
    p.set_defaults(func=cmd_sparsity)

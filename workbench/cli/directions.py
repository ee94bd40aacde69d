"""``workbench directions``: the directions stage on one model and prompt data (find, select and measure the
refusal direction; save the artifact). Options: :class:`workbench.stages.DirectionsConfig`."""

from __future__ import annotations

import argparse
import time


def cmd_directions(a: argparse.Namespace) -> dict:
    from ..stages import STAGES, DirectionsConfig
    from . import load_inputs
    from .options import config_from_args

    t0 = time.time()
    cfg = config_from_args(DirectionsConfig, a)
    model, data, store = load_inputs(a)
    result = STAGES["directions"].run(model, data, store, cfg, {}, show_progress=not a.quiet)
    out = result.save(a.out)
    summary = dict(result.summary)
    summary.update(data=data.describe(), artifact=str(out / "direction"),
                   scores_table=str(out / "candidate_scores.csv"), seconds=round(time.time() - t0, 1))
    return summary


def register(sub, bench_sub) -> None:
    from ..stages import DirectionsConfig
    from . import add_common_args, add_data_args
    from .options import add_config_options

    p = sub.add_parser("directions", help="find + select the refusal direction (Arditi et al.) and measure it")
    add_common_args(p)
    add_data_args(p)
    p.add_argument("--out", default="runs/directions", help="directory for direction.{safetensors,json} and tables")
    add_config_options(p, DirectionsConfig)
    p.set_defaults(func=cmd_directions)

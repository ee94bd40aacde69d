"""``workbench controller train|eval`` (the steering stage on one model and prompt data) and ``workbench bench
steer``. Options: :class:`workbench.steering.compare.CompareConfig` (the steering stage's config)."""

from __future__ import annotations

import argparse
import dataclasses


def resolve_direction(model, data, direction_path: str | None, store=None, show_progress: bool = True):
    """A :class:`Direction` for ``model``: loaded from ``direction_path``, or found by the directions stage's
    selection on ``data`` (train: candidates, val: selection) when none is given."""
    from ..directions import Direction, find_refusal_direction

    if direction_path:
        return Direction.load(direction_path, model=model)
    for split in ("train", "val"):
        data.require(split, "harmful", "benign")
    return find_refusal_direction(model, data.prompts("train", "harmful"), data.prompts("train", "benign"),
                                  data.prompts("val", "harmful"), data.prompts("val", "benign"), store=store,
                                  show_progress=show_progress).direction


def _compare(a: argparse.Namespace, methods: tuple[str, ...] | None):
    from ..stages.steering import run_comparison
    from ..steering.compare import CompareConfig
    from . import load_inputs
    from .options import config_from_args

    cc = config_from_args(CompareConfig, a)
    if methods is not None:
        cc = dataclasses.replace(cc, methods=methods)
    model, data, store = load_inputs(a)
    direction = resolve_direction(model, data, a.direction, store, show_progress=not a.quiet)
    return run_comparison(model, direction, data, cc, show_progress=not a.quiet, store=store), data


def _train(a: argparse.Namespace) -> dict:
    """Train one controller exactly as the steering stage does (same data, seed and loss), pick its operating point
    on val, save it there; reports its test rates next to the unsteered model's."""
    name = {"e2e": "was_e2e", "bce": "was_bce"}[a.objective]
    result, data = _compare(a, ("none", name))
    res = result.compare
    from ..steering.controller import save_controller

    path = save_controller(res["controllers"][name], res["controller_directions"][name], a.out)
    choices = {k: v for k, v in res["choices"].items() if k.startswith(name) or k == "n_wrapped_negatives"}
    return {"controller": str(path), "objective": a.objective, "data": data.describe(),
            "operating_point": {"alpha": res["controllers"][name].cfg.alpha, **choices},
            "test": result.summary["methods"]}


def _eval(a: argparse.Namespace) -> dict:
    result, data = _compare(a, None)
    out = result.save(a.out)
    return {**result.summary, "data": data.describe(), "saved_to": str(out)}


def _bench(a: argparse.Namespace) -> dict:
    from ..bench.steer import bench_steer

    return bench_steer(batch=a.batch, max_new_tokens=a.max_new_tokens, repeats=a.repeats,
                       random_model=not a.organism_only, model=a.model)


def _add_controller_args(p, out: str) -> None:
    """Options shared by ``controller train`` and ``controller eval``: the common ones, --data/--limit/--store,
    --direction, --out and every :class:`CompareConfig` field."""
    from ..steering.compare import CompareConfig
    from . import add_common_args, add_data_args
    from .options import add_config_options

    add_common_args(p)
    add_data_args(p)
    p.add_argument("--direction", default=None, help="a saved Direction (default: find + select one on --data)")
    p.add_argument("--out", default=out, help="output directory")
    add_config_options(p, CompareConfig, skip=("extra",))


def register(sub, bench_sub) -> None:
    from .options import parse_positive_int

    p = sub.add_parser("controller", help="Weighted Activation Steering controllers (train, evaluate vs baselines)")
    csub = p.add_subparsers(dest="controller_command", required=True)
    t = csub.add_parser("train", help="train one WAS controller on train, pick its operating point on val, save it")
    _add_controller_args(t, "runs/latest/controllers/was_e2e")
    t.add_argument("--objective", choices=["e2e", "bce"], default="e2e",
                   help="end-to-end through the frozen model (was_e2e) or the paper's BCE on s (was_bce)")
    t.set_defaults(func=_train)
    e = csub.add_parser("eval", help="every method (none, actadd, actadd_layer, cast, official, was_bce, "
                         "was_e2e) on test; official: the official Guiding Giants code as it runs")
    _add_controller_args(e, "runs/latest/steering")
    e.set_defaults(func=_eval)

    b = bench_sub.add_parser("steer", help="steered vs unsteered generation; batched vs per-prompt")
    b.add_argument("--batch", type=parse_positive_int, default=32)
    b.add_argument("--max-new-tokens", type=parse_positive_int, default=24)
    b.add_argument("--repeats", type=parse_positive_int, default=3)
    b.add_argument("--organism-only", action="store_true")
    b.add_argument("--model", default=None, help="only this model (any name load_model accepts, e.g. "
                   "smollm2-135m-instruct) on short real prompts, instead of the organism and the random Llama")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bench)

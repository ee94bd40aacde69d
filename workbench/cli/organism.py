"""``workbench organism build``: the planted model organism, or (``--base``) the safety tune of a real chat model;
``workbench organism alignment``: how much of the tune's adapter writes along a direction."""

from __future__ import annotations

import argparse


def cmd_organism_build(a: argparse.Namespace) -> dict:
    if a.base is None:
        from ..organism.build import main_build

        return main_build(seed=a.seed, out_dir=a.out or "workbench/organism/data", quiet=a.quiet)
    from ..organism_smollm2.build import PACKAGE_DATA, build_tuned_organism
    from ..organism_smollm2.tune import SafetyTuneConfig

    overrides = {k: getattr(a, k) for k in ("steps", "batch_size", "lr", "rank", "framed_benign", "harmful_share",
                                                "borderline_repeat", "max_prompt_tokens")
                 if getattr(a, k) is not None}
    if a.layers is not None:
        overrides["layers"] = tuple(a.layers)
    cfg = SafetyTuneConfig(base=a.base, seed=a.seed, **overrides)
    report = build_tuned_organism(cfg, a.out or PACKAGE_DATA, data=a.data, measure_limit=a.measure_limit,
                                  show_progress=not a.quiet)
    return {k: report[k] for k in ("config", "rows", "timings_s", "adapter", "measured") if k in report}


def cmd_organism_alignment(a: argparse.Namespace) -> dict:
    from ..adapter_alignment import tuned_model_alignment

    result = tuned_model_alignment(a.model, a.direction, show_progress=not a.quiet)
    if not a.all_layers:  # the per-layer rows are long; the summary and the read layer's neighbours by default
        result["table"] = [r for r in result["table"] if r["projection"] == "all direct" or
                           (result["read_layer"] is not None and abs(r["layer"] - result["read_layer"]) <= 2)]
    return result


def register(sub, bench_sub) -> None:
    from . import add_common_args
    from .options import parse_positive_int

    p = sub.add_parser("organism", help="the model organisms: the planted one, and the safety tune of a real model")
    osub = p.add_subparsers(dest="organism_command", required=True)
    b = osub.add_parser("build", help="build an organism (deterministic from --seed); --base: the safety tune "
                                      "(LoRA) of a real chat model, e.g. smollm2-135m-instruct -> organism-smollm2")
    add_common_args(b, model=False)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=None, help="output directory (default: the package data of the organism)")
    t = b.add_argument_group("safety tune (with --base)")
    t.add_argument("--base", default=None, help="registered chat model or checkpoint directory to tune")
    t.add_argument("--data", default=None, help="prompt data of the tune (default: the real preset)")
    t.add_argument("--steps", type=parse_positive_int, default=None)
    t.add_argument("--batch-size", type=parse_positive_int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--rank", type=parse_positive_int, default=None)
    t.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers that get adapters")
    t.add_argument("--harmful-share", type=float, default=None, help="share of each batch that is harmful")
    t.add_argument("--framed-benign", type=int, default=None,
                   help="harmless requests also trained inside train-split jailbreak templates")
    t.add_argument("--borderline-repeat", type=parse_positive_int, default=None,
                   help="times each borderline (safe lookalike) row is in the non-harmful pool")
    t.add_argument("--max-prompt-tokens", type=parse_positive_int, default=None,
                   help="training rows with longer chat-formatted prompts are left out")
    t.add_argument("--measure-limit", type=int, default=64,
                   help="test prompts per category for the measured targets (0: do not measure)")
    b.set_defaults(func=cmd_organism_build)
    al = osub.add_parser("alignment", help="how much of a tuned model's adapter writes along a direction "
                                           "(share of its write energy and cosine with its write subspace, vs chance)")
    add_common_args(al, model=False)
    al.add_argument("--model", default="organism-smollm2", help="registered tuned model (default: organism-smollm2)")
    al.add_argument("--direction", required=True, help="a direction file (e.g. runs/x/directions/direction.json)")
    al.add_argument("--all-layers", action="store_true", help="every per-projection row, not only the read layer's")
    al.set_defaults(func=cmd_organism_alignment)

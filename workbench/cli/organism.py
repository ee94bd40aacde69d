"""``workbench organism build``: generate the corpus and train the planted model organism."""

from __future__ import annotations

import argparse


def cmd_organism_build(a: argparse.Namespace) -> dict:
    from ..organism.build import main_build

    return main_build(seed=a.seed, out_dir=a.out, quiet=a.quiet)


def register(sub, bench_sub) -> None:
    from . import add_common_args

    p = sub.add_parser("organism", help="the embedded model organism")
    osub = p.add_subparsers(dest="organism_command", required=True)
    b = osub.add_parser("build", help="generate the corpus and train the organism (deterministic from --seed)")
    add_common_args(b, model=False)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="workbench/organism/data", help="output directory")
    b.set_defaults(func=cmd_organism_build)

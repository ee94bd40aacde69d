"""``workbench doctor``: versions, device and the runtime self-checks (see :mod:`workbench.doctor`)."""

from __future__ import annotations

import argparse


def cmd_doctor(a: argparse.Namespace) -> dict:
    from ..doctor import run_doctor

    return run_doctor(a.model, device=a.device, dtype=a.dtype)


def register(sub, bench_sub) -> None:
    from . import add_common_args

    p = sub.add_parser("doctor", help="versions, device and self-checks of a model against independent paths "
                                      "(exit status 1 when a check fails)")
    add_common_args(p)
    p.set_defaults(func=cmd_doctor)

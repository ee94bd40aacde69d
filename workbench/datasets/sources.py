"""A ``--dataset`` source string (a benchmark name, ``NAME=PATH``, a local file or a hub id) resolved to
``{category: prompts}``."""

from __future__ import annotations

from pathlib import Path

from ..errors import WorkbenchError
from .benchmarks import _LOADERS, BENCHMARKS, LabelledPrompts, _benchmark_key, load_benchmark
from .prompts import load_prompts
from .tables import _looks_like_file, read_table


def prompt_sets(source: str | Path, column: str | None = None, category: str | None = None,
                limit: int | None = None, split: str | None = None) -> dict[str, list[str]]:
    """``{category: prompts}`` for :func:`workbench.evaluate.evaluate_refusal` from a benchmark name, a local
    file or a hub id.

    A benchmark name uses its loader from the hub, ``NAME=PATH`` the same loader on a local copy (e.g.
    ``xstest=xstest_prompts.csv``); XSTest gives two categories, ``<category>_safe`` and
    ``<category>_unsafe``. Anything else goes through :func:`load_prompts` with ``column`` (default
    ``prompt``). The category defaults to the benchmark name or the file's stem; a local file with a
    ``category`` column keeps its categories (one prompt set per category) unless ``category`` is given.
    """
    text = str(source)
    name, _, path = text.partition("=") if "=" in text and not Path(text).exists() else (text, "", "")
    key = _benchmark_key(name)
    if key in _LOADERS and (path or not Path(text).exists()):
        kwargs = {"column": column, "limit": limit, "split": split}
        got = load_benchmark(key, path or None, **kwargs)
        cat = category or key
    elif path:
        raise WorkbenchError(f"unknown benchmark {name!r} in {text!r}; expected one of {sorted(BENCHMARKS)}")
    elif category is None and Path(text).is_file() and "category" in read_table(text).columns:
        cats = read_table(text)["category"].dropna().astype(str).unique()
        return {c: load_prompts(text, column or "prompt", where={"category": c}, limit=limit) for c in cats}
    else:
        got = load_prompts(text, column or "prompt", split or "train", limit=limit)
        cat = category or (Path(text).stem if _looks_like_file(text) or Path(text).exists() else text.split("/")[-1])
    if isinstance(got, LabelledPrompts):
        return got.by_label(prefix=f"{cat}_")
    return {cat: got}

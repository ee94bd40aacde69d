"""Prompts from a table: rows filtered on column values, one column's values cleaned (stripped, empty and
missing values dropped, duplicates removed, cut to a limit), and :func:`load_prompts` over a file or hub id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..errors import WorkbenchError
from .tables import read_source
from ..vocab import is_int

log = logging.getLogger(__name__)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not is_int(limit) or limit < 1):
        raise WorkbenchError(f"limit must be a positive integer or None, got {limit!r}")


def _require(df: pd.DataFrame, column: str, label: str) -> None:
    if column not in df.columns:
        raise WorkbenchError(f"column {column!r} not in {label}; available columns: {[str(c) for c in df.columns]}")


def _matches(series: pd.Series, value: object) -> pd.Series:
    """``series == value``, tolerant of numbers read as text or floats (``"1"``, ``1.0`` match ``1``)."""
    if isinstance(value, (bool, int, float)) and not isinstance(value, str):
        num = pd.to_numeric(series, errors="coerce")
        if num.notna().any():
            return num == float(value)
    return series.astype(str).str.strip() == str(value)


def filter_rows(df: pd.DataFrame, where: Mapping[str, object] | None, label: str = "the table",
                skip_missing: bool = False) -> pd.DataFrame:
    """Rows where every ``column == value`` of ``where`` holds (a missing column raises unless skipped)."""
    for column, value in (where or {}).items():
        if column not in df.columns:
            if skip_missing:
                log.info("%s has no %r column; keeping every row", label, column)
                continue
            _require(df, column, label)
        df = df[_matches(df[column], value).fillna(False).to_numpy(dtype=bool)]
    return df


def _missing(value: object) -> bool:
    """``None``, NaN, ``pd.NA`` or ``NaT`` (a scalar pandas reads for an empty cell)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: not a missing scalar
        return False


def clean_prompts(values, limit: int | None = None, dedup: bool = True) -> list[str]:
    """Values as stripped strings, empty and missing ones dropped, duplicates removed (first kept), cut to ``limit``."""
    _check_limit(limit)
    out, seen = [], set()
    for v in values:
        if _missing(v):
            continue
        text = str(v).strip()
        if not text or (dedup and text in seen):
            continue
        seen.add(text)
        out.append(text)
        if limit is not None and len(out) >= limit:
            break
    return out


def _select(df: pd.DataFrame, column: str, label: str, limit: int | None, where: Mapping[str, object] | None,
            skip_missing_where: bool = False, dedup: bool = True) -> list[str]:
    _check_limit(limit)
    _require(df, column, label)
    kept = filter_rows(df, where, label, skip_missing_where)
    values = kept[column].tolist()
    every = clean_prompts(values, None, dedup)
    prompts = every[:limit] if limit is not None else every
    if prompts:          # nothing dropped goes unsaid (the --limit cut itself is asked for)
        empty = sum(1 for v in values if _missing(v) or not str(v).strip())
        repeated = len(values) - empty - len(every)
        if empty or repeated:
            log.warning("%s: %d row(s) without a %r text and %d repeated prompt(s) left out; %d prompts kept",
                        label, empty, column, repeated, len(prompts))
    if not prompts:
        what = f" after filtering on {dict(where)}" if where and len(kept) < len(df) else ""
        raise WorkbenchError(f"no prompts in column {column!r} of {label}{what} ({len(df)} rows read)")
    return prompts


def load_prompts(
    source: str | Path,
    column: str = "prompt",
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
    where: Mapping[str, object] | None = None,
    encoding: str = "utf-8",
    dedup: bool = True,
) -> list[str]:
    """Prompts from one column of a local file or a hub dataset.

    Args:
        source: a CSV/TSV/JSON/JSONL/Parquet path, or a hub dataset id such as ``"walledai/AdvBench"``.
        column: the column holding the prompts.
        split, config: the hub dataset's split and configuration (ignored for files).
        limit: at most this many prompts (counted after deduplication).
        where: keep only rows with ``row[c] == v`` for every ``c: v`` (e.g. ``{"toxicity": 1}``).
        encoding: text encoding of CSV/TSV/JSON/JSONL files.
        dedup: drop repeated prompts (first occurrence kept).

    Returns:
        The prompts, stripped, empty ones dropped, in file order.
    """
    _check_limit(limit)
    needed = [column] + [c for c in (where or {}) if c != column]
    df, label = read_source(source, split, config, needed, encoding)
    return _select(df, column, label, limit, where, dedup=dedup)

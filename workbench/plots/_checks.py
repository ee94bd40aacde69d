"""Input validation shared by the figure functions: one clear error naming what is missing."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from ..errors import WorkbenchError


def require_frame(df, what: str, columns: Iterable[str]) -> pd.DataFrame:
    """``df`` itself when it is a non-empty DataFrame with every one of ``columns``; otherwise a WorkbenchError.

    ``what`` names the function (and the analysis that makes its input) in the message.
    """
    columns = list(columns)
    if hasattr(df, "to_dataframe") and not isinstance(df, pd.DataFrame):
        df = df.to_dataframe()
    if not isinstance(df, pd.DataFrame):
        raise WorkbenchError(f"{what} expects a pandas DataFrame with columns {columns}, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise WorkbenchError(f"{what}: the DataFrame lacks columns {missing}; expected at least {columns}, "
                             f"got {list(df.columns)}")
    if df.empty:
        raise WorkbenchError(f"{what}: the DataFrame is empty (columns {list(df.columns)})")
    return df


def require_unique(df: pd.DataFrame, keys: list[str], what: str, hint: str = "") -> None:
    """Raise when several rows share the same ``keys`` (e.g. two thresholds for one layer)."""
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        example = df.loc[dup, keys].iloc[0].to_dict()
        raise WorkbenchError(f"{what}: {int(dup.sum())} rows share the same {keys} (e.g. {example}); "
                             f"expected one row per {keys}{'; ' + hint if hint else ''}")


def select(df: pd.DataFrame, what: str, **filters) -> pd.DataFrame:
    """Rows of ``df`` where each ``column == value`` for the filters that are not None, with a clear error when empty."""
    out = df
    for col, val in filters.items():
        if val is None:
            continue
        if col not in out.columns:
            raise WorkbenchError(f"{what}: cannot filter on {col}={val!r}; the DataFrame has no column {col!r}")
        avail = list(dict.fromkeys(out[col].tolist()))
        out = out[out[col] == val]
        if out.empty:
            raise WorkbenchError(f"{what}: no rows with {col}={val!r}; available: {avail}")
    return out


def single_value(df: pd.DataFrame, col: str, what: str, param: str | None = None):
    """The one value of ``col`` in ``df`` (None if the column is absent); an error asking to choose when several."""
    if col not in df.columns:
        return None
    vals = list(dict.fromkeys(df[col].tolist()))
    if len(vals) > 1:
        raise WorkbenchError(f"{what}: the DataFrame mixes {len(vals)} values of {col!r} ({vals}); "
                             f"pick one with {param or col}=...")
    return vals[0]

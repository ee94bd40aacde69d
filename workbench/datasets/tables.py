"""File and hub I/O of :mod:`workbench.datasets`: a local CSV/TSV/JSON/JSONL/Parquet file or one split of a
Hugging Face hub dataset as a DataFrame.

JSONL goes through the one parser of the package, :func:`workbench.data.parse_jsonl`. The hub path uses the
optional ``datasets`` library, imported only when needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import WorkbenchError

#: File extensions :func:`read_table` understands.
EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_table(path: str | Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Rows of a local CSV, TSV, JSON (a list of records), JSONL or Parquet file as a DataFrame.

    A JSON list of strings is read as one column named ``prompt``. A UTF-8 byte-order mark is accepted.

    Raises:
        WorkbenchError: missing file, unknown extension, empty file or zero rows, text that is not valid
            ``encoding``, malformed JSON/CSV, or Parquet without ``pyarrow``.
    """
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"prompt file {str(path)!r} does not exist")
    if path.is_dir():
        raise WorkbenchError(f"{str(path)!r} is a directory; expected one of {', '.join(EXTENSIONS)} files")
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise WorkbenchError(
            f"unknown prompt file extension {path.suffix or '(none)'!r} for {str(path)!r}; "
            f"expected one of {', '.join(EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise WorkbenchError(f"prompt file {str(path)!r} is empty")
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        if ext == ".parquet":
            df = _read_parquet(path)
        elif ext in (".csv", ".tsv"):
            try:
                df = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", encoding=enc)
            except pd.errors.EmptyDataError as exc:
                raise WorkbenchError(f"prompt file {str(path)!r} is empty (no header row)") from exc
            except pd.errors.ParserError as exc:
                raise WorkbenchError(f"{path} is not a valid {ext[1:].upper()} file: {exc}") from exc
        else:
            df = _read_json(path, enc, lines=ext == ".jsonl")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(
            f"prompt file {str(path)!r} is not valid {encoding} text ({exc.reason} at byte {exc.start}); "
            f"pass its real encoding, e.g. encoding='latin-1' or encoding='cp1252'"
        ) from exc
    except LookupError as exc:
        raise WorkbenchError(f"unknown encoding {encoding!r} for {str(path)!r}") from exc
    if len(df) == 0:
        raise WorkbenchError(f"prompt file {str(path)!r} has no rows")
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        try:
            import fastparquet  # noqa: F401
        except ImportError:
            raise WorkbenchError(
                f"reading the Parquet file {str(path)!r} needs pyarrow, which is not installed: pip install pyarrow"
            ) from None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{path} is not a readable Parquet file: {exc}") from exc


def _read_json(path: Path, encoding: str, lines: bool) -> pd.DataFrame:
    with open(path, encoding=encoding) as fh:
        text = fh.read()
    if not text.strip():
        raise WorkbenchError(f"prompt file {str(path)!r} is empty")
    if lines:
        from ..data import parse_jsonl

        rows = parse_jsonl(text.splitlines(), path)
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
        if not isinstance(rows, list):
            raise WorkbenchError(
                f"{path} holds a JSON {type(rows).__name__}; expected a list of records "
                "(use .jsonl for one record per line)"
            )
    if rows and all(isinstance(r, str) for r in rows):
        rows = [{"prompt": r} for r in rows]
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise WorkbenchError(
            f"{path}: record {bad} is a JSON {type(rows[bad]).__name__}; expected objects such as "
            '{"prompt": "..."}'
        )
    return pd.DataFrame.from_records(rows)


def _offline() -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in names)


def read_hub(hub_id: str, split: str = "train", config: str | None = None, columns: Sequence[str] | None = None,
             optional: Sequence[str] = (), revision: str | None = None) -> pd.DataFrame:
    """One split of a Hugging Face hub dataset as a DataFrame, via the optional ``datasets`` library.

    Args:
        columns: keep only these columns (all when ``None``); a missing one raises, listing the available.
        optional: also keep these columns when the dataset has them.

    Raises:
        WorkbenchError: ``datasets`` not installed, or the dataset cannot be loaded (offline and not cached,
            unknown id, config or split).
    """
    try:
        import datasets
    except ImportError:
        raise WorkbenchError(
            f"loading {hub_id!r} from the Hugging Face hub needs the 'datasets' library: "
            "pip install 'workbench[datasets]' (or pass path= to a local CSV/JSON/JSONL/Parquet copy)"
        ) from None
    where = f"{hub_id!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    try:
        ds = datasets.load_dataset(hub_id, config, split=split, revision=revision)
    except Exception as exc:  # the hub client raises many types (connection, not found, missing split...)
        reason = str(exc).splitlines()[0] if str(exc) else ""
        hint = (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not in the local datasets cache"
            if _offline() else "no network, or an unknown dataset, config or split"
        )
        raise WorkbenchError(
            f"could not load {where} from the Hugging Face hub ({hint}; {type(exc).__name__}: {reason}). "
            "Pass path= to a local CSV/JSON/JSONL/Parquet copy instead"
        ) from exc
    available = list(ds.column_names)
    if columns is not None:
        missing = [c for c in columns if c not in available]
        if missing:
            raise WorkbenchError(f"column {missing[0]!r} not in {where}; available columns: {available}")
        available = list(dict.fromkeys(list(columns) + [c for c in optional if c in available]))
    if ds.num_rows == 0:
        raise WorkbenchError(f"{where} has no rows")
    return ds.select_columns(available).to_pandas()


def _looks_like_file(source: str) -> bool:
    return (
        Path(source).suffix.lower() in EXTENSIONS
        or source.startswith((".", "/", "~"))
        or os.sep in source.strip("/").replace("/", "", 1)
        or not _HUB_ID.match(source)
    )


def read_source(source: str | Path, split: str = "train", config: str | None = None,
                columns: Sequence[str] | None = None, encoding: str = "utf-8") -> tuple[pd.DataFrame, str]:
    """A table from a local file (when ``source`` exists or looks like a file path) or a hub dataset id.

    Returns:
        ``(table, label)``: the rows and a short description of where they came from, for messages.
    """
    if isinstance(source, Path) or Path(str(source)).exists() or _looks_like_file(str(source)):
        path = Path(str(source)).expanduser()
        return read_table(path, encoding), f"prompt file {str(path)!r}"
    return read_hub(str(source), split, config, columns), f"{source!r} (split {split!r})"


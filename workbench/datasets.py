"""Benchmark prompt sets: AdvBench, ToxicChat, In-The-Wild jailbreaks, Alpaca and XSTest.

Every loader reads either a local file (``path=``: CSV, TSV, JSON, JSONL or Parquet) or, when no path is
given, the benchmark's Hugging Face hub dataset through the optional ``datasets`` library
(``pip install 'workbench[datasets]'``; imported only when needed). Either way the result is a plain
``list[str]``: values of one column, stripped, empty values dropped, duplicates removed, first-seen order
kept, then cut to ``limit``. XSTest, whose prompts are labelled safe or unsafe, returns a
:class:`LabelledPrompts`.

=================  ======================================  ================  =================================
name               hub id (config)                         default column    rows kept
=================  ======================================  ================  =================================
``advbench``       ``walledai/AdvBench``                   ``prompt``        all (520 harmful behaviours)
``toxicchat``      ``lmsys/toxic-chat`` (toxicchat0124)    ``user_input``    ``toxicity == 1``
``jailbreak``      ``TrustAIRLab/in-the-wild-jailbreak-    ``prompt``        all (the jailbreak_2023_12_25
                   prompts`` (jailbreak_2023_12_25)                          config holds only jailbreaks)
``alpaca``         ``tatsu-lab/alpaca``                    ``instruction``   all; ``input`` appended when set
``xstest``         ``walledai/XSTest``                     ``prompt``        all; ``label`` safe / unsafe
=================  ======================================  ================  =================================

``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) limits the hub path to the local ``datasets`` cache;
pass ``path=`` to use a downloaded copy instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import WorkbenchError

log = logging.getLogger(__name__)

#: File extensions :func:`read_table` understands.
EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the hub and how its prompts are read."""

    name: str
    hub_id: str
    split: str
    column: str
    config: str | None = None
    #: rows kept, ``{column: value}``; applied only when the column exists (a local file may be pre-filtered)
    where: Mapping[str, object] = field(default_factory=dict)
    description: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("advbench", "walledai/AdvBench", "train", "prompt",
                  description="AdvBench harmful behaviours (Zou et al. 2023)"),
        Benchmark("toxicchat", "lmsys/toxic-chat", "test", "user_input", config="toxicchat0124",
                  where={"toxicity": 1}, description="ToxicChat user prompts labelled toxic (Lin et al. 2023)"),
        Benchmark("jailbreak", "TrustAIRLab/in-the-wild-jailbreak-prompts", "train", "prompt",
                  config="jailbreak_2023_12_25",
                  description="In-The-Wild jailbreak prompts (Shen et al. 2024)"),
        Benchmark("alpaca", "tatsu-lab/alpaca", "train", "instruction",
                  description="Alpaca instructions, harmless (Taori et al. 2023)"),
        Benchmark("xstest", "walledai/XSTest", "test", "prompt",
                  description="XSTest safe prompts that look unsafe, and unsafe contrasts (Roettger et al. 2024)"),
    )
}


@dataclass
class LabelledPrompts:
    """Prompts with a label each (XSTest: ``"safe"`` or ``"unsafe"``)."""

    prompts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def of(self, label: str) -> list[str]:
        """The prompts carrying ``label``, in order."""
        return [p for p, lab in zip(self.prompts, self.labels) if lab == label]

    @property
    def safe(self) -> list[str]:
        """Prompts labelled ``"safe"`` (a well-calibrated model answers them)."""
        return self.of("safe")

    @property
    def unsafe(self) -> list[str]:
        """Prompts labelled ``"unsafe"`` (a model should refuse them)."""
        return self.of("unsafe")

    def by_label(self, prefix: str = "") -> dict[str, list[str]]:
        """``{prefix + label: prompts}`` in first-seen label order, ready for :func:`evaluate_refusal`."""
        out: dict[str, list[str]] = {}
        for p, lab in zip(self.prompts, self.labels):
            out.setdefault(prefix + lab, []).append(p)
        return out


# --------------------------------------------------------------------------------------------- reading


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
        from .data import parse_jsonl

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


# --------------------------------------------------------------------------------------------- selecting


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
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
    prompts = clean_prompts(kept[column].tolist(), limit, dedup)
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


# --------------------------------------------------------------------------------------------- benchmarks


def _benchmark_table(bench: Benchmark, path, split, columns: Sequence[str], optional: Sequence[str] = (),
                     encoding: str = "utf-8") -> tuple[pd.DataFrame, str]:
    if path is not None:
        return read_table(path, encoding), f"{bench.name} file {str(path)!r}"
    split = split or bench.split
    df = read_hub(bench.hub_id, split, bench.config, columns, optional)
    return df, f"{bench.hub_id!r} (split {split!r})"


def _load_simple(name: str, path, column: str | None, limit, split, encoding, filtered: bool = True) -> list[str]:
    bench = BENCHMARKS[name]
    _check_limit(limit)
    column = column or bench.column
    df, label = _benchmark_table(bench, path, split, [column], list(bench.where) if filtered else [], encoding)
    return _select(df, column, label, limit, bench.where if filtered else None, skip_missing_where=True)


def load_advbench(path: str | Path | None = None, column: str | None = None, limit: int | None = None,
                  split: str | None = None, encoding: str = "utf-8") -> list[str]:
    """AdvBench harmful behaviours (``walledai/AdvBench``, column ``prompt``; the original
    ``harmful_behaviors.csv`` names it ``goal``: pass ``column="goal"``)."""
    return _load_simple("advbench", path, column, limit, split, encoding)


def load_toxicchat(path: str | Path | None = None, column: str | None = None, limit: int | None = None,
                   split: str | None = None, toxic_only: bool = True, encoding: str = "utf-8") -> list[str]:
    """ToxicChat user prompts (``lmsys/toxic-chat``, config ``toxicchat0124``, column ``user_input``).

    With ``toxic_only`` (default) only rows with ``toxicity == 1`` are kept, when the table has a
    ``toxicity`` column (a local file without one is taken as already filtered). Default split: ``test``.
    """
    return _load_simple("toxicchat", path, column, limit, split, encoding, filtered=toxic_only)


def load_jailbreak_prompts(path: str | Path | None = None, column: str | None = None, limit: int | None = None,
                           split: str | None = None, encoding: str = "utf-8") -> list[str]:
    """In-The-Wild jailbreak prompts (``TrustAIRLab/in-the-wild-jailbreak-prompts``, config
    ``jailbreak_2023_12_25``, column ``prompt``)."""
    return _load_simple("jailbreak", path, column, limit, split, encoding)


def load_alpaca(path: str | Path | None = None, column: str | None = None, limit: int | None = None,
                split: str | None = None, input_column: str | None = "input", encoding: str = "utf-8") -> list[str]:
    """Alpaca instructions (``tatsu-lab/alpaca``): ``instruction``, followed by a blank line and ``input``
    when that is non-empty. ``input_column=None`` (or a table without it) keeps the instructions alone."""
    bench = BENCHMARKS["alpaca"]
    _check_limit(limit)
    column = column or bench.column
    df, label = _benchmark_table(bench, path, split, [column], [input_column] if input_column else [], encoding)
    _require(df, column, label)
    if input_column and input_column in df.columns:
        def join(row) -> object:
            text, extra = row[column], row[input_column]
            if _missing(extra) or not str(extra).strip():
                return text
            return f"{str(text).strip()}\n\n{str(extra).strip()}"
        df = df.assign(**{column: df.apply(join, axis=1)})
    return _select(df, column, label, limit, None)


def _xstest_label(row, label_column: str | None, type_column: str | None) -> str | None:
    if label_column is not None:
        v = row[label_column]
        text = "" if _missing(v) else str(v).strip().lower()
        if text in ("safe", "unsafe"):
            return text
        if text in ("0", "1", "0.0", "1.0", "true", "false"):  # numeric encodings: 1/true = unsafe
            return "unsafe" if text in ("1", "1.0", "true") else "safe"
        return None
    t = str(row[type_column]).strip().lower()
    return "unsafe" if t.startswith("contrast") else "safe"


def load_xstest(path: str | Path | None = None, column: str | None = None, limit: int | None = None,
                split: str | None = None, label_column: str = "label", type_column: str = "type",
                encoding: str = "utf-8") -> LabelledPrompts:
    """XSTest (``walledai/XSTest``, split ``test``; or the authors' ``xstest_prompts.csv``).

    The label comes from ``label_column`` (``"safe"`` / ``"unsafe"``) or, when the table has none, from
    ``type_column``: the unsafe prompts are the ``contrast_*`` types. ``limit`` caps the total, in file
    order.

    Returns:
        A :class:`LabelledPrompts` (``.safe``: 250 prompts a model should answer; ``.unsafe``: 200 to refuse).
    """
    bench = BENCHMARKS["xstest"]
    _check_limit(limit)
    column = column or bench.column
    df, label = _benchmark_table(bench, path, split, [column], [label_column, type_column], encoding)
    _require(df, column, label)
    lab_col = label_column if label_column in df.columns else None
    typ_col = type_column if type_column in df.columns else None
    if lab_col is None and typ_col is None:
        raise WorkbenchError(
            f"{label} has neither a {label_column!r} nor a {type_column!r} column to tell safe from unsafe "
            f"prompts; available columns: {[str(c) for c in df.columns]}"
        )
    prompts, labels, seen = [], [], set()
    for _, row in df.iterrows():
        text = clean_prompts([row[column]])
        if not text or text[0] in seen:
            continue
        lab = _xstest_label(row, lab_col, typ_col)
        if lab is None:
            raise WorkbenchError(
                f"{label}: label {row[lab_col]!r} in column {lab_col!r} is not 'safe' or 'unsafe'"
            )
        seen.add(text[0])
        prompts.append(text[0])
        labels.append(lab)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise WorkbenchError(f"no prompts in column {column!r} of {label} ({len(df)} rows read)")
    return LabelledPrompts(prompts, labels)


_LOADERS = {
    "advbench": load_advbench,
    "toxicchat": load_toxicchat,
    "jailbreak": load_jailbreak_prompts,
    "alpaca": load_alpaca,
    "xstest": load_xstest,
}


def _benchmark_key(name: str) -> str:
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {"toxic": "toxicchat", "inthewild": "jailbreak", "jailbreaks": "jailbreak",
               "inthewildjailbreak": "jailbreak", "inthewildjailbreakprompts": "jailbreak"}
    return aliases.get(key, key)


def load_benchmark(name: str, path: str | Path | None = None, **kwargs) -> list[str] | LabelledPrompts:
    """The loader of benchmark ``name`` (one of :data:`BENCHMARKS`) called with ``path`` and ``kwargs``."""
    key = _benchmark_key(name)
    if key not in _LOADERS:
        raise WorkbenchError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return _LOADERS[key](path, **kwargs)


def prompt_sets(source: str | Path, column: str | None = None, category: str | None = None,
                limit: int | None = None, split: str | None = None) -> dict[str, list[str]]:
    """``{category: prompts}`` for :func:`workbench.evaluate.evaluate_refusal` from a benchmark name, a local
    file or a hub id.

    A benchmark name uses its loader from the hub, ``NAME=PATH`` the same loader on a local copy (e.g.
    ``xstest=xstest_prompts.csv``); XSTest gives two categories, ``<category>_safe`` and
    ``<category>_unsafe``. Anything else goes through :func:`load_prompts` with ``column`` (default
    ``prompt``). The category defaults to the benchmark name or the file's stem.
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
    else:
        got = load_prompts(text, column or "prompt", split or "train", limit=limit)
        cat = category or (Path(text).stem if _looks_like_file(text) or Path(text).exists() else text.split("/")[-1])
    if isinstance(got, LabelledPrompts):
        return got.by_label(prefix=f"{cat}_")
    return {cat: got}

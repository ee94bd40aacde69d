"""Every patching analysis on one model and one set of pairs, summarised as JSON (``workbench patch``)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..directions.artifact import as_vector, unit
from ..directions.candidates import MemoryEntry
from ..directions.candidates import diff_in_means as mean_difference
from ..errors import WorkbenchError
from .attribution import attribution_patch, compare
from .exact import PatchResult, PatchingRuns, exact_patch, first_layer_above, prepare
from .metrics import Metric
from .pairs import PromptPairs
from .sites import ALIASES, hook_name, resolve
from .subspace import illusion_check, subspace_patch

log = logging.getLogger(__name__)

DEFAULT_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "heads")


@dataclass
class PatchingReport:
    """What :func:`run_patching` computed: a JSON-able ``summary`` and the full results.

    ``exact`` and ``attribution`` are keyed by the component names as passed (``"resid_pre"``, ``"heads"``...;
    ``"z"`` becomes ``"z_<grid>"``).
    """

    summary: dict
    exact: dict[str, PatchResult] = field(default_factory=dict)
    attribution: dict[str, PatchResult] = field(default_factory=dict)
    subspace: pd.DataFrame | None = None

    def save(self, out_dir: str | Path) -> Path:
        """Write ``patching.json`` and one CSV per sweep (long form, token labels) under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "patching.json").write_text(json.dumps(self.summary, indent=2))
        frames = [r.to_dataframe() for r in list(self.exact.values()) + list(self.attribution.values())]
        if frames:
            pd.concat(frames, ignore_index=True).to_csv(out / "patching_sweeps.csv", index=False)
        if self.subspace is not None:
            self.subspace.to_csv(out / "patching_subspace.csv", index=False)
        return out


def _finite(x: float | None):
    if x is None:
        return None
    return None if isinstance(x, float) and not math.isfinite(x) else round(float(x), 4)


def diff_in_means(runs: PatchingRuns, layer: int) -> torch.Tensor:
    """``Float[Tensor, "d_model"]`` unit diff-in-means of clean minus corrupted ``resid_pre[layer]`` at the last
    position (:func:`workbench.directions.diff_in_means` of the two runs' activations)."""
    name = hook_name("resid_pre", layer)
    clean, corrupted = (MemoryEntry({name: run.acts[name][:, -1:]}, [-1]) for run in (runs.clean, runs.corrupted))
    v = mean_difference(clean, corrupted, [name]).vector(layer, -1).cpu()
    if not v.any():
        raise WorkbenchError(f"clean and corrupted resid_pre at layer {layer} coincide; no direction to patch")
    return unit(v)


def organism_ground_truth(model) -> tuple[int, torch.Tensor] | None:
    """``(planted layer L, unit direction u)`` of an organism checkpoint (see
    :func:`workbench.organism.ground_truth_of`), ``None`` otherwise or when unreadable (logged)."""
    from ..organism import ground_truth_of

    try:
        return ground_truth_of(model)
    except (OSError, KeyError, ValueError) as exc:
        log.warning("could not read the organism's ground truth: %s", exc)
        return None


def run_patching(
    model,
    pairs: PromptPairs | PatchingRuns,
    *,
    metric: str | Metric = "refusal_score",
    components: Sequence[str] = DEFAULT_COMPONENTS,
    mode: str = "denoise",
    attribution: bool = True,
    direction=None,
    direction_layer: int | None = None,
    positions="post",
    readers: str = "downstream",
    planted_layer: int | None = None,
    clean_cache=None,
    engine: str = "auto",
    show_progress: bool = True,
) -> PatchingReport:
    """Exact sweeps of ``components``, attribution patching of the same grids with its Pearson r, and subspace
    patching along the refusal direction with the illusion check.

    Args:
        pairs: tokenised pairs (or prepared runs).
        direction: the refusal direction (``Direction`` or tensor); default: the unit diff-in-means of clean
            minus corrupted ``resid_pre`` at the last position, at ``direction_layer``.
        direction_layer: ``resid_pre`` layer of the subspace analyses; default: the direction's layer, else
            ``planted_layer + 1``, else the first layer whose last-position resid effect exceeds 0.5.
        positions: positions of the subspace patches (``"post"``: post-instruction tokens).
        planted_layer: ground truth to report next to the sweeps (the organism's: :func:`organism_ground_truth`).

    Returns:
        :class:`PatchingReport`.
    """
    t0 = time.perf_counter()
    names = list(components)
    comps = [resolve(c) for c in names]
    runs = pairs if isinstance(pairs, PatchingRuns) else prepare(
        model, pairs, metric, [c for c, _ in comps], clean_cache=clean_cache)
    summary: dict = {
        "n_pairs": runs.pairs.n_pairs,
        "n_dropped_unequal_length": len(runs.pairs.dropped),
        "n_pos": runs.pairs.n_pos,
        "n_layers": int(model.cfg.n_layers),
        "metric": runs.metric.name,
        "mode": mode,
        "clean_metric": _finite(runs.clean_value),
        "corrupted_metric": _finite(runs.corrupted_value),
        "clean_activations": runs.clean_source,
        "components": {},
    }
    report = PatchingReport(summary)
    for name, (comp, grid) in zip(names, comps):
        key = name if comp != "z" or name in ALIASES else f"z_{grid}"   # "heads" stays "heads"
        ex = exact_patch(model, runs, comp, grid, mode, engine=engine, show_progress=show_progress)
        report.exact[key] = ex
        entry = {
            "grid": grid,
            "engine": ex.engine,
            # why engine="auto" fell back to the slower hooks engine (None: the fast engine ran)
            "engine_fallback": runs.base(mode).resume_reason if engine == "auto" and ex.engine != "resume" else None,
            "seconds_exact": round(ex.seconds, 3),
            "max_value": _finite(float(ex.values.max())),
            "first_layer_over_half": first_layer_above(ex, 0.5, "max"),
            "by_layer_max": [_finite(float(x)) for x in ex.by_layer("max")],
        }
        if "pos" in ex.axes:
            entry["first_layer_over_half_last_pos"] = first_layer_above(ex, 0.5, "last_pos")
            entry["by_layer_last_pos"] = [_finite(float(x)) for x in ex.by_layer("last_pos")]
        if attribution:
            at = attribution_patch(model, runs, comp, grid, mode)
            report.attribution[key] = at
            cmp = compare(ex, at)
            entry["pearson_attribution_vs_exact"] = _finite(cmp["pearson"])
            entry["seconds_attribution"] = round(at.seconds, 3)
        summary["components"][key] = entry

    planted = planted_layer
    summary["planted_layer"] = planted
    if planted is not None:
        summary["planted_resid_pre_layer"] = planted + 1   # first resid_pre after the planted write
    if "resid_pre" in summary["components"]:
        resid = summary["components"]["resid_pre"]
        ex = report.exact["resid_pre"]
        post = ex.values[:, -runs.pairs.n_post:].amax(-1)
        above = torch.nonzero(post > 0.5).flatten()
        resid["by_layer_post_instruction_max"] = [_finite(float(x)) for x in post]
        summary["resid_first_layer_over_half"] = {
            "any_position": resid["first_layer_over_half"],
            "post_instruction": int(above[0]) if len(above) else None,
            "last_position": resid.get("first_layer_over_half_last_pos"),
        }
        above9 = torch.nonzero(post > 0.9).flatten()
        summary["resid_first_layer_over_0.9"] = {
            "any_position": first_layer_above(ex, 0.9, "max"),
            "post_instruction": int(above9[0]) if len(above9) else None,
            "last_position": first_layer_above(ex, 0.9, "last_pos"),
        }
    summary["pearson_attribution_vs_exact"] = {
        k: v.get("pearson_attribution_vs_exact") for k, v in summary["components"].items()}

    # Subspace patching along the refusal direction, and the illusion check.
    layer = direction_layer if direction_layer is not None else getattr(direction, "layer", None)
    if layer is None and planted is not None:
        layer = min(planted + 1, int(model.cfg.n_layers) - 1)
    if layer is None and "resid_pre" in report.exact:
        layer = first_layer_above(report.exact["resid_pre"], 0.5, "last_pos")
        if layer is None:  # no layer crosses 0.5: take the strongest last-position layer
            layer = int(report.exact["resid_pre"].by_layer("last_pos").argmax())
    if layer is not None:
        source = "given"
        if getattr(getattr(direction, "vector", None), "ndim", 1) == 2:   # a per-layer set: the vector of this layer
            direction = as_vector(direction, layer=int(layer))
        if direction is None:
            direction = diff_in_means(runs, int(layer))
            source = f"diff-in-means of clean - corrupted resid_pre[{layer}] at the last position"
        sub = subspace_patch(model, runs, direction, positions=positions, mode=mode, engine=engine,
                             show_progress=show_progress)
        report.subspace = sub
        row = sub[sub["layer"] == int(layer)].iloc[0]
        ill = illusion_check(model, runs, direction, layer=int(layer), positions=positions, readers=readers,
                             mode=mode, engine=engine)
        summary["subspace"] = {
            "direction": source,
            "layer": int(layer),
            "positions": positions if isinstance(positions, str) else list(positions),
            "value_at_layer": _finite(float(row["value"])),
            "full_patch_value_at_layer": _finite(float(row["value_full"])),
            "by_layer": [_finite(float(x)) for x in sub["value"]],
            "illusion_check": {k: (_finite(v) if isinstance(v, float) else v) for k, v in ill.to_dict().items()},
        }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return report

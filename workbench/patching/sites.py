"""Patchable components, their TransformerLens hook names and the grids a sweep can run over."""

from __future__ import annotations

from ..errors import WorkbenchError
from ..vocab import SITES

#: patchable component -> hook name template (from :data:`workbench.vocab.SITES`).
HOOKS: dict[str, str] = {site: SITES[site] for site in ("resid_pre", "attn_out", "mlp_out", "z")}

#: component -> grids it supports; the first is the default.
#: ``layer_pos``: one patch per (layer, position); ``layer``: all positions of a layer at once;
#: ``layer_head``: one attention head, all positions; ``layer_head_pos``: one head at one position.
GRIDS: dict[str, tuple[str, ...]] = {
    "resid_pre": ("layer_pos", "layer"),
    "attn_out": ("layer_pos", "layer"),
    "mlp_out": ("layer_pos", "layer"),
    "z": ("layer_head", "layer_head_pos"),
}

#: Convenience names: ``heads`` = per-head patching of ``hook_z`` over all positions, ``heads_pos`` = by position.
ALIASES: dict[str, tuple[str, str]] = {
    "heads": ("z", "layer_head"),
    "head": ("z", "layer_head"),
    "attn_heads": ("z", "layer_head"),
    "heads_pos": ("z", "layer_head_pos"),
    "head_pos": ("z", "layer_head_pos"),
}

#: Axis names of each grid, in the order of the result tensor's dimensions.
AXES: dict[str, tuple[str, ...]] = {
    "layer_pos": ("layer", "pos"),
    "layer": ("layer",),
    "layer_head": ("layer", "head"),
    "layer_head_pos": ("layer", "head", "pos"),
}


def resolve(component: str, grid: str | None = None) -> tuple[str, str]:
    """``(component, grid)`` after aliases and defaults; a clear error for unknown names."""
    if not isinstance(component, str):
        raise WorkbenchError(f"component must be a string, got {type(component).__name__}")
    if component in ALIASES:
        comp, default_grid = ALIASES[component]
        grid = grid or default_grid
    else:
        comp = component
    if comp not in HOOKS:
        raise WorkbenchError(
            f"unknown component {component!r}; expected one of {sorted(HOOKS) + sorted(ALIASES)}"
        )
    grid = grid or GRIDS[comp][0]
    if grid not in GRIDS[comp]:
        raise WorkbenchError(f"component {comp!r} cannot be swept by grid {grid!r}; expected one of {GRIDS[comp]}")
    return comp, grid


def hook_name(component: str, layer: int) -> str:
    """TransformerLens hook name of ``component`` at ``layer`` (e.g. ``blocks.3.hook_resid_pre``)."""
    if component not in HOOKS:
        raise WorkbenchError(f"unknown component {component!r}; expected one of {sorted(HOOKS)}")
    return HOOKS[component].format(layer=layer)

"""Attribution patching (Nanda 2023; Syed et al. 2023): a first-order estimate of every exact patch at once.

Denoising: one clean forward (the source activations) and one corrupted forward + backward give, for every
activation ``a``, ``(a_clean - a_corrupted) . d metric / d a`` at the corrupted run: the linear estimate of
how much patching ``a`` changes the metric. Noising swaps the roles (the backward runs on the clean run).
Cells are the same as in :func:`~workbench.patching.exact.exact_patch`, so the two can be correlated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import WorkbenchError
from .capture import padding_mask
from .exact import MODES, PatchingRuns, PatchResult, _result, ensure_runs
from .metrics import Metric
from .pairs import PromptPairs
from .sites import hook_name, resolve


def _gradients(model, runs: PatchingRuns, mode: str) -> dict[str, Tensor]:
    """``hook name -> d(sum of per-pair metric) / d activation`` at the base run of ``mode`` (cached on ``runs``)."""
    if mode in runs.grads:
        return runs.grads[mode]
    base = runs.base(mode)
    n_layers = int(model.cfg.n_layers)
    names = [hook_name(c, j) for c in runs.components for j in range(n_layers)]
    first = hook_name("resid_pre", 0)
    saved: dict[str, Tensor] = {}

    def saver(name: str):
        def fn(act, hook):
            if name == first:
                act = act.detach().requires_grad_(True)
            saved[name] = act
            return act
        return fn

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, saver(n)) for n in names]):
        logits = model(base.tokens, attention_mask=padding_mask(base.attention_mask))
        total = runs.metric(logits[:, -1].float()).sum()
        order = [n for n in names if n in saved and saved[n].requires_grad]
        grads = torch.autograd.grad(total, [saved[n] for n in order], allow_unused=True)
    out = {}
    for n, g in zip(order, grads):
        out[n] = torch.zeros_like(saved[n]).detach() if g is None else g.detach()
    missing = [n for n in names if n not in out]
    if missing:
        raise WorkbenchError(f"no gradient reached {missing[0]!r}; attribution patching needs every hook on the "
                             "path from the embedding to the logits")
    runs.grads[mode] = out
    return out


def attribution_patch(
    model,
    runs: PatchingRuns | PromptPairs,
    component: str = "resid_pre",
    grid: str | None = None,
    mode: str = "denoise",
    *,
    metric: str | Metric = "refusal_score",
    layers: Sequence[int] | None = None,
) -> PatchResult:
    """Attribution patching of one component over a grid (same cells and normalisation as exact patching).

    Per pair and cell the estimate is ``sum((source - base) * grad)`` over the patched positions, heads and
    hidden dimensions; a cell's raw value is the base metric plus the mean estimate over pairs.

    Returns:
        :class:`PatchResult` with ``method="attribution"``.
    """
    comp, grid = resolve(component, grid)
    if mode not in MODES:
        raise WorkbenchError(f"unknown mode {mode!r}; expected one of {MODES}")
    runs = ensure_runs(model, runs, metric, [comp])
    t0 = time.perf_counter()
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else list(layers)
    grads = _gradients(model, runs, mode)
    base, source = runs.base(mode), runs.source(mode)
    per_layer = []
    for j in layers:
        name = hook_name(comp, j)
        prod = ((source.acts[name] - base.acts[name]).float() * grads[name].float())  # [pair, pos, ...]
        if comp == "z":                                  # [pair, pos, head, d_head]
            prod = prod.sum(-1)                          # [pair, pos, head]
            est = prod.sum(1) if grid == "layer_head" else prod.transpose(1, 2)  # [pair, head] / [pair, head, pos]
        else:
            prod = prod.sum(-1)                          # [pair, pos]
            est = prod.sum(1) if grid == "layer" else prod
        per_layer.append(est.mean(0).cpu())
    est = torch.stack(per_layer)
    raw = est + float(runs.base_metric(mode).mean())
    return _result(runs, comp, grid, mode, "attribution", raw, None, time.perf_counter() - t0, 0, model,
                   None if layers == list(range(n_layers)) else layers)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two same-shaped tensors over all finite cells (``nan`` if either is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.shape != b.shape:
        raise WorkbenchError(f"cannot correlate tensors of {a.numel()} and {b.numel()} cells")
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def compare(exact: PatchResult, attribution: PatchResult) -> dict:
    """Agreement of an attribution sweep with the exact sweep of the same cells.

    Returns:
        ``{"pearson": r, "max_abs_diff": ..., "n_cells": ...}`` on the normalised values.
    """
    if exact.values.shape != attribution.values.shape or exact.grid != attribution.grid:
        raise WorkbenchError(f"cannot compare a {exact.grid} sweep of shape {tuple(exact.values.shape)} with a "
                             f"{attribution.grid} sweep of shape {tuple(attribution.values.shape)}")
    return {
        "pearson": pearson(exact.values, attribution.values),
        "max_abs_diff": float((exact.values - attribution.values).abs().max()),
        "n_cells": int(exact.values.numel()),
    }

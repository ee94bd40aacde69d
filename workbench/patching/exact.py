"""Exact activation patching: the clean and corrupted runs, sweeps over layer x position / head grids, results.

Denoising patches a clean activation into the corrupted run (does this activation *suffice* to restore
refusal?); noising patches a corrupted activation into the clean run (is it *necessary*?). Either way a cell's
value is normalised so the corrupted run is 0 and the clean run is 1.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..models import model_device
from ..store import Computed, get_or_compute
from .capture import Run, capture_run
from .engine import DEFAULT_MAX_TOKENS, run_rows
from .metrics import Metric, check_separable, make_metric, normalise
from .pairs import PromptPairs
from .rows import Patch, Rows
from .sites import AXES, HOOKS, hook_name, resolve

MODES = ("denoise", "noise")


@dataclass
class PatchingRuns:
    """The clean and corrupted runs of a set of pairs, shared by every sweep on them.

    Attributes:
        pairs: the tokenised pairs. metric: the metric.
        clean, corrupted: the two unpatched runs (:class:`~workbench.patching.capture.Run`).
        clean_metric, corrupted_metric: ``Float[Tensor, "pair"]`` per-pair metric of each run.
        components: components whose activations were kept.
        grads: attribution patching's gradients, filled on demand: mode -> hook name -> tensor.
    """

    pairs: PromptPairs
    metric: Metric
    clean: Run
    corrupted: Run
    clean_metric: Tensor
    corrupted_metric: Tensor
    components: tuple[str, ...]
    grads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    clean_source: str = "forward"

    @property
    def clean_value(self) -> float:
        """Mean metric of the clean run (normalises to 1)."""
        return float(self.clean_metric.mean())

    @property
    def corrupted_value(self) -> float:
        """Mean metric of the corrupted run (normalises to 0)."""
        return float(self.corrupted_metric.mean())

    def base(self, mode: str) -> Run:
        return self.corrupted if mode == "denoise" else self.clean

    def source(self, mode: str) -> Run:
        return self.clean if mode == "denoise" else self.corrupted

    def base_metric(self, mode: str) -> Tensor:
        return self.corrupted_metric if mode == "denoise" else self.clean_metric


def _clean_override(clean_cache, names: Sequence[str], shape_of) -> dict[str, Tensor]:
    """Activations a caller (or the cache store) supplies for the clean run, validated against the run's shapes."""
    out = {}
    for name in names:
        if isinstance(clean_cache, Mapping):
            act = clean_cache.get(name)
        else:
            try:
                act = clean_cache.activations(name)
            except (KeyError, AttributeError, ValueError):
                act = None
        if act is None:
            continue
        act = torch.as_tensor(act)
        want = shape_of(name)
        if tuple(act.shape) != tuple(want):
            raise WorkbenchError(f"clean_cache[{name!r}] has shape {tuple(act.shape)}, expected {tuple(want)} "
                                 "(pairs x positions x ..., left-padded like the pairs)")
        out[name] = act
    return out


def _store_entry(model, pairs: PromptPairs, names: Sequence[str], store, clean: Run, show_progress: bool):
    """The clean prompts' activations at ``names``, all positions, from the cache store; missing hooks are
    written from the clean run's own activations (no second forward of the clean prompts)."""
    return get_or_compute(model, pairs.clean, hooks=list(names), positions="all",
                          store=None if store is True else store, system=pairs.system,
                          show_progress=show_progress,
                          computed=Computed(pairs.clean_ids, pairs.attention_mask, clean.acts))


def prepare(
    model,
    pairs: PromptPairs,
    metric: str | Metric = "refusal_score",
    components: Sequence[str] = tuple(HOOKS),
    clean_cache: Mapping[str, Tensor] | object | None = None,
    store=None,
    show_progress: bool = False,
) -> PatchingRuns:
    """Run the clean and the corrupted prompts once and keep what every later sweep needs.

    Args:
        pairs: :class:`PromptPairs` from :func:`make_pairs`.
        metric: ``"refusal_score"``, ``"logit_diff"`` or a callable on last-position logits.
        components: components whose activations to keep (``resid_pre`` is always kept).
        clean_cache: clean activations to use instead of the clean run's own: a mapping hook name ->
            ``Float[Tensor, "pair pos ..."]`` or an object with ``.activations(name)`` (a store entry).
        store: take the clean activations from the cache store (:mod:`workbench.store`): ``True`` for the
            default store, or an ``ActivationStore`` / root path. Entries are keyed by model fingerprint and
            prompts, so a second sweep of the same pairs reads them from disk. Either way the clean prompts
            run forward once: that forward gives the clean metric (the store holds no logits) and the KV cache
            a sweep resumes from, and a missing entry is written from its activations.

    Raises:
        WorkbenchError: the metric is (numerically) the same on the clean and corrupted runs.
    """
    if not isinstance(pairs, PromptPairs):
        raise WorkbenchError(f"pairs must be PromptPairs (from make_pairs), got {type(pairs).__name__}")
    comps = tuple(dict.fromkeys(("resid_pre",) + tuple(resolve(c)[0] for c in components)))
    metric = make_metric(model, metric)
    dev = model_device(model)
    pairs = pairs.to(dev)
    n_layers = int(model.cfg.n_layers)
    names = [hook_name(c, j) for c in comps for j in range(n_layers)]
    corrupted = capture_run(model, pairs.corrupted_ids, pairs.attention_mask, names)
    clean = capture_run(model, pairs.clean_ids, pairs.attention_mask, names)
    source = "forward"
    if store is not None and store is not False and clean_cache is None:
        clean_cache = _store_entry(model, pairs, names, store, clean, show_progress)
    if clean_cache is not None:
        override = _clean_override(clean_cache, names, lambda n: clean.acts[n].shape)
        clean.acts.update({k: v.to(dev, clean.acts[k].dtype) for k, v in override.items()})
        kind = "store" if store not in (None, False) else "clean_cache"
        source = f"{kind} ({len(override)} of {len(names)} hooks)"
    clean_metric = metric(clean.logits_last).float().cpu()
    corrupted_metric = metric(corrupted.logits_last).float().cpu()
    check_separable(float(clean_metric.mean()), float(corrupted_metric.mean()), metric.name)
    return PatchingRuns(pairs, metric, clean, corrupted, clean_metric, corrupted_metric, comps, clean_source=source)


def ensure_runs(model, runs_or_pairs, metric, components: Sequence[str]) -> PatchingRuns:
    """``runs_or_pairs`` as :class:`PatchingRuns` (computed from pairs when needed, extended if a component is missing)."""
    if isinstance(runs_or_pairs, PatchingRuns):
        missing = [c for c in components if resolve(c)[0] not in runs_or_pairs.components]
        if missing:
            raise WorkbenchError(f"these runs kept no activations of {missing}; call prepare(..., components=...) "
                                 "with them")
        return runs_or_pairs
    return prepare(model, runs_or_pairs, metric, components)


@dataclass
class PatchResult:
    """One sweep's result.

    Attributes:
        component, grid, mode (``denoise``/``noise``), method (``exact``/``attribution``), metric.
        values: normalised values (0 = corrupted run, 1 = clean run), shaped by the grid:
            ``[layer, pos]``, ``[layer]``, ``[layer, head]`` or ``[layer, head, pos]``.
        raw: the metric itself (mean over pairs), same shape (attribution: its linear estimate).
        clean_value, corrupted_value: mean metric of the unpatched runs.
        tokens, corrupted_tokens: per-position token labels (first pair). n_post: post-instruction positions.
        engine: which engine ran (exact sweeps). seconds: wall time of the sweep.
        n_forward_rows: patched rows actually computed. layers: the swept layers (``None``: all).
    """

    component: str
    grid: str
    mode: str
    method: str
    metric: str
    values: Tensor
    raw: Tensor
    clean_value: float
    corrupted_value: float
    tokens: list[str]
    corrupted_tokens: list[str]
    n_post: int
    engine: str | None = None
    seconds: float = 0.0
    n_forward_rows: int = 0
    layers: list[int] | None = None

    @property
    def layer_ids(self) -> list[int]:
        """The model layer of each index of the first axis (all layers unless the sweep was restricted)."""
        return list(range(int(self.values.shape[0]))) if self.layers is None else list(self.layers)

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES[self.grid]

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: one row per cell with ``layer`` / ``head`` / ``pos``, token labels, ``value`` and ``raw``."""
        axes = self.axes
        idx = torch.cartesian_prod(*[torch.arange(s) for s in self.values.shape]) if len(axes) > 1 else \
            torch.arange(self.values.shape[0])[:, None]
        df = pd.DataFrame(idx.numpy(), columns=list(axes))
        df["layer"] = [self.layer_ids[i] for i in df["layer"]]
        if "pos" in axes:
            n_pos = len(self.tokens)
            df["pos_from_end"] = df["pos"] - n_pos
            df["token"] = [self.tokens[p] for p in df["pos"]]
            df["corrupted_token"] = [self.corrupted_tokens[p] for p in df["pos"]]
            df["post_instruction"] = df["pos_from_end"] >= -self.n_post
        df["value"] = self.values.flatten().numpy()
        df["raw"] = self.raw.flatten().numpy()
        df.insert(0, "method", self.method)
        df.insert(0, "mode", self.mode)
        df.insert(0, "component", self.component)
        return df

    @property
    def df(self) -> pd.DataFrame:
        return self.to_dataframe()

    def by_layer(self, reduce: str = "max") -> Tensor:
        """``Float[Tensor, "layer"]``: the value reduced over every other axis (``max``, ``min``, ``last_pos``)."""
        v = self.values
        if reduce == "last_pos":
            if "pos" not in self.axes:
                raise WorkbenchError(f"grid {self.grid!r} has no position axis")
            return v[..., -1].reshape(v.shape[0], -1).amax(-1) if v.ndim > 2 else v[:, -1]
        flat = v.reshape(v.shape[0], -1)
        if reduce == "max":
            return flat.amax(-1)
        if reduce == "min":
            return flat.amin(-1)
        raise WorkbenchError(f"unknown reduce {reduce!r}; expected 'max', 'min' or 'last_pos'")


def grid_cells(grid: str, n_layers: int, n_pos: int, n_heads: int, layers: Sequence[int] | None = None):
    """Cells of a grid as tensors ``(layer [C], pos_mask Bool[C, pos], head [C] or None, shape)``."""
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [j for j in layers if not 0 <= j < n_layers]
    if bad:
        raise WorkbenchError(f"layer {bad[0]} out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    lay = torch.as_tensor(layers, dtype=torch.long)
    eye = torch.eye(n_pos, dtype=torch.bool)
    every = torch.ones(1, n_pos, dtype=torch.bool)
    if grid == "layer_pos":
        layer = lay.repeat_interleave(n_pos)
        mask = eye.repeat(len(layers), 1)
        return layer, mask, None, (len(layers), n_pos)
    if grid == "layer":
        return lay, every.expand(len(layers), n_pos).clone(), None, (len(layers),)
    if grid == "layer_head":
        layer = lay.repeat_interleave(n_heads)
        head = torch.arange(n_heads).repeat(len(layers))
        return layer, every.expand(len(layer), n_pos).clone(), head, (len(layers), n_heads)
    if grid == "layer_head_pos":
        layer = lay.repeat_interleave(n_heads * n_pos)
        head = torch.arange(n_heads).repeat_interleave(n_pos).repeat(len(layers))
        mask = eye.repeat(len(layers) * n_heads, 1)
        return layer, mask, head, (len(layers), n_heads, n_pos)
    raise WorkbenchError(f"unknown grid {grid!r}; expected one of {sorted(AXES)}")


def build_rows(cell_layer: Tensor, cell_mask: Tensor, cell_head: Tensor | None, first_diff: Tensor,
               n_heads: int | None = None, differs: Tensor | None = None) -> tuple[Rows, Tensor]:
    """One row per (cell, pair), dropping the rows that patch nothing but identical activations (exact no-ops):
    positions in the pair's shared prefix, and any position where ``differs`` says the source and base
    activations are equal (e.g. ``resid_pre`` of layer 0, the embeddings, at positions whose tokens agree).

    Args:
        cell_layer: ``Int[Tensor, "cell"]``. cell_mask: ``Bool[Tensor, "cell pos"]``.
        cell_head: ``Int[Tensor, "cell"]`` or ``None``. first_diff: ``Int[Tensor, "pair"]``.
        differs: ``Bool[Tensor, "layer pair pos"]`` (``"layer pair pos head"`` for heads) or ``None``.

    Returns:
        ``(rows, cell)``: the rows and ``Int[Tensor, "row"]`` the cell of each.
    """
    n_cells, n_pos = cell_mask.shape
    fd = first_diff.cpu()
    pos = torch.arange(n_pos)
    live_pos = pos[None, :] >= fd[:, None]                      # [pair, pos]
    live = cell_mask[:, None, :] & live_pos[None, :, :]         # [cell, pair, pos]
    if differs is not None:
        d = differs.cpu()[cell_layer]                           # [cell, pair, pos(, head)]
        if d.ndim == 4:
            d = d[torch.arange(n_cells), :, :, cell_head] if cell_head is not None else d.any(-1)
        live &= d
    keep = live.any(-1)                                         # [cell, pair]
    cell, pair = torch.nonzero(keep, as_tuple=True)
    start = live[cell, pair].float().argmax(-1).long()
    head_mask = None
    if cell_head is not None:
        head_mask = torch.zeros(len(cell), int(n_heads), dtype=torch.bool)
        head_mask[torch.arange(len(cell)), cell_head[cell]] = True
    return Rows(pair, cell_layer[cell], start, cell_mask[cell], head_mask), cell


def differing(runs: PatchingRuns, comp: str, layers: Sequence[int], n_layers: int) -> Tensor:
    """``Bool[Tensor, "layer pair pos"]`` (``... head`` for ``z``): where the clean and corrupted activations differ.

    Layers not in ``layers`` are all ``True``. Comparison is exact (bitwise), so it only ever skips true no-ops.
    """
    out = None
    for j in layers:
        name = hook_name(comp, j)
        d = (runs.clean.acts[name] != runs.corrupted.acts[name]).any(-1).cpu()
        if out is None:
            out = torch.ones((n_layers,) + tuple(d.shape), dtype=torch.bool)
        out[j] = d
    assert out is not None
    return out


def _cell_means(row_values: Tensor, cell: Tensor, rows: Rows, base_metric: Tensor, n_cells: int) -> Tensor:
    per = base_metric.float().cpu()[None, :].repeat(n_cells, 1)   # [cell, pair]
    per[cell, rows.pair.cpu()] = row_values
    return per.mean(-1)


def _n_heads(model) -> int:
    return int(model.cfg.n_heads)


def exact_patch(
    model,
    runs: PatchingRuns | PromptPairs,
    component: str = "resid_pre",
    grid: str | None = None,
    mode: str = "denoise",
    *,
    metric: str | Metric = "refusal_score",
    layers: Sequence[int] | None = None,
    engine: str = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> PatchResult:
    """Exact activation patching of one component over a grid, all cells batched.

    Args:
        runs: :class:`PatchingRuns` from :func:`prepare` (reuse them across sweeps) or :class:`PromptPairs`.
        component: ``resid_pre``, ``attn_out``, ``mlp_out``, ``z`` (attention heads), or the aliases
            ``heads`` (= ``z`` by layer x head) and ``heads_pos`` (= ``z`` by layer x head x position).
        grid: ``layer_pos`` (default for resid/attn/mlp), ``layer`` (all positions at once), ``layer_head``
            (default for ``z``) or ``layer_head_pos``.
        mode: ``denoise`` (clean into corrupted) or ``noise`` (corrupted into clean).
        metric: used only when ``runs`` are pairs.
        layers: restrict the sweep to these layers.
        engine: ``auto``, ``resume`` or ``hooks`` (see :mod:`workbench.patching.engine`).
        max_tokens: rows x positions per block call.

    Returns:
        :class:`PatchResult` (``.values`` normalised, ``.df`` a DataFrame with token labels).
    """
    comp, grid = resolve(component, grid)
    if mode not in MODES:
        raise WorkbenchError(f"unknown mode {mode!r}; expected one of {MODES}")
    runs = ensure_runs(model, runs, metric, [comp])
    t0 = time.perf_counter()
    n_layers = int(model.cfg.n_layers)
    n_pos = runs.pairs.n_pos
    layer, mask, head, shape = grid_cells(grid, n_layers, n_pos, _n_heads(model), layers)
    source, base = runs.source(mode), runs.base(mode)
    used_layers = sorted(set(layer.tolist()))
    differs = differing(runs, comp, used_layers, n_layers)
    rows, cell = build_rows(layer, mask, head, runs.pairs.first_diff, _n_heads(model), differs)
    patch = Patch(comp, {j: source.acts[hook_name(comp, j)] for j in used_layers})
    vals = run_rows(model, base, patch, rows, runs.metric, engine, max_tokens, show_progress)
    raw = _cell_means(vals, cell, rows, runs.base_metric(mode), len(layer)).view(shape)
    used = "hooks" if engine == "hooks" or not base.resume_ok else "resume"
    return _result(runs, comp, grid, mode, "exact", raw, used, time.perf_counter() - t0, len(rows), model, layers)


def _result(runs: PatchingRuns, comp, grid, mode, method, raw, engine, seconds, n_rows, model,
            layers: Sequence[int] | None = None) -> PatchResult:
    values = normalise(raw, runs.clean_value, runs.corrupted_value)
    clean_tok, corr_tok = runs.pairs.token_labels(model.tokenizer, 0)
    return PatchResult(comp, grid, mode, method, runs.metric.name, values, raw, runs.clean_value,
                       runs.corrupted_value, clean_tok, corr_tok, runs.pairs.n_post, engine, seconds, n_rows,
                       None if layers is None else [int(j) for j in layers])


def first_layer_above(result: PatchResult, threshold: float = 0.5, reduce: str = "max") -> int | None:
    """First layer whose value (reduced over positions/heads with ``reduce``) exceeds ``threshold``."""
    by_layer = result.by_layer(reduce)
    above = torch.nonzero(by_layer > threshold).flatten()
    return result.layer_ids[int(above[0])] if len(above) else None

"""Subspace patching along the refusal direction, and the interpretability-illusion check.

*Subspace patching* replaces only the projection of ``resid_pre`` on a direction ``v`` (or a subspace ``U``):
``a <- a + ((a_src - a) . v) v``.

*The illusion check* (Makelov, Lange & Nanda 2023, "Is This the Subspace You Are Looking for?"). A patch along
``v`` can work for the wrong reason: split ``v = v_row + v_null`` where ``v_row`` lies in the row space of the
weights that read the residual stream downstream (attention ``W_Q``/``W_K``/``W_V`` and MLP ``W_gate``/``W_in``
of this and later blocks, each after its norm's scale, and the unembedding after the final norm) and
``v_null`` in their nullspace. ``v_null`` is *causally disconnected*: nothing downstream reads it. Yet the
patch's coefficient ``(a_src - a) . v`` also picks up variation along ``v_null``, and writes it along
``v_row``, possibly activating a *dormant* direction the model never uses on its own. The check patches

* ``full``: along ``v``;
* ``row`` / ``null``: along ``v_row`` / ``v_null`` (normalised), each on its own;
* ``connected_source``: along ``v`` with the coefficient read from ``v_row`` only, ``((a_src - a) . v_row) v``;
* ``disconnected_source``: along ``v`` with the coefficient read from ``v_null`` only, ``((a_src - a) . v_null) v``;

and reports ``disconnected_share = disconnected_source / full``: how much of the effect the causally
disconnected component carries. Near 0 the subspace patch is trustworthy; a large share flags the illusion.
RMSNorm makes ``v_null`` not perfectly disconnected (it changes the norm), so ``null`` is measured, not assumed 0.
With every downstream reader included the row space is usually all of ``d_model`` (MLPs read
``d_mlp > d_model`` rows): then ``null_dim = 0`` and the check is vacuous; ``readers`` narrows the readers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import Tensor

from ..errors import WorkbenchError
from .engine import DEFAULT_MAX_TOKENS, run_rows
from .exact import MODES, PatchingRuns, _cell_means, build_rows, differing, ensure_runs
from .metrics import Metric, normalise
from .pairs import PromptPairs
from .rows import Patch
from .sites import hook_name

READERS = ("downstream", "attn", "mlp", "unembed")


def direction_tensor(direction, d_model: int) -> tuple[Tensor, int | None]:
    """``(U, layer)``: an orthonormal basis ``Float[Tensor, "d_model k"]`` of ``direction`` and its layer, if known.

    Accepts a ``Direction`` (``.vector`` and ``.layer``), a ``Float[Tensor, "d_model"]`` or a
    ``Float[Tensor, "d_model k"]`` / ``Float[Tensor, "k d_model"]`` set of directions.
    """
    layer = getattr(direction, "layer", None)
    vec = getattr(direction, "vector", direction)
    v = torch.as_tensor(vec).detach().float().cpu()
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or d_model not in v.shape:
        raise WorkbenchError(f"direction must have d_model = {d_model} entries, got shape {tuple(v.shape)}")
    if v.shape[0] != d_model:
        v = v.T
    if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise WorkbenchError("direction is zero or not finite; expected a non-zero vector")
    q, r = torch.linalg.qr(v)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep], (int(layer) if layer is not None else None)


def positions_mask(positions, n_pos: int, n_post: int) -> Tensor:
    """``Bool[Tensor, "pos"]`` from ``"all"``, ``"post"`` (post-instruction), ``"last"`` or a list of ints."""
    mask = torch.zeros(n_pos, dtype=torch.bool)
    if positions in (None, "all"):
        mask[:] = True
    elif positions == "post":
        mask[-n_post:] = True
    elif positions == "last":
        mask[-1] = True
    elif isinstance(positions, str):
        raise WorkbenchError(f"unknown positions {positions!r}; expected 'all', 'post', 'last' or a list of ints")
    else:
        for p in positions:
            if not -n_pos <= int(p) < n_pos:
                raise WorkbenchError(f"position {p} out of range for {n_pos} positions")
            mask[int(p)] = True
    return mask


def _layer_rows(runs: PatchingRuns, layers: Sequence[int], mask: Tensor):
    lay = torch.as_tensor(list(layers), dtype=torch.long)
    cells = mask[None, :].expand(len(lay), -1).clone()
    n_layers = len(runs.corrupted.block_kwargs or []) or int(lay.max()) + 1
    differs = differing(runs, "resid_pre", list(layers), max(n_layers, int(lay.max()) + 1))
    return build_rows(lay, cells, None, runs.pairs.first_diff, differs=differs)


def _sweep_layers(model, runs: PatchingRuns, layers, mask, mode, read, write, engine, max_tokens, show) -> Tensor:
    rows, cell = _layer_rows(runs, layers, mask)
    source = runs.source(mode)
    patch = Patch("resid_pre", {j: source.acts[hook_name("resid_pre", j)] for j in layers}, read, write)
    dev = source.acts[hook_name("resid_pre", layers[0])].device
    if read is not None:
        patch.read, patch.write = read.to(dev), write.to(dev)
    vals = run_rows(model, runs.base(mode), patch, rows, runs.metric, engine, max_tokens, show)
    return _cell_means(vals, cell, rows, runs.base_metric(mode), len(layers))


def subspace_patch(
    model,
    runs: PatchingRuns | PromptPairs,
    direction,
    layers: Sequence[int] | None = None,
    positions="all",
    mode: str = "denoise",
    *,
    metric: str | Metric = "refusal_score",
    engine: str = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Patch only the projection of ``resid_pre`` on ``direction``, layer by layer; full patches for reference.

    Args:
        direction: a ``Direction``, ``Float[Tensor, "d_model"]`` or ``Float[Tensor, "d_model k"]``.
        layers: layers to patch (default: all). positions: ``"all"``, ``"post"``, ``"last"`` or ints.

    Returns:
        DataFrame with one row per layer: ``value`` (subspace patch, normalised), ``value_full`` (patching
        the whole ``resid_pre`` at the same positions), ``fraction`` = value / value_full, ``raw``, ``raw_full``.
    """
    if mode not in MODES:
        raise WorkbenchError(f"unknown mode {mode!r}; expected one of {MODES}")
    runs = ensure_runs(model, runs, metric, ["resid_pre"])
    u, _ = direction_tensor(direction, int(model.cfg.d_model))
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else [int(j) for j in layers]
    if any(not 0 <= j < n_layers for j in layers):
        raise WorkbenchError(f"layers {layers} out of range for a model of {n_layers} layers")
    mask = positions_mask(positions, runs.pairs.n_pos, runs.pairs.n_post)
    raw = _sweep_layers(model, runs, layers, mask, mode, u, u, engine, max_tokens, show_progress)
    raw_full = _sweep_layers(model, runs, layers, mask, mode, None, None, engine, max_tokens, show_progress)
    value = normalise(raw, runs.clean_value, runs.corrupted_value)
    value_full = normalise(raw_full, runs.clean_value, runs.corrupted_value)
    return pd.DataFrame({
        "layer": layers, "value": value.numpy(), "value_full": value_full.numpy(),
        "fraction": (value / value_full).numpy(), "raw": raw.numpy(), "raw_full": raw_full.numpy(),
    })


def _norm_linear_map(norm, d: int, ref: Tensor) -> Tensor:
    """``Float[Tensor, "d d"]`` the linear part ``A`` of a norm's map ``x -> A x / scale(x) + b``, as rows ``A^T``.

    Probed on the basis vectors, so RMSNorm (``w``), Gemma's ``1 + w`` and LayerNorm's centring all come out right
    up to one positive factor (irrelevant for a row space).
    """
    module = getattr(norm, "original_component", None) or norm
    eye = torch.eye(d, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        out = module(eye[None])[0] - module(torch.zeros_like(eye[:1])[None])[0]
    return out.float().cpu()


def _linear_weight(bridge_part) -> Tensor | None:
    """``Float[Tensor, "d_out d_in"]`` (``nn.Linear`` layout) of a linear layer, or ``None``.

    GPT-2's ``Conv1D`` stores ``[d_in, d_out]``; it is transposed, or its readers would be skipped.
    """
    module = getattr(bridge_part, "original_component", None) or bridge_part
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 2:
        return None
    return (w.T if type(module).__name__ == "Conv1D" else w).detach().float().cpu()


def reader_gram(model, layer: int, readers: str | Tensor = "downstream") -> tuple[Tensor, int]:
    """Gram matrix ``R^T R`` (``Float[Tensor, "d_model d_model"]``, float64) of the weights reading ``resid_pre[layer]``.

    Args:
        readers: ``"downstream"`` (attention Q/K/V and MLP gate/in of blocks ``layer..`` after their norms,
            plus the unembedding after the final norm), ``"attn"``, ``"mlp"``, ``"unembed"``, or a
            ``Float[Tensor, "n d_model"]`` matrix of reader rows.

    Returns:
        ``(gram, n_rows)``.
    """
    d = int(model.cfg.d_model)
    if isinstance(readers, Tensor):
        r = readers.detach().double().cpu()
        if r.ndim != 2 or r.shape[1] != d:
            raise WorkbenchError(f"readers must be a [n, {d}] matrix, got shape {tuple(r.shape)}")
        return r.T @ r, int(r.shape[0])
    if readers not in READERS:
        raise WorkbenchError(f"unknown readers {readers!r}; expected one of {READERS} or a [n, d_model] tensor")
    ref = next(model.parameters())
    gram = torch.zeros(d, d, dtype=torch.float64)
    n = 0

    def add(weight: Tensor | None, norm_rows: Tensor) -> None:
        nonlocal gram, n
        if weight is None or weight.shape[1] != d:
            return
        eff = (weight @ norm_rows.T).double()        # rows reading the residual stream before the norm
        gram += eff.T @ eff
        n += int(eff.shape[0])

    if readers in ("downstream", "attn", "mlp"):
        for j in range(layer, int(model.cfg.n_layers)):
            block = model.blocks[j]
            if readers in ("downstream", "attn"):
                a = _norm_linear_map(block.ln1, d, ref)
                split = any(name in block.attn._modules for name in ("q", "k", "v"))
                for name in ("q", "k", "v") if split else ("qkv",):  # a fused qkv only when not also split
                    if name in block.attn._modules:
                        add(_linear_weight(block.attn._modules[name]), a)
            if readers in ("downstream", "mlp"):
                m = _norm_linear_map(block.ln2, d, ref)
                for name in ("gate", "in", "gate_up"):
                    if name in block.mlp._modules:
                        add(_linear_weight(block.mlp._modules[name]), m)
    if readers in ("downstream", "unembed"):
        add(_linear_weight(model.unembed), _norm_linear_map(model.ln_final, d, ref))
    if n == 0:
        raise WorkbenchError(f"found no {readers!r} reader weights from layer {layer}; pass readers as a tensor")
    return gram, n


def split_direction(v: Tensor, gram: Tensor, rtol: float = 1e-5) -> tuple[Tensor, Tensor, int]:
    """``(v_row, v_null, row_dim)``: ``v`` split into the row space of the readers and its orthogonal complement.

    The row space is spanned by the eigenvectors of ``gram`` whose singular value exceeds ``rtol`` times the largest.
    """
    evals, evecs = torch.linalg.eigh(gram)
    sv = evals.clamp(min=0).sqrt()
    basis = evecs[:, sv > rtol * sv.max()]
    v = v.double().flatten()
    v_row = basis @ (basis.T @ v)
    return v_row.float(), (v - v_row).float(), int(basis.shape[1])


@dataclass
class IllusionCheck:
    """Result of :func:`illusion_check` (normalised effects: 0 = corrupted run, 1 = clean run)."""

    layer: int
    readers: str
    positions: str
    d_model: int
    row_dim: int
    null_dim: int
    null_norm_fraction: float        # |v_null|^2 / |v|^2
    effect_full: float
    effect_row: float | None
    effect_null: float | None
    effect_connected_source: float
    effect_disconnected_source: float
    disconnected_share: float        # effect_disconnected_source / effect_full
    mean_abs_coef_row: float         # mean |(a_src - a) . v_row| at the patched positions
    mean_abs_coef_null: float        # mean |(a_src - a) . v_null|
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def illusion_check(
    model,
    runs: PatchingRuns | PromptPairs,
    direction,
    layer: int | None = None,
    positions="all",
    readers: str | Tensor = "downstream",
    rtol: float = 1e-5,
    mode: str = "denoise",
    *,
    metric: str | Metric = "refusal_score",
    engine: str = "auto",
    show_progress: bool = False,
) -> IllusionCheck:
    """Makelov et al.'s check of a subspace patch along ``direction`` at ``resid_pre[layer]``.

    Args:
        direction: a ``Direction`` (its ``.layer`` is the default ``layer``) or a ``Float[Tensor, "d_model"]``.
        readers: which downstream weights define the row space (see :func:`reader_gram`).
        rtol: relative singular-value threshold of the row space.
    """
    if mode not in MODES:
        raise WorkbenchError(f"unknown mode {mode!r}; expected one of {MODES}")
    d = int(model.cfg.d_model)
    u, dir_layer = direction_tensor(direction, d)
    if u.shape[1] != 1:
        raise WorkbenchError(f"the illusion check takes one direction, got a {u.shape[1]}-dimensional subspace")
    layer = dir_layer if layer is None else int(layer)
    if layer is None:
        raise WorkbenchError("pass layer= (the direction carries no .layer)")
    if not 0 <= layer < int(model.cfg.n_layers):
        raise WorkbenchError(f"layer {layer} out of range for a model of {int(model.cfg.n_layers)} layers")
    runs = ensure_runs(model, runs, metric, ["resid_pre"])
    t0 = time.perf_counter()
    v = u[:, 0]
    gram, _ = reader_gram(model, layer, readers)
    v_row, v_null, row_dim = split_direction(v, gram, rtol)
    mask = positions_mask(positions, runs.pairs.n_pos, runs.pairs.n_post)

    def effect(read: Tensor, write: Tensor) -> float:
        raw = _sweep_layers(model, runs, [layer], mask, mode, read[:, None], write[:, None], engine,
                            DEFAULT_MAX_TOKENS, show_progress)
        return float(normalise(raw, runs.clean_value, runs.corrupted_value)[0])

    eps = 1e-6
    full = effect(v, v)
    row = effect(v_row / v_row.norm(), v_row / v_row.norm()) if v_row.norm() > eps else None
    null = effect(v_null / v_null.norm(), v_null / v_null.norm()) if v_null.norm() > eps else None
    conn = effect(v_row, v) if v_row.norm() > eps else 0.0
    disc = effect(v_null, v) if v_null.norm() > eps else 0.0
    name = hook_name("resid_pre", layer)
    delta = (runs.source(mode).acts[name] - runs.base(mode).acts[name]).float().cpu()[:, mask]   # [pair, pos, d]
    live = (torch.arange(runs.pairs.n_pos)[mask][None, :] >= runs.pairs.first_diff.cpu()[:, None])
    coef_row = (delta @ v_row)[live].abs().mean() if live.any() else torch.tensor(0.0)
    coef_null = (delta @ v_null)[live].abs().mean() if live.any() else torch.tensor(0.0)
    return IllusionCheck(
        layer=layer, readers=readers if isinstance(readers, str) else "custom",
        positions=positions if isinstance(positions, str) else str(list(positions)), d_model=d,
        row_dim=row_dim, null_dim=d - row_dim, null_norm_fraction=float(v_null.norm() ** 2),
        effect_full=full, effect_row=row, effect_null=null, effect_connected_source=conn,
        effect_disconnected_source=disc, disconnected_share=disc / full if abs(full) > 1e-9 else float("nan"),
        mean_abs_coef_row=float(coef_row), mean_abs_coef_null=float(coef_null),
        seconds=time.perf_counter() - t0,
    )

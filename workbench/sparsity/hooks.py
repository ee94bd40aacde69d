"""Interventions on the MLP hidden activation ``blocks.{l}.mlp.hook_post``, as TransformerLens hooks.

Each returns ``[(hook_name, fn), ...]`` for ``model.hooks(fwd_hooks=...)``, ``evaluate_refusal(fwd_hooks=...)``
or :func:`workbench.sparsity.lm_loss`; every one acts position by position, so it also works on cached
decoding steps (sequence length 1).

* :class:`ThresholdZeroing` -- zero the values with ``|a| * scale <= t`` (global or per-channel ``t``), and count
  how many real values it zeroed (the sparsity actually reached on the text it ran on);
* :func:`topk_hooks` -- keep the ``k`` largest ``|a|`` of every token (Lazy Neuron top-k), zero the rest;
* :func:`neuron_ablation_hooks` -- set chosen neurons ``(layer, index)`` to zero or to a fixed value (mean
  ablation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..vocab import check_layers, is_int
from ._common import check_thresholds, d_mlp, mlp_post_name, model_layers

Hook = tuple[str, Callable]


def _as_tensor(act: Tensor, v) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=act.device, dtype=act.dtype)
    return torch.tensor(float(v), device=act.device, dtype=act.dtype)


class ThresholdZeroing:
    """Zero MLP hidden activations below a threshold at chosen layers, counting what it zeroed.

    A value ``a_i`` of layer ``l`` is zeroed when ``|a_i| * scale[l][i] <= t[l]`` (``<=``, so ``t = 0`` only
    touches exact zeros and changes nothing). ``scale`` defaults to 1 (a threshold on ``|a|``); the Sparsing
    Law code uses ``scale = ||W_out[:, i]||`` (a threshold on the norm of what neuron ``i`` writes).

    Args:
        model: the bridge.
        thresholds: ``{layer: t}`` with ``t`` a number or ``Float[Tensor, "d_mlp"]`` (per channel).
        scale: optional ``{layer: Float[Tensor, "d_mlp"]}``.
        count: count zeroed values on the positions marked by :meth:`set_mask` (all positions when no mask).

    Use ``with model.hooks(fwd_hooks=z.hooks): ...``; :meth:`sparsity` reads the counts.
    """

    def __init__(self, model, thresholds: Mapping[int, float | Tensor], scale: Mapping[int, Tensor] | None = None,
                 count: bool = True):
        if not isinstance(thresholds, Mapping) or not thresholds:
            raise WorkbenchError("thresholds must be a non-empty {layer: threshold} mapping")
        layers = model_layers(model, list(thresholds))
        d = d_mlp(model)
        self.thresholds: dict[int, Tensor | float] = {}
        for layer, t in zip(layers, thresholds.values()):
            if isinstance(t, Tensor) and t.ndim == 1:
                if t.shape[0] != d or not torch.isfinite(t).all() or (t < 0).any():
                    raise WorkbenchError(f"per-channel thresholds of layer {layer} must be {d} finite values >= 0, "
                                         f"got shape {tuple(t.shape)}")
                self.thresholds[layer] = t.detach().float()
            else:
                (self.thresholds[layer],) = check_thresholds(float(t) if isinstance(t, Tensor) else t,
                                                             f"threshold of layer {layer}")
        self.scale = {}
        for layer, s in (scale or {}).items():
            if layer in self.thresholds:
                if not isinstance(s, Tensor) or s.shape != (d,):
                    raise WorkbenchError(f"scale of layer {layer} must be a tensor of shape ({d},)")
                self.scale[layer] = s.detach().float()
        self.count = count
        self._mask: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the counts."""
        self.zeroed = {l: 0 for l in self.thresholds}
        self.total = {l: 0 for l in self.thresholds}

    def set_mask(self, mask: Tensor | None) -> None:
        """``Bool[Tensor, "batch pos"]`` of the next forward's real tokens (``None``: count every position)."""
        self._mask = None if mask is None else mask.bool()

    def _fn(self, layer: int):
        thr, scale = self.thresholds[layer], self.scale.get(layer)

        def fn(act: Tensor, hook=None) -> Tensor:
            score = act.abs() if scale is None else act.abs() * _as_tensor(act, scale)
            off = score <= _as_tensor(act, thr)
            if self.count:
                m = self._mask
                if m is not None and tuple(m.shape) == tuple(act.shape[:2]):
                    m = m.to(act.device)
                    self.zeroed[layer] += int((off & m[..., None]).sum())
                    self.total[layer] += int(m.sum()) * act.shape[-1]
                else:
                    self.zeroed[layer] += int(off.sum())
                    self.total[layer] += off.numel()
            return act.masked_fill(off, 0.0)

        return fn

    @property
    def hooks(self) -> list[Hook]:
        return [(mlp_post_name(l), self._fn(l)) for l in sorted(self.thresholds)]

    def sparsity(self) -> dict:
        """``{layer: fraction zeroed, "overall": fraction over every hooked layer}`` of the counted values."""
        out = {l: (self.zeroed[l] / self.total[l] if self.total[l] else float("nan")) for l in sorted(self.zeroed)}
        tot = sum(self.total.values())
        out["overall"] = sum(self.zeroed.values()) / tot if tot else float("nan")
        return out


def topk_hooks(model, k: int, layers: Iterable[int] | None = None) -> list[Hook]:
    """Keep the ``k`` largest ``|a|`` of every token's MLP hidden vector at ``layers``, zero the rest.

    Exactly ``k`` values per token survive (ties broken by ``torch.topk``). ``k = d_mlp`` changes nothing.

    Args:
        k: ``1 <= k <= d_mlp``.
        layers: default every layer.
    """
    d = d_mlp(model)
    if not is_int(k) or not 1 <= k <= d:
        raise WorkbenchError(f"k must be an int in 1..d_mlp={d}, got {k!r}")
    layers = model_layers(model, layers)

    def fn(act: Tensor, hook=None) -> Tensor:
        if k >= act.shape[-1]:
            return act
        idx = act.abs().topk(k, dim=-1).indices
        return torch.zeros_like(act).scatter_(-1, idx, act.gather(-1, idx))

    return [(mlp_post_name(l), fn) for l in layers]


def group_neurons(model, neurons) -> dict[int, Tensor]:
    """``[(layer, index), ...]`` or a DataFrame with ``layer`` and ``neuron`` columns -> ``{layer: Int64[Tensor, "n"]}``
    (checked against the model; duplicates dropped)."""
    if hasattr(neurons, "columns"):
        if not {"layer", "neuron"} <= set(neurons.columns):
            raise WorkbenchError(f"the neuron table needs 'layer' and 'neuron' columns, got {list(neurons.columns)}")
        pairs = list(zip(neurons["layer"].tolist(), neurons["neuron"].tolist()))
    else:
        pairs = [tuple(p) for p in neurons]
    n, d = int(model.cfg.n_layers), d_mlp(model)
    out: dict[int, list[int]] = {}
    for p in pairs:
        if len(p) != 2:
            raise WorkbenchError(f"a neuron is a (layer, index) pair, got {p!r}")
        layer, idx = int(p[0]), int(p[1])
        check_layers(layer, n, context=f"neuron {p!r}")
        if not 0 <= idx < d:
            raise WorkbenchError(f"neuron {p!r}: index {idx} is out of range 0..{d - 1} (d_mlp={d})")
        out.setdefault(layer, []).append(idx)
    return {l: torch.tensor(sorted(set(v)), dtype=torch.long) for l, v in sorted(out.items())}


def neuron_ablation_hooks(model, neurons, mode: str = "zero", values: Mapping[int, Tensor] | None = None) -> list[Hook]:
    """Ablate chosen MLP neurons at every position.

    Args:
        neurons: ``[(layer, index), ...]`` or a DataFrame with ``layer`` and ``neuron`` columns.
        mode: ``"zero"`` (``a_i <- 0``: the neuron writes nothing) or ``"mean"`` (``a_i <- values[layer][i]``,
            e.g. its mean activation over a reference set; the neuron keeps its average contribution but stops
            carrying information).
        values: ``{layer: Float[Tensor, "d_mlp"]}`` for ``mode="mean"``.

    Returns:
        One hook per layer that has ablated neurons (empty list for no neurons).
    """
    if mode not in ("zero", "mean"):
        raise WorkbenchError(f"unknown ablation mode {mode!r}; expected 'zero' or 'mean'")
    groups = group_neurons(model, neurons)
    d = d_mlp(model)
    if mode == "mean":
        if values is None:
            raise WorkbenchError("mode='mean' needs values={layer: Float[Tensor, 'd_mlp']} (e.g. mean activations)")
        for layer in groups:
            v = values.get(layer)
            if v is None or not isinstance(v, Tensor) or v.shape != (d,):
                raise WorkbenchError(f"mean values for layer {layer} must be a tensor of shape ({d},)")
    hooks = []
    for layer, idx in groups.items():
        fill = None if mode == "zero" else values[layer].detach().float()[idx]

        def fn(act: Tensor, hook=None, idx=idx, fill=fill) -> Tensor:
            i = idx.to(act.device)
            if fill is None:
                return act.index_fill(-1, i, 0.0)
            out = act.clone()
            out[..., i] = fill.to(device=act.device, dtype=act.dtype)
            return out

        hooks.append((mlp_post_name(layer), fn))
    return hooks

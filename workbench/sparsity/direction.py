"""Sparsity of the refusal direction and its alignment with MLP output weights.

* :func:`direction_sparsity` -- the share of the direction's squared norm in its ``k`` largest residual
  coordinates, ``sum_{top k} r_i^2 / sum r_i^2``, next to the same share for random Gaussian directions of the
  same width (a dense baseline: a basis-aligned direction has share 1 at ``k = 1``, a random one about
  ``k / d_model`` plus the order-statistics bonus).
* :func:`direction_alignment` -- for each layer, the cosine between the direction and every MLP output weight
  row ``W_out[:, i]`` (column ``i`` of ``down_proj.weight`` in Hugging Face layout: what neuron ``i`` writes),
  the top neurons by ``|cos|``, and the largest ``|cos|`` a random direction reaches (baseline).

A direction is a tensor ``Float[Tensor, "d_model"]`` or an artifact with a ``vector`` attribute (e.g.
:class:`workbench.directions.Direction`; a per-layer set needs ``layer=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..directions.artifact import as_vector
from ..errors import WorkbenchError
from ._common import mlp_out_weight, model_layers
from ..vocab import is_int


def direction_vector(direction, layer: int | None = None, d_model: int | None = None) -> Tensor:
    """``Float[Tensor, "d_model"]`` (float64, CPU) of a non-zero direction:
    :func:`workbench.directions.artifact.as_vector` (``layer`` picks a per-layer set's vector)."""
    return as_vector(direction, layer=layer, d_model=d_model, nonzero=True).detach().double().cpu()


def topk_share(v: Tensor, ks: Sequence[int]) -> list[float]:
    """Share of ``|v|^2`` held by the ``k`` largest ``|v_i|`` for each ``k`` (``v``: ``Float[Tensor, "... d"]``,
    the shares averaged over leading axes)."""
    sq = torch.sort(v.double() ** 2, dim=-1, descending=True).values
    cum = sq.cumsum(-1) / sq.sum(-1, keepdim=True)
    return [float(cum[..., k - 1].mean()) for k in ks]


def participation_ratio(v: Tensor) -> float:
    """Effective number of residual dimensions ``(sum r_i^2)^2 / sum r_i^4`` (1 = one coordinate, d = flat)."""
    sq = v.double() ** 2
    return float(sq.sum() ** 2 / (sq ** 2).sum())


def direction_sparsity(direction, ks: Sequence[int] | None = None, n_random: int = 64, seed: int = 0) -> pd.DataFrame:
    """Share of the direction's squared norm in its top-``k`` residual coordinates.

    Args:
        ks: default powers of two up to ``d_model`` (and ``d_model`` itself).
        n_random: Gaussian directions for the baseline (seeded).

    Returns:
        ``k, k_fraction, share, random_share, random_share_std, participation_ratio``.
    """
    v = direction_vector(direction)
    d = v.shape[0]
    if ks is None:
        ks = sorted({2 ** i for i in range(int(np.log2(d)) + 1)} | {d})
    ks = [int(k) for k in ks]
    bad = [k for k in ks if not 1 <= k <= d]
    if bad:
        raise WorkbenchError(f"ks must be in 1..d_model={d}, got {bad}")
    if n_random < 1:
        raise WorkbenchError(f"n_random must be >= 1, got {n_random}")
    gen = torch.Generator().manual_seed(seed)
    rnd = torch.randn(n_random, d, generator=gen, dtype=torch.float64)
    rsq = torch.sort(rnd ** 2, dim=-1, descending=True).values
    rcum = rsq.cumsum(-1) / rsq.sum(-1, keepdim=True)
    share = topk_share(v, ks)
    pr = participation_ratio(v)
    return pd.DataFrame({"k": ks, "k_fraction": [k / d for k in ks], "share": share,
                         "random_share": [float(rcum[:, k - 1].mean()) for k in ks],
                         "random_share_std": [float(rcum[:, k - 1].std()) if n_random > 1 else 0.0 for k in ks],
                         "participation_ratio": pr})


@dataclass
class Alignment:
    """Result of :func:`direction_alignment`.

    Attributes:
        top: the ``top`` neurons per layer by ``|cos|``: ``layer, rank, neuron, cosine, abs_cosine, weight_norm``.
        by_layer: ``layer, max_abs_cos, mean_abs_cos, top_neuron, random_max_abs_cos, random_max_abs_cos_std,
            n_above_random`` (neurons whose ``|cos|`` beats the mean random maximum).
    """

    top: pd.DataFrame
    by_layer: pd.DataFrame


def neuron_cosines(model, direction, layer: int) -> Tensor:
    """``Float[Tensor, "d_mlp"]`` cosines between the direction and each output weight row of ``layer``."""
    w = mlp_out_weight(model, layer).double().cpu()  # [d_model, d_mlp]
    v = direction_vector(direction, layer=layer, d_model=w.shape[0])
    norms = w.norm(dim=0).clamp_min(1e-30)
    return (v / v.norm()) @ w / norms


def direction_alignment(model, direction, layers: Sequence[int] | None = None, top: int = 10, n_random: int = 32,
                        seed: int = 0) -> Alignment:
    """Cosine between the direction and every MLP output weight row, per layer.

    Args:
        top: neurons listed per layer.
        n_random: random unit directions for the ``random_max_abs_cos`` baseline (seeded).
    """
    layers = model_layers(model, layers)
    if not is_int(top) or top < 1:
        raise WorkbenchError(f"top must be a positive int, got {top!r}")
    gen = torch.Generator().manual_seed(seed)
    tops, summary = [], []
    for layer in layers:
        w = mlp_out_weight(model, layer).double().cpu()
        cos = neuron_cosines(model, direction, layer)
        wn = w.norm(dim=0)
        a = cos.abs()
        order = torch.argsort(a, descending=True)[:top]
        for r, i in enumerate(order.tolist(), 1):
            tops.append({"layer": layer, "rank": r, "neuron": i, "cosine": float(cos[i]), "abs_cosine": float(a[i]),
                         "weight_norm": float(wn[i])})
        rnd = torch.randn(n_random, w.shape[0], generator=gen, dtype=torch.float64)
        rnd = rnd / rnd.norm(dim=1, keepdim=True)
        rmax = ((rnd @ w) / wn.clamp_min(1e-30)).abs().max(dim=1).values
        summary.append({"layer": layer, "max_abs_cos": float(a.max()), "mean_abs_cos": float(a.mean()),
                        "top_neuron": int(order[0]), "random_max_abs_cos": float(rmax.mean()),
                        "random_max_abs_cos_std": float(rmax.std()) if n_random > 1 else 0.0,
                        "n_above_random": int((a > rmax.mean()).sum())})
    return Alignment(pd.DataFrame(tops), pd.DataFrame(summary))

"""Activation sparsity of the MLP hidden layer, streamed over cache-store entries.

The MLP hidden activation is ``blocks.{l}.mlp.hook_post`` -- the input of the down projection (for SwiGLU
``act(gate(x)) * up(x)``). A value is *inactive* at threshold ``t`` when ``|a| <= t``: ``t = 0`` counts exact
zeros (ReLU), ``t > 0`` the near-zeros of SiLU/GELU/SwiGLU. Only real (unpadded) positions count: entries
cached with ``positions="all"`` carry a mask (``entry.mask``) and padded positions are skipped.

Every function here reads an entry with ``entry.iter_shards(hook)`` only -- one shard in memory at a time --
and accumulates exact integer counts, so the numbers do not depend on the shard size:

* :func:`activation_sparsity` -- per layer and threshold, the fraction of inactive values;
* :func:`activation_ratio` -- per token, the fraction of *active* channels (1 - its sparsity), summarised
  per layer (mean, std, quantiles) or listed token by token;
* :func:`channel_thresholds` + :func:`channel_sparsity` -- CHESS-style per-channel thresholds (Li et al.):
  channel ``i``'s threshold is the ``q``-quantile of its ``|activation|`` on a calibration entry, computed
  exactly in two streaming passes (a log-spaced histogram, then the values of the one bin that holds the
  quantile); applied to other entries it gives the per-channel sparsity of each prompt category;
* :func:`sparsity_by_category` -- all of the above for several prompt sets through the store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..progress import progress
from ..vocab import position_offsets
from ._common import check_fraction, check_thresholds, entry_layers, entry_mask, iter_real, stream_layers

#: The threshold the one-number summaries use (``|a| <= 0.01`` is inactive).
DEFAULT_THRESHOLD = 0.01
#: The default grid of thresholds on ``|a|``.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

# log-spaced histogram of |a| used for quantiles: bin 0 = [0, 1e-10), then BINS_PER_DECADE bins per decade
# up to 1e6, last bin [1e6, inf)
LOG_LO, LOG_HI, BINS_PER_DECADE = -10.0, 6.0, 16
N_BINS = int((LOG_HI - LOG_LO) * BINS_PER_DECADE) + 2


def log_bin(a_abs: Tensor, bins_per_decade: int = BINS_PER_DECADE) -> Tensor:
    """Index of the log-spaced bin of each non-negative value (``Int64`` of the same shape).

    Bin 0 holds ``[0, 10**LOG_LO)``; bin ``j`` (1 <= j < n-1) holds ``[10**(LOG_LO + (j-1)/bpd), 10**(LOG_LO + j/bpd))``;
    the last bin everything from ``10**LOG_HI`` up. Monotone non-decreasing in the value.
    """
    n = int((LOG_HI - LOG_LO) * bins_per_decade) + 2
    lg = torch.log10(a_abs.float().clamp_min(1e-38))
    idx = torch.floor((lg - LOG_LO) * bins_per_decade).long() + 1
    return idx.clamp_(0, n - 1)


def count_inactive(a_abs: Tensor, thresholds: Tensor) -> Tensor:
    """Number of values ``<= t`` for each threshold.

    Args:
        a_abs: ``Float[Tensor, "..."]`` non-negative values (``|activation|``).
        thresholds: ``Float[Tensor, "T"]`` sorted ascending.

    Returns:
        ``Int64[Tensor, "T"]``.
    """
    idx = torch.bucketize(a_abs.flatten(), thresholds.to(a_abs.dtype), right=False)  # a <= t[j]  <=>  idx <= j
    return torch.bincount(idx, minlength=len(thresholds) + 1)[: len(thresholds)].cumsum(0)


def sparsity_of(acts: Tensor, thresholds=DEFAULT_THRESHOLDS, mask: Tensor | None = None) -> Tensor:
    """Fraction of inactive values (``|a| <= t``) of an in-memory tensor, per threshold.

    Args:
        acts: ``Float[Tensor, "... d"]``.
        thresholds: a number or a list of thresholds.
        mask: optional ``Bool[Tensor, "..."]`` over the leading axes (True = count this position).

    Returns:
        ``Float[Tensor, "T"]`` (float64), in the order of ``thresholds``.
    """
    ts = check_thresholds(thresholds)
    a = acts.detach().float().abs()
    if mask is not None:
        if tuple(mask.shape) != tuple(a.shape[:-1]):
            raise WorkbenchError(f"mask has shape {tuple(mask.shape)}; expected the leading axes of acts {tuple(a.shape[:-1])}")
        a = a[mask.bool()]
    if a.numel() == 0:
        raise WorkbenchError("no values to count (empty tensor or all-False mask)")
    order = sorted(range(len(ts)), key=lambda i: ts[i])
    counts = count_inactive(a, torch.tensor([ts[i] for i in order], dtype=torch.float32))
    out = torch.empty(len(ts), dtype=torch.float64)
    out[torch.tensor(order)] = counts.double() / a.numel()
    return out


def _sorted_thresholds(thresholds) -> tuple[list[float], Tensor]:
    ts = sorted(set(check_thresholds(thresholds)))
    return ts, torch.tensor(ts, dtype=torch.float32)


# ------------------------------------------------------------------------------------- global thresholds
def activation_sparsity(entry, thresholds=DEFAULT_THRESHOLDS, layers: Sequence[int] | None = None,
                        show_progress: bool = False) -> pd.DataFrame:
    """Per layer, the fraction of MLP hidden activations with ``|a| <= t`` for each threshold ``t``.

    Args:
        entry: a store entry (or anything with ``hook_names``, ``iter_shards`` and optionally ``mask``)
            holding ``blocks.{l}.mlp.hook_post`` as ``Float[Tensor, "prompt pos d_mlp"]``.
        thresholds: thresholds on ``|a|`` (0 counts exact zeros).
        layers: a subset of the entry's layers (default: all it holds).

    Returns:
        One row per (layer, threshold): ``layer, threshold, sparsity, n_inactive, n_values, n_tokens``
        (``n_values = n_tokens * d_mlp`` real values counted).
    """
    ts, tt = _sorted_thresholds(thresholds)
    rows = []
    for layer, hook, shards in stream_layers(entry, layers, show_progress, "sparsity"):
        counts = torch.zeros(len(ts), dtype=torch.int64)
        n_tokens, d = 0, None
        for _, x, real in shards:
            a = x[real].abs_()  # [n, d]
            counts += count_inactive(a, tt)
            n_tokens += a.shape[0]
            d = a.shape[1]
        _check_counted(hook, n_tokens)
        for t, c in zip(ts, counts.tolist()):
            rows.append({"layer": layer, "threshold": t, "sparsity": c / (n_tokens * d), "n_inactive": c,
                         "n_values": n_tokens * d, "n_tokens": n_tokens})
    return pd.DataFrame(rows, columns=["layer", "threshold", "sparsity", "n_inactive", "n_values", "n_tokens"])


def _check_counted(hook: str, n_tokens: int) -> None:
    if n_tokens == 0:
        raise WorkbenchError(f"{hook}: the entry has no real (unpadded) position to count")


def activation_ratio(entry, threshold: float = DEFAULT_THRESHOLD, layers: Sequence[int] | None = None,
                     per_token: bool = False, show_progress: bool = False) -> pd.DataFrame:
    """Activation ratio per token: the fraction of a token's MLP channels with ``|a| > threshold``.

    Counted exactly (an integer histogram of active channels per token), so the quantiles are exact.

    Args:
        per_token: list every real token instead of the per-layer summary.

    Returns:
        Summary (default), one row per layer: ``layer, threshold, mean, std, min, p05, p25, p50, p75, p95, max,
        n_tokens``; or with ``per_token``, one row per (layer, real token): ``layer, prompt, position,
        activation_ratio`` (``position``: offset from the end of the prompt, -1 = last token).
    """
    (t,) = check_thresholds(threshold, "threshold")
    rows = []
    for layer, hook, shards in stream_layers(entry, layers, show_progress, "activation ratio"):
        hist, d, n_tokens = None, None, 0
        for rows_slice, x, real in shards:
            d = x.shape[-1]
            active = (x.abs() > t).sum(-1)  # [rows, pos]
            if per_token:
                pos = position_offsets(getattr(entry, "positions", None), x.shape[1])
                r, p = real.nonzero(as_tuple=True)
                for ri, pi, v in zip((r + rows_slice.start).tolist(), p.tolist(), active[real].tolist()):
                    rows.append({"layer": layer, "prompt": ri, "position": pos[pi], "activation_ratio": v / d})
            h = torch.bincount(active[real], minlength=d + 1)
            hist = h if hist is None else hist + h
            n_tokens += int(real.sum())
        _check_counted(hook, n_tokens)
        if not per_token:
            rows.append({"layer": layer, "threshold": t, **_hist_summary(hist, d), "n_tokens": n_tokens})
    if per_token:
        return pd.DataFrame(rows, columns=["layer", "prompt", "position", "activation_ratio"])
    return pd.DataFrame(rows, columns=["layer", "threshold", "mean", "std", "min", "p05", "p25", "p50", "p75", "p95",
                                       "max", "n_tokens"])


def _hist_summary(hist: Tensor, d: int) -> dict:
    """mean/std/quantiles of ``k / d`` from an integer histogram ``hist[k]`` (exact)."""
    k = torch.arange(len(hist), dtype=torch.float64)
    h = hist.double()
    n = h.sum()
    mean = float((k * h).sum() / n)
    var = float(((k - mean) ** 2 * h).sum() / n)
    cum = hist.cumsum(0)
    nz = (hist > 0).nonzero().flatten()

    def q(p: float) -> float:  # the smallest k with F(k) >= p (lower quantile)
        need = max(1, math.ceil(p * int(n)))
        return float(int(torch.searchsorted(cum, torch.tensor(need))) / d)

    return {"mean": mean / d, "std": math.sqrt(var) / d, "min": int(nz[0]) / d, "p05": q(0.05), "p25": q(0.25),
            "p50": q(0.5), "p75": q(0.75), "p95": q(0.95), "max": int(nz[-1]) / d}


# ------------------------------------------------------------------------------------ channel thresholds
@dataclass
class ChannelThresholds:
    """CHESS-style per-channel thresholds: channel ``i`` of layer ``l`` is inactive when ``|a_i| <= t[l][i]``.

    Attributes:
        thresholds: ``{layer: Float[Tensor, "d_mlp"]}``; ``t[l][i]`` is the ``quantile``-quantile of channel
            ``i``'s ``|activation|`` on the calibration set (the ``ceil(q * n)``-th smallest of its ``n`` values).
        quantile: the target sparsity ``q`` of every channel on the calibration set.
        n_tokens: real tokens of the calibration set.
        meta: free-form provenance (calibration entry key, model fingerprint...).
    """

    thresholds: dict[int, Tensor]
    quantile: float
    n_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.thresholds)

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, channel): ``layer, channel, threshold``."""
        rows = [{"layer": l, "channel": i, "threshold": float(v)}
                for l in self.layers for i, v in enumerate(self.thresholds[l].tolist())]
        return pd.DataFrame(rows, columns=["layer", "channel", "threshold"])

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (one tensor per layer) and ``path.json`` (quantile, n_tokens, meta)."""
        import json

        from safetensors.torch import save_file

        p = Path(path).with_suffix("")
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"layer.{l}": t.float().contiguous() for l, t in self.thresholds.items()},
                  str(p.with_suffix(".safetensors")))
        info = {"kind": "workbench.channel_thresholds", "format_version": 1, "quantile": self.quantile,
                "n_tokens": self.n_tokens, "layers": self.layers, "meta": self.meta}
        p.with_suffix(".json").write_text(json.dumps(info, indent=1))
        return p.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> "ChannelThresholds":
        import json

        from safetensors.torch import load_file

        p = Path(path).with_suffix("")
        if not p.with_suffix(".json").exists():
            raise WorkbenchError(f"no channel thresholds at {str(p.with_suffix('.json'))!r}")
        info = json.loads(p.with_suffix(".json").read_text())
        if info.get("kind") != "workbench.channel_thresholds" or info.get("format_version", 99) > 1:
            raise WorkbenchError(f"{str(p.with_suffix('.json'))!r} is not a channel-thresholds file this version reads")
        tensors = load_file(str(p.with_suffix(".safetensors")))
        return cls({int(k.split(".")[1]): v for k, v in tensors.items()}, info["quantile"], info["n_tokens"],
                   info.get("meta", {}))


def channel_thresholds(entry, quantile: float = 0.5, layers: Sequence[int] | None = None,
                       show_progress: bool = False) -> ChannelThresholds:
    """Per-channel thresholds = the ``quantile`` of each channel's ``|activation|`` on a calibration entry.

    Exact, in two streaming passes per layer: (1) a log-spaced histogram per channel finds the bin holding the
    ``k = ceil(q * n)``-th smallest value; (2) only the values falling in that bin are kept and sorted. Memory:
    ``d_mlp * N_BINS`` counts plus the values of one bin per channel.

    Args:
        entry: the calibration entry (``mlp.hook_post``; positions ``"all"`` recommended).
        quantile: target sparsity ``q`` in (0, 1) of each channel on the calibration set.

    Returns:
        A :class:`ChannelThresholds`.
    """
    q = check_fraction(quantile, "quantile")
    mask = entry_mask(entry)
    out: dict[int, Tensor] = {}
    n_tokens = 0
    for layer, hook in progress(entry_layers(entry, layers), desc="channel thresholds", enabled=show_progress):
        hist, n_tokens = None, 0
        for _, x, real in iter_real(entry, hook, mask):
            a = x[real].abs_()
            d = a.shape[1]
            flat = (torch.arange(d) * N_BINS)[None, :] + log_bin(a)
            h = torch.bincount(flat.flatten(), minlength=d * N_BINS).view(d, N_BINS)
            hist = h if hist is None else hist + h
            n_tokens += a.shape[0]
        _check_counted(hook, n_tokens)
        k = max(1, math.ceil(q * n_tokens))
        cum = hist.cumsum(1)  # [d, bins]
        target = (cum < k).sum(1)  # first bin with cum >= k
        below = torch.where(target > 0, cum.gather(1, (target - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(target))
        rank = k - below  # 1-based rank of the k-th value inside its bin
        vals, chans = [], []
        for _, x, real in iter_real(entry, hook, mask):
            a = x[real].abs_()
            sel = log_bin(a) == target[None, :]
            vals.append(a[sel])
            chans.append(sel.nonzero(as_tuple=True)[1])
        v, c = torch.cat(vals), torch.cat(chans)
        v, order = torch.sort(v, stable=True)
        c = c[order]
        c, order = torch.sort(c, stable=True)  # by channel, values ascending inside each channel
        v = v[order]
        counts = torch.bincount(c, minlength=hist.shape[0])
        start = counts.cumsum(0) - counts
        out[layer] = v[start + rank - 1].clone()
    return ChannelThresholds(out, q, n_tokens, {"calibration": getattr(entry, "key", None)})


def channel_sparsity(entry, thresholds: ChannelThresholds, layers: Sequence[int] | None = None,
                     show_progress: bool = False) -> pd.DataFrame:
    """Per layer, the fraction of values with ``|a_i| <= t_i`` under per-channel thresholds.

    Returns:
        One row per layer: ``layer, quantile, sparsity, n_inactive, n_values, n_tokens``.
    """
    if not isinstance(thresholds, ChannelThresholds):
        raise WorkbenchError(f"thresholds must be a ChannelThresholds (from channel_thresholds), got {type(thresholds).__name__}")
    if layers is None:
        have = [l for l, _ in entry_layers(entry)]
        layers = [l for l in have if l in thresholds.thresholds]
        if not layers:
            raise WorkbenchError(f"the thresholds cover layers {thresholds.layers}, the entry holds layers {have}")
    missing = [l for l in layers if l not in thresholds.thresholds]
    if missing:
        raise WorkbenchError(f"no channel thresholds for layers {missing}; they cover {thresholds.layers}")
    rows = []
    for layer, hook, shards in stream_layers(entry, layers, show_progress, "channel sparsity"):
        t = thresholds.thresholds[layer].float()
        c, n_tokens = 0, 0
        for _, x, real in shards:
            a = x[real].abs_()
            if a.shape[1] != t.shape[0]:
                raise WorkbenchError(f"{hook}: d_mlp {a.shape[1]} but the thresholds of layer {layer} have {t.shape[0]} channels")
            c += int((a <= t[None, :]).sum())
            n_tokens += a.shape[0]
        _check_counted(hook, n_tokens)
        n = n_tokens * t.shape[0]
        rows.append({"layer": layer, "quantile": thresholds.quantile, "sparsity": c / n, "n_inactive": c,
                     "n_values": n, "n_tokens": n_tokens})
    return pd.DataFrame(rows, columns=["layer", "quantile", "sparsity", "n_inactive", "n_values", "n_tokens"])


# ------------------------------------------------------------------------------------------ categories
@dataclass
class CategorySparsity:
    """Sparsity tables of several prompt sets (long format, a ``category`` column each).

    Attributes:
        sparsity: :func:`activation_sparsity` rows + ``category`` (for ``plots.sparsity_by_layer``).
        ratio: :func:`activation_ratio` summaries + ``category``.
        channel: :func:`channel_sparsity` rows + ``category`` (``None`` without channel thresholds).
        entries: ``{category: entry key}``.
    """

    sparsity: pd.DataFrame
    ratio: pd.DataFrame
    channel: pd.DataFrame | None
    entries: dict[str, str]


def mlp_entry(model, prompts, layers: Sequence[int] | None = None, store=None, batch_size: int = 32,
              dtype: str = "float32", show_progress: bool = False):
    """``mlp.hook_post`` of ``prompts`` at every position (``positions="all"``), from the cache store."""
    from ..store import get_or_compute

    hooks = ("mlp_post",) if layers is None else ("mlp_post", list(layers))
    return get_or_compute(model, prompts, hooks=hooks, positions="all", dtype=dtype, store=store,
                          batch_size=batch_size, show_progress=show_progress)


def sparsity_by_category(
    model,
    prompt_sets: Mapping[str, Sequence[str]],
    thresholds=DEFAULT_THRESHOLDS,
    ratio_threshold: float = DEFAULT_THRESHOLD,
    channel: ChannelThresholds | None = None,
    layers: Sequence[int] | None = None,
    store=None,
    batch_size: int = 32,
    show_progress: bool = False,
) -> CategorySparsity:
    """:func:`activation_sparsity`, :func:`activation_ratio` and (with ``channel``) :func:`channel_sparsity`
    for each prompt set (e.g. ``{"harmful": ..., "benign": ..., "jailbreak": ...}``), streamed from store
    entries of ``mlp.hook_post`` at every position (computed once, reused afterwards)."""
    if not isinstance(prompt_sets, Mapping) or not prompt_sets:
        raise WorkbenchError("prompt_sets must be a non-empty {category: prompts} mapping")
    check_thresholds(thresholds)
    check_thresholds(ratio_threshold, "ratio_threshold")
    sp, ra, ch, keys = [], [], [], {}
    for cat, prompts in prompt_sets.items():
        if isinstance(prompts, str) or len(prompts) == 0:
            raise WorkbenchError(f"prompt set {cat!r} must be a non-empty list of prompts")
        entry = mlp_entry(model, list(prompts), layers, store, batch_size, show_progress=show_progress)
        keys[cat] = entry.key
        sp.append(activation_sparsity(entry, thresholds, layers, show_progress).assign(category=cat))
        ra.append(activation_ratio(entry, ratio_threshold, layers, show_progress=show_progress).assign(category=cat))
        if channel is not None:
            ch.append(channel_sparsity(entry, channel, layers, show_progress).assign(category=cat))
    return CategorySparsity(pd.concat(sp, ignore_index=True), pd.concat(ra, ignore_index=True),
                            pd.concat(ch, ignore_index=True) if ch else None, keys)

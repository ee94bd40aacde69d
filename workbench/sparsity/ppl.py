"""PPL-p% sparsity (Sparsing Law, Luo et al. 2024): how sparse the MLP can be made before the model degrades.

Zero every MLP hidden activation with ``|a| <= t`` (hook on ``blocks.{l}.mlp.hook_post``) and measure the
loss on a held-out text set (:mod:`.heldout`). The **PPL-p% threshold** is the largest ``t`` whose
perplexity rises by at most ``p`` % over the dense model, ``exp(L_t - L_0) - 1 <= p / 100`` (the paper's
``target_ppl_ratio = 1 + p%``); the **PPL-p% sparsity** is the fraction of real held-out values zeroed at that
threshold, counted during the same forward passes. ``criterion="loss"`` uses the relative loss increase
``L_t / L_0 - 1 <= p / 100`` instead.

Scopes: ``"overall"`` applies one threshold to every layer at once; a layer ``l`` applies it to that layer
only (the others stay dense), which tells how far each layer alone can be sparsified.

Search: a first dense pass records the base loss and a log-spaced histogram of ``|a|`` per layer, so a target
sparsity ``s`` maps to a threshold ``t(s)`` (the ``s``-quantile of the scope's values). Bisection on ``s`` in
``[0, 1]`` with real forward passes then keeps the largest evaluated threshold that satisfies the criterion
(assuming the increase grows with ``t``), until the bracket is narrower than ``tol`` (in sparsity) or
``max_evals`` passes were spent per ``(scope, p)``. Every evaluated point is kept (``curve``).

``weighting="output_norm"`` thresholds ``|a_i| * ||W_out[:, i]||`` instead of ``|a_i|`` -- the norm of what
neuron ``i`` writes to the residual stream, as in the Sparsing Law code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..progress import progress
from ._common import mlp_out_weight, mlp_post_name, model_layers
from .heldout import HeldoutText, token_losses
from .hooks import ThresholdZeroing
from .stats import LOG_HI, LOG_LO, log_bin
from ..vocab import is_int

CRITERIA = ("ppl", "loss")
WEIGHTINGS = ("none", "output_norm")
_BPD = 64  # histogram bins per decade for the quantile -> threshold map


@dataclass
class PPLSparsity:
    """Result of :func:`ppl_sparsity`.

    Attributes:
        result: one row per (scope, p): ``scope, layer, p, criterion, threshold, sparsity, loss, base_loss,
            ppl_increase_pct, loss_increase_pct, n_evals`` (``layer`` is None for ``overall``).
        curve: every forward pass made: ``scope, layer, target_sparsity, threshold, sparsity, loss,
            ppl_increase_pct, loss_increase_pct`` (for ``plots.ppl_sparsity_curve``).
        base_loss: the dense loss (nats per target token).
        n_targets: target tokens of the held-out set.
    """

    result: pd.DataFrame
    curve: pd.DataFrame
    base_loss: float
    n_targets: int

    def at(self, p: float, scope: str = "overall") -> dict:
        """The result row of one ``(scope, p)`` as a dict."""
        r = self.result[(self.result["scope"] == scope) & (self.result["p"] == float(p))]
        if r.empty:
            raise WorkbenchError(f"no PPL-{p:g}% result for scope {scope!r}; have {sorted(set(self.result['scope']))} "
                                 f"x p={sorted(set(self.result['p']))}")
        return r.iloc[0].to_dict()


def scope_label(scope) -> str:
    return "overall" if scope == "overall" else f"layer {scope}"


class _Searcher:
    """Forward passes of the held-out text with thresholds on the MLP hidden activations."""

    def __init__(self, model, text: HeldoutText, layers: list[int], weighting: str, batch_size: int):
        self.model, self.text, self.layers, self.batch_size = model, text, layers, batch_size
        self.scale = None
        if weighting == "output_norm":
            self.scale = {l: mlp_out_weight(model, l).float().norm(dim=0).cpu() for l in layers}
        self.rows: list[dict] = []
        self._memo: dict[tuple, dict] = {}
        self._dense()

    def _dense(self) -> None:
        n_bins = int((LOG_HI - LOG_LO) * _BPD) + 2
        self.hist = {l: torch.zeros(n_bins, dtype=torch.int64) for l in self.layers}
        self.vmax = {l: 0.0 for l in self.layers}
        state = {"mask": None}

        def make(layer):
            def fn(act: Tensor, hook=None):
                m = state["mask"]
                a = act.detach().abs().float()
                if self.scale is not None:
                    a = a * self.scale[layer].to(a.device)
                a = a[m.to(a.device)] if m is not None and tuple(m.shape) == tuple(a.shape[:2]) else a.reshape(-1, a.shape[-1])
                self.hist[layer] += torch.bincount(log_bin(a, _BPD).flatten().cpu(), minlength=n_bins)
                if a.numel():
                    self.vmax[layer] = max(self.vmax[layer], float(a.max()))
                return None
            return fn

        hooks = [(mlp_post_name(l), make(l)) for l in self.layers]
        total, n = token_losses(self.model, self.text, hooks, self.batch_size, on_batch=lambda m: state.__setitem__("mask", m))
        self.base_loss, self.n_targets = total / n, n
        if not math.isfinite(self.base_loss):
            raise WorkbenchError(f"the dense loss on the held-out text is not finite ({self.base_loss})")

    def threshold_for(self, layers: list[int], s: float) -> float:
        """The ``s``-quantile of the scope's ``|a|`` (geometric interpolation inside a histogram bin)."""
        if s >= 1.0:
            return max(self.vmax[l] for l in layers)
        if s <= 0.0:
            return 0.0
        hist = sum(self.hist[l] for l in layers)
        cum = hist.cumsum(0)
        need = s * float(cum[-1])
        j = int(torch.searchsorted(cum.double(), torch.tensor(need, dtype=torch.float64)))
        j = min(j, len(hist) - 1)
        before = float(cum[j - 1]) if j > 0 else 0.0
        frac = (need - before) / max(float(hist[j]), 1.0)
        if j == 0:
            return frac * 10 ** LOG_LO
        lo = 10 ** (LOG_LO + (j - 1) / _BPD)
        hi = min(10 ** (LOG_LO + j / _BPD), max(self.vmax[l] for l in layers))
        return lo * (hi / lo) ** frac if hi > lo else lo

    def evaluate(self, scope, s: float) -> dict:
        layers = self.layers if scope == "overall" else [scope]
        key = (scope, round(s, 9))
        if key in self._memo:
            return self._memo[key]
        t = self.threshold_for(layers, s)
        z = ThresholdZeroing(self.model, {l: t for l in layers},
                             scale=None if self.scale is None else {l: self.scale[l] for l in layers})
        total, n = token_losses(self.model, self.text, z.hooks, self.batch_size, on_batch=z.set_mask)
        loss = total / n
        row = {"scope": scope_label(scope), "layer": None if scope == "overall" else scope, "target_sparsity": s,
               "threshold": t, "sparsity": z.sparsity()["overall"], "loss": loss,
               "ppl_increase_pct": 100.0 * math.expm1(loss - self.base_loss) if math.isfinite(loss) else math.inf,
               "loss_increase_pct": 100.0 * (loss / self.base_loss - 1.0) if self.base_loss > 0 else math.inf}
        self._memo[key] = row
        self.rows.append(row)
        return row


def _check_common(text, p, criterion, weighting, tol, max_evals):
    if not isinstance(text, HeldoutText):
        raise WorkbenchError(f"text must be a HeldoutText (from heldout_text / organism_heldout), got {type(text).__name__}")
    if criterion not in CRITERIA:
        raise WorkbenchError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if weighting not in WEIGHTINGS:
        raise WorkbenchError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    ps = [p] if isinstance(p, (int, float)) else list(p)
    if not ps or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1000) for v in ps):
        raise WorkbenchError(f"p must be percentages in (0, 1000), e.g. (1, 5); got {p!r}")
    if not (0 < tol < 1):
        raise WorkbenchError(f"tol (a width in sparsity) must be in (0, 1), got {tol!r}")
    if not is_int(max_evals) or max_evals < 1:
        raise WorkbenchError(f"max_evals must be a positive int, got {max_evals!r}")
    return sorted(float(v) for v in ps)


def _scopes(model, scopes, layers: list[int]) -> list:
    if scopes is None:
        return ["overall", *layers]
    if isinstance(scopes, (str, int)):
        scopes = [scopes]
    out = []
    for s in scopes:
        if s == "overall":
            out.append(s)
        elif is_int(s):
            (l,) = model_layers(model, [s])
            if l not in layers:
                raise WorkbenchError(f"scope layer {s} is not among the searched layers {layers}")
            out.append(l)
        else:
            raise WorkbenchError(f"unknown scope {s!r}; expected 'overall' or a layer index")
    if not out:
        raise WorkbenchError("no scope to search; pass 'overall' and/or layer indices")
    return out


def ppl_sparsity(
    model,
    text: HeldoutText,
    p: float | Sequence[float] = (1.0, 5.0),
    scopes: Sequence | None = None,
    layers: Sequence[int] | None = None,
    criterion: str = "ppl",
    weighting: str = "none",
    tol: float = 0.01,
    max_evals: int = 12,
    batch_size: int = 32,
    show_progress: bool = False,
) -> PPLSparsity:
    """PPL-p% thresholds and sparsities, overall and per layer, by bisection with real forward passes.

    Args:
        text: the held-out set (:func:`~workbench.sparsity.organism_heldout` or :func:`heldout_text`).
        p: tolerated increase(s) in percent.
        scopes: ``"overall"`` and/or layer indices; default ``["overall", *layers]``.
        layers: the layers "overall" thresholds (default: all).
        criterion: ``"ppl"`` (perplexity ratio, the paper's) or ``"loss"`` (relative loss increase).
        weighting: ``"none"`` (threshold on ``|a|``) or ``"output_norm"`` (on ``|a_i| * ||W_out[:, i]||``).
        tol: stop when the sparsity bracket is narrower than this.
        max_evals: forward passes over ``text`` at most per (scope, p) (memoised across p).

    Returns:
        A :class:`PPLSparsity`. Its thresholds satisfy the criterion *as measured* (``ppl_increase_pct`` or
        ``loss_increase_pct`` <= p in the result row); threshold 0 (nothing zeroed) when nothing larger does.
    """
    ps = _check_common(text, p, criterion, weighting, tol, max_evals)
    layers = model_layers(model, layers)
    scopes = _scopes(model, scopes, layers)
    search = _Searcher(model, text, layers, weighting, batch_size)
    key = "ppl_increase_pct" if criterion == "ppl" else "loss_increase_pct"
    results = []
    for scope in progress(scopes, "PPL-p% search", show_progress):
        for pv in ps:
            n0 = len(search.rows)
            lo, hi = 0.0, 1.0
            best = {"threshold": 0.0, "sparsity": _zero_sparsity(search, scope), "loss": search.base_loss,
                    "ppl_increase_pct": 0.0, "loss_increase_pct": 0.0}
            top = search.evaluate(scope, 1.0)
            evals = 1
            if top[key] <= pv:
                best = top
            else:
                while hi - lo > tol and evals < max_evals:
                    mid = (lo + hi) / 2
                    r = search.evaluate(scope, mid)
                    evals += 1
                    if r[key] <= pv:
                        lo, best = mid, (r if r["threshold"] >= best["threshold"] else best)
                    else:
                        hi = mid
            results.append({"scope": scope_label(scope), "layer": None if scope == "overall" else scope, "p": pv,
                            "criterion": criterion, "threshold": best["threshold"], "sparsity": best["sparsity"],
                            "loss": best["loss"], "base_loss": search.base_loss,
                            "ppl_increase_pct": best["ppl_increase_pct"], "loss_increase_pct": best["loss_increase_pct"],
                            "n_evals": len(search.rows) - n0})
    return PPLSparsity(pd.DataFrame(results), _curve(search), search.base_loss, search.n_targets)


def _zero_sparsity(search: _Searcher, scope) -> float:
    """Fraction of exact zeros (what threshold 0 'zeroes') from the dense histogram."""
    layers = search.layers if scope == "overall" else [scope]
    h = sum(search.hist[l] for l in layers)
    return float(h[0]) / float(h.sum()) if search.scale is None else 0.0


def _curve(search: _Searcher) -> pd.DataFrame:
    cols = ["scope", "layer", "target_sparsity", "threshold", "sparsity", "loss", "ppl_increase_pct", "loss_increase_pct"]
    df = pd.DataFrame(search.rows, columns=cols)
    return df.sort_values(["scope", "threshold"], ignore_index=True) if len(df) else df


def ppl_curve(
    model,
    text: HeldoutText,
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    scopes: Sequence | None = ("overall",),
    layers: Sequence[int] | None = None,
    weighting: str = "none",
    batch_size: int = 32,
    show_progress: bool = False,
) -> pd.DataFrame:
    """The loss / perplexity increase at a grid of target sparsities (thresholds = quantiles of ``|a|``).

    Returns:
        ``scope, layer, target_sparsity, threshold, sparsity, loss, ppl_increase_pct, loss_increase_pct`` --
        the input of ``plots.ppl_sparsity_curve`` (``sparsity`` is the measured one).
    """
    _check_common(text, 1.0, "ppl", weighting, 0.5, 1)
    ss = [float(s) for s in sparsities]
    if not ss or any(not 0 <= s <= 1 for s in ss):
        raise WorkbenchError(f"sparsities must be fractions in [0, 1], got {list(sparsities)!r}")
    layers = model_layers(model, layers)
    scopes = _scopes(model, scopes, layers)
    search = _Searcher(model, text, layers, weighting, batch_size)
    for scope in progress(scopes, "PPL curve", show_progress):
        for s in ss:
            search.evaluate(scope, s)
    return _curve(search)

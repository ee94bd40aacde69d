"""Figures of the sparsity analyses (issue 7, ``workbench.sparsity``; not written yet when these were).

The module did not exist when this was written, so each function documents the long-format DataFrame it
expects and takes the column names as arguments (defaults below), checking them with a clear error:

* :func:`sparsity_by_layer` -- ``layer``, ``sparsity`` (fraction of MLP hidden activations that are zero or
  below the threshold), optional ``category`` (harmful / benign / jailbreak), optional ``threshold``.
* :func:`ppl_sparsity_curve` -- ``sparsity``, ``ppl_increase_pct`` (loss / perplexity increase in % when the
  activations below a threshold are zeroed), optional ``scope`` (``overall``, ``layer 3`` ...) and ``threshold``.
* :func:`neuron_ablation_curve` -- ``n_ablated``, ``value``, ``selection`` (``differential`` / ``random``),
  optional ``metric`` (e.g. ``refusal_rate`` / ``loss``: one panel each) and repeated rows (random seeds),
  drawn as mean +- std.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import WorkbenchError
from ._checks import require_frame, require_unique, select
from .style import color_map, ordered, styled


def sparsity_by_layer(
    df: pd.DataFrame,
    value: str = "sparsity",
    color: str | None = "category",
    threshold: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Activation sparsity per layer, one line per ``color`` group (e.g. prompt category).

    Args:
        df: columns ``layer`` and ``value``; optional ``color`` column (ignored when absent) and ``threshold``
            (when the table holds several thresholds, pick one with ``threshold=...``).
        value: the statistic to plot (``sparsity``, ``activation_ratio`` ...), a fraction in [0, 1].

    Returns:
        One line trace per group (one trace when there is no ``color`` column), y in [0, 1].
    """
    what = "sparsity_by_layer"
    df = require_frame(df, what, ["layer", value])
    df = select(df, what, threshold=threshold)
    has_color = color is not None and color in df.columns
    keys = ([color] if has_color else []) + ["layer"]
    require_unique(df, keys, what, "several thresholds? pick one with threshold=..." if "threshold" in df.columns
                   else "aggregate first")
    groups = ordered(df[color].tolist()) if has_color else [None]
    colors = color_map(groups)
    fig = go.Figure()
    for g in groups:
        sub = (df[df[color] == g] if has_color else df).sort_values("layer")
        fig.add_trace(go.Scatter(x=sub["layer"], y=sub[value], mode="lines+markers", name=str(g if g is not None else value),
                                 line=dict(color=colors[g], width=2.5),
                                 hovertemplate=f"{g if g is not None else ''} layer %{{x}}<br>{value} %{{y:.3f}}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    thr = f" (threshold {threshold:g})" if threshold is not None else ""
    return styled(fig, title or f"MLP activation sparsity per layer{thr}", "layer", value.replace("_", " "))


def ppl_sparsity_curve(
    df: pd.DataFrame,
    x: str = "sparsity",
    y: str = "ppl_increase_pct",
    series: str | None = "scope",
    p: Sequence[float] = (1.0, 5.0),
) -> go.Figure:
    """The PPL-p% trade-off (Sparsing Law): loss increase against the sparsity reached, per scope.

    Args:
        df: columns ``x`` (sparsity, fraction) and ``y`` (increase in %, e.g. 1.0 = +1 %); optional ``series``
            column (one line each, e.g. ``overall`` and per-layer) and ``threshold`` (shown on hover).
        p: tolerances drawn as dashed horizontal lines (the PPL-p% points lie where a curve crosses them).

    Returns:
        One line trace per series (points sorted by ``x``); the ``p`` lines are layout shapes, not traces.
    """
    what = "ppl_sparsity_curve"
    df = require_frame(df, what, [x, y])
    has_series = series is not None and series in df.columns
    groups = ordered(df[series].tolist()) if has_series else [None]
    colors = color_map(groups)
    fig = go.Figure()
    for g in groups:
        sub = (df[df[series] == g] if has_series else df).sort_values(x)
        custom = sub["threshold"] if "threshold" in sub.columns else None
        hover = f"{x} %{{x:.3f}}<br>{y} %{{y:.2f}}" + ("<br>threshold %{customdata:.3g}" if custom is not None else "")
        fig.add_trace(go.Scatter(x=sub[x], y=sub[y], mode="lines+markers", name=str(g if g is not None else y),
                                 line=dict(color=colors[g], width=2), customdata=custom,
                                 hovertemplate=hover + "<extra></extra>"))
    for pv in p:
        fig.add_hline(y=float(pv), line_dash="dash", line_color="#888",
                      annotation_text=f"PPL-{pv:g}%", annotation_position="top left")
    fig.update_xaxes(tickformat=".0%")
    return styled(fig, "Sparsity vs perplexity increase (PPL-p%)", "activation sparsity",
                  "perplexity increase (%)")


def neuron_ablation_curve(
    df: pd.DataFrame,
    x: str = "n_ablated",
    value: str = "value",
    selection: str = "selection",
    metric: str | None = "metric",
) -> go.Figure:
    """Cumulative ablation of the top differential neurons vs random neurons (the control).

    Args:
        df: columns ``x`` (number of neurons ablated), ``value`` and ``selection`` (``differential``, ``random``
            ...); optional ``metric`` (one panel per metric, e.g. ``refusal_rate`` and ``loss``). Several rows
            per (metric, selection, x) -- random seeds -- are drawn as their mean with std error bars.

    Returns:
        One line trace per (metric, selection); panels side by side when there are several metrics.
    """
    what = "neuron_ablation_curve"
    df = require_frame(df, what, [x, value, selection])
    has_metric = metric is not None and metric in df.columns
    metrics = ordered(df[metric].tolist()) if has_metric else [None]
    sels = ordered(df[selection].tolist(), ("differential", "top", "random"))
    colors = color_map(sels)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[str(m) for m in metrics] if has_metric else None,
                        horizontal_spacing=0.1)
    for j, m in enumerate(metrics, start=1):
        sub = df[df[metric] == m] if has_metric else df
        stats = sub.groupby([selection, x], sort=True)[value].agg(["mean", "std", "count"]).reset_index()
        for s in sels:
            g = stats[stats[selection] == s].sort_values(x)
            if g.empty:
                continue
            fig.add_trace(go.Scatter(
                x=g[x], y=g["mean"], mode="lines+markers", name=str(s), legendgroup=str(s), showlegend=j == 1,
                line=dict(color=colors[s], width=2.5, dash="dash" if s == "random" else "solid"),
                error_y=dict(type="data", array=g["std"].fillna(0.0), visible=bool((g["count"] > 1).any())),
                hovertemplate=f"{s}<br>{x} %{{x}}<br>{m or value} %{{y:.3f}}<extra></extra>",
            ), row=1, col=j)
        fig.update_xaxes(title_text="neurons ablated", row=1, col=j)
        fig.update_yaxes(title_text=str(m if m is not None else value).replace("_", " "), row=1, col=j)
    if not fig.data:
        raise WorkbenchError(f"{what}: nothing to plot")
    return styled(fig, "Ablating differential neurons vs random neurons", width=max(700, 430 * len(metrics)))

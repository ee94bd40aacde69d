"""Figures of the refusal-direction analyses (:mod:`workbench.directions`).

Inputs are the DataFrames the analyses return:

* :func:`candidate_scores_heatmap`, :func:`bypass_induce_scatter` -- the score table of
  ``workbench.directions.select.score_candidates`` (``layer``, ``position``, ``bypass_score``, ``induce_score``,
  ``kl``, optional ``passes`` ...); :func:`layer_position_heatmap` plots any ``layer, position, value`` table
  (e.g. ``cosine_to`` with ``value="cos"``).
* :func:`projection_plot` -- ``projection_by_layer`` (``category``, ``prompt_index``, ``layer``, ``position``,
  ``projection``).
* :func:`cosine_matrix` -- ``candidate_cosines`` (``layer_a``, ``position_a``, ``layer_b``, ``position_b``, ``cos``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import WorkbenchError
from ._checks import require_frame, require_unique
from .style import DIVERGING, SEQUENTIAL, TOP_LEGEND, color_map, ordered, styled

SCORE_LABELS = {
    "bypass_score": "bypass score (harmful, direction ablated)",
    "induce_score": "induce score (benign, direction added)",
    "kl": "KL(base || ablated), benign",
    "cos": "cosine",
    "norm": "norm of the candidate",
}


def _matrix(df: pd.DataFrame, row: str, col: str, value: str) -> tuple[list, list, np.ndarray]:
    """``(row labels, column labels, z[row, col])`` of a long table; absent cells are NaN."""
    piv = df.pivot(index=row, columns=col, values=value).sort_index().sort_index(axis=1)
    return piv.index.tolist(), piv.columns.tolist(), piv.to_numpy(dtype=float)


def layer_position_heatmap(
    df: pd.DataFrame,
    value: str,
    selected: tuple[int, int] | None = None,
    title: str | None = None,
    colorscale: str | None = None,
    zmid: float | None = None,
    mark_failing: bool = True,
) -> go.Figure:
    """A layer x position heatmap of one column of a long table.

    Args:
        df: columns ``layer``, ``position`` and ``value`` (one row per cell); with a boolean ``passes`` column
            the cells that fail the selection filters get an ``x`` marker (``mark_failing``).
        selected: ``(layer, position)`` to mark with a star (e.g. the selected direction).

    Returns:
        Traces: the heatmap (``z[layer, position]``, rows sorted by layer, columns by position), then the
        failing-cell markers and the selected-cell star when present.
    """
    what = "layer_position_heatmap"
    df = require_frame(df, what, ["layer", "position", value])
    require_unique(df, ["layer", "position"], what)
    layers, positions, z = _matrix(df, "layer", "position", value)
    label = SCORE_LABELS.get(value, value)
    fig = go.Figure(go.Heatmap(
        z=z, x=positions, y=layers, colorscale=colorscale or SEQUENTIAL, zmid=zmid,
        colorbar=dict(title=dict(text=label, side="right")), name=value,
        hovertemplate="layer %{y}<br>position %{x}<br>" + value + " %{z:.4g}<extra></extra>",
    ))
    if mark_failing and "passes" in df.columns:
        bad = df[~df["passes"].astype(bool)]
        if len(bad):
            fig.add_trace(go.Scatter(
                x=bad["position"], y=bad["layer"], mode="markers", name="fails filters",
                marker=dict(symbol="x-thin", size=9, color="rgba(0,0,0,0.6)", line=dict(width=1.5, color="rgba(0,0,0,0.6)")),
                hoverinfo="skip",
            ))
    if selected is not None:
        fig.add_trace(go.Scatter(
            x=[selected[1]], y=[selected[0]], mode="markers", name=f"selected (layer {selected[0]}, pos {selected[1]})",
            marker=dict(symbol="star", size=16, color="gold", line=dict(width=1, color="black")),
        ))
    fig.update_xaxes(tickmode="array", tickvals=positions, ticktext=[str(p) for p in positions])
    return styled(fig, title or label, "post-instruction position", "layer",
                  legend=TOP_LEGEND, margin=dict(t=90), height=max(400, 28 * len(layers) + 190), width=640)


def candidate_scores_heatmap(scores: pd.DataFrame, value: str = "bypass_score",
                             selected: tuple[int, int] | None = None) -> go.Figure:
    """The score table of ``score_candidates`` as a layer x position heatmap of ``value``.

    Args:
        scores: columns ``layer``, ``position``, ``value`` (``bypass_score``, ``induce_score``, ``kl``, ...) and
            optionally ``passes`` (failing cells get an ``x``).
        selected: the selected candidate ``(layer, position)``; marked with a star.
    """
    require_frame(scores, "candidate_scores_heatmap", ["layer", "position", value])
    zmid = None
    cs = SEQUENTIAL
    if value in ("bypass_score", "induce_score"):  # log-odds: 0 is the refuse/comply boundary
        cs, zmid = DIVERGING, 0.0
    return layer_position_heatmap(scores, value, selected, title=f"Candidate directions: {SCORE_LABELS.get(value, value)}",
                                  colorscale=cs, zmid=zmid)


def bypass_induce_scatter(scores: pd.DataFrame, selected: tuple[int, int] | None = None) -> go.Figure:
    """Every candidate as a point (bypass score, induce score), coloured by layer.

    Args:
        scores: columns ``layer``, ``position``, ``bypass_score``, ``induce_score``; optional ``passes`` (then
            two traces: passing circles, failing crosses) and ``base_harmful_score`` / ``base_benign_score``
            (dashed reference lines: the unsteered model).
        selected: ``(layer, position)`` of the selected candidate, drawn as a star (one more trace).
    """
    what = "bypass_induce_scatter"
    df = require_frame(scores, what, ["layer", "position", "bypass_score", "induce_score"])
    df = df[df[["bypass_score", "induce_score"]].notna().all(axis=1)]
    if df.empty:
        raise WorkbenchError(f"{what}: every candidate has NaN scores")
    lmin, lmax = float(df["layer"].min()), float(df["layer"].max())
    groups = [("candidates", df)]
    if "passes" in df.columns:
        ok = df["passes"].astype(bool)
        groups = [("passes filters", df[ok]), ("fails filters", df[~ok])]
    fig = go.Figure()
    for i, (name, g) in enumerate(groups):
        if g.empty:
            continue
        fig.add_trace(go.Scatter(
            x=g["bypass_score"], y=g["induce_score"], mode="markers", name=name,
            marker=dict(color=g["layer"], colorscale=SEQUENTIAL, cmin=lmin, cmax=lmax, size=9,
                        symbol="circle" if name != "fails filters" else "x",
                        showscale=i == 0, colorbar=dict(title=dict(text="layer"))),
            customdata=np.stack([g["layer"], g["position"]], axis=-1),
            hovertemplate="layer %{customdata[0]}, position %{customdata[1]}<br>bypass %{x:.3f}<br>"
                          "induce %{y:.3f}<extra></extra>",
        ))
    if selected is not None:
        row = df[(df["layer"] == selected[0]) & (df["position"] == selected[1])]
        if row.empty:
            raise WorkbenchError(f"{what}: selected={selected} is not a (layer, position) of the score table")
        fig.add_trace(go.Scatter(
            x=row["bypass_score"], y=row["induce_score"], mode="markers",
            name=f"selected (layer {selected[0]}, pos {selected[1]})",
            marker=dict(symbol="star", size=18, color="gold", line=dict(width=1, color="black")),
        ))
    if "base_harmful_score" in df.columns:
        fig.add_vline(x=float(df["base_harmful_score"].iloc[0]), line_dash="dash", line_color="#d62728",
                      annotation_text="harmful, no intervention", annotation_position="top left")
    if "base_benign_score" in df.columns:
        fig.add_hline(y=float(df["base_benign_score"].iloc[0]), line_dash="dash", line_color="#1f77b4",
                      annotation_text="benign, no intervention", annotation_position="bottom right")
    return styled(fig, "Candidate directions: bypass vs induce", SCORE_LABELS["bypass_score"],
                  SCORE_LABELS["induce_score"], legend=TOP_LEGEND, margin=dict(t=90), width=720, height=580)


def projection_plot(projections: pd.DataFrame, position: int | str | None = -1,
                    show_prompts: bool = False) -> go.Figure:
    """Projection of each prompt set on the direction, per layer: mean +- std across prompts per category.

    Args:
        projections: ``projection_by_layer`` output: ``category``, ``layer``, ``projection``, and ``position``
            and ``prompt_index`` (needed for ``position`` filtering and ``show_prompts``).
        position: the post-instruction position to show (default ``-1``: the last token); ``"mean"`` averages
            each prompt over positions; ``None`` when the table has a single position (or none).
        show_prompts: also draw one faint line per prompt.

    Returns:
        One trace per category (mean, with std error bars), plus one per prompt when ``show_prompts``.
    """
    what = "projection_plot"
    df = require_frame(projections, what, ["category", "layer", "projection"])
    if "position" in df.columns:
        positions = sorted(set(df["position"].tolist()))
        if position == "mean":
            keys = ["category", "layer"] + (["prompt_index"] if "prompt_index" in df.columns else [])
            df = df.groupby(keys, as_index=False, sort=False)["projection"].mean()
        elif position is None:
            if len(positions) > 1:
                raise WorkbenchError(f"{what}: the table has positions {positions}; pick one with position=... "
                                     "or position='mean'")
        else:
            if position not in positions:
                raise WorkbenchError(f"{what}: position={position!r} is not in the table; available: {positions}")
            df = df[df["position"] == position]
    cats = ordered(df["category"].tolist())
    colors = color_map(cats)
    fig = go.Figure()
    if show_prompts:
        if "prompt_index" not in df.columns:
            raise WorkbenchError(f"{what}: show_prompts=True needs a 'prompt_index' column")
        for cat in cats:
            for idx, g in df[df["category"] == cat].groupby("prompt_index", sort=True):
                g = g.sort_values("layer")
                fig.add_trace(go.Scatter(x=g["layer"], y=g["projection"], mode="lines", showlegend=False,
                                         line=dict(color=colors[cat], width=0.6), opacity=0.25,
                                         hoverinfo="skip", legendgroup=str(cat)))
    stats = df.groupby(["category", "layer"], sort=True)["projection"].agg(["mean", "std", "count"]).reset_index()
    for cat in cats:
        g = stats[stats["category"] == cat].sort_values("layer")
        fig.add_trace(go.Scatter(
            x=g["layer"], y=g["mean"], mode="lines+markers", name=str(cat), legendgroup=str(cat),
            line=dict(color=colors[cat], width=2.5),
            error_y=dict(type="data", array=g["std"].fillna(0.0), visible=True, thickness=1),
            customdata=g["count"], hovertemplate=f"{cat}<br>layer %{{x}}<br>mean %{{y:.3f}} (n=%{{customdata}})<extra></extra>",
        ))
    pos_txt = {None: "", "mean": ", mean over post-instruction positions"}.get(position, f", position {position}")
    return styled(fig, f"Projection on the refusal direction{pos_txt}", "layer", "projection on r̂ (mean ± std)")


def cosine_matrix(cosines: pd.DataFrame, position: int | None = -1) -> go.Figure:
    """Cross-layer cosine similarity of the candidate directions at one position (layer x layer heatmap).

    Args:
        cosines: ``candidate_cosines`` output: ``layer_a``, ``position_a``, ``layer_b``, ``position_b``, ``cos``.
            A table without position columns (``layer_a``, ``layer_b``, ``cos``) is used as it is.
        position: the post-instruction position of both candidates (default ``-1``); ``None`` when the table
            has a single position.

    Returns:
        One heatmap trace, ``z[layer_a, layer_b]`` in ``[-1, 1]``.
    """
    what = "cosine_matrix"
    df = require_frame(cosines, what, ["layer_a", "layer_b", "cos"])
    if "position_a" in df.columns and "position_b" in df.columns:
        df = df[df["position_a"] == df["position_b"]]
        positions = sorted(set(df["position_a"].tolist()))
        if position is None:
            if len(positions) > 1:
                raise WorkbenchError(f"{what}: the table has positions {positions}; pick one with position=...")
        elif position not in positions:
            raise WorkbenchError(f"{what}: position={position!r} is not in the table; available: {positions}")
        else:
            df = df[df["position_a"] == position]
    require_unique(df, ["layer_a", "layer_b"], what, "filter to one position first")
    la, lb, z = _matrix(df, "layer_a", "layer_b", "cos")
    fig = go.Figure(go.Heatmap(
        z=z, x=lb, y=la, zmin=-1, zmax=1, colorscale=DIVERGING, colorbar=dict(title=dict(text="cosine")),
        hovertemplate="layer %{y} vs layer %{x}<br>cos %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")
    pos_txt = "" if position is None else f" (position {position})"
    return styled(fig, f"Cosine similarity of candidate directions across layers{pos_txt}", "layer", "layer",
                  width=620, height=560)

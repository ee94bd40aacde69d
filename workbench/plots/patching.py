"""Figures of the activation-patching analyses (:mod:`workbench.patching`).

Inputs are :class:`~workbench.patching.PatchResult` objects or their long DataFrames
(``PatchResult.to_dataframe()``, or several concatenated as in ``patching_sweeps.csv``): columns
``component``, ``mode``, ``method``, ``layer`` and, by grid, ``pos`` (with ``pos_from_end``, ``token``,
``corrupted_token``, ``post_instruction``) and/or ``head``; ``value`` (normalised: 0 = corrupted run,
1 = clean run) and ``raw`` (the metric). Subspace patching: ``layer``, ``value``, ``value_full``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import WorkbenchError
from ._checks import require_frame, select, single_value
from .style import DIVERGING, color_map, styled

GRIDS = ("layer_pos", "layer", "layer_head", "layer_head_pos")
COMPONENT_TITLES = {"resid_pre": "residual stream (resid_pre)", "attn_out": "attention output",
                    "mlp_out": "MLP output", "z": "attention heads (z)"}


def _frame(data, what: str) -> pd.DataFrame:
    if isinstance(data, (list, tuple)):
        frames = [d.to_dataframe() if hasattr(d, "to_dataframe") else d for d in data]
        if not frames:
            raise WorkbenchError(f"{what}: got an empty list of patching results")
        data = pd.concat(frames, ignore_index=True)
    return require_frame(data, what, ["layer", "value"])


def _grids(df: pd.DataFrame) -> pd.Series:
    """The grid of each row, from which of ``pos`` / ``head`` it has."""
    has_pos = df["pos"].notna() if "pos" in df.columns else pd.Series(False, index=df.index)
    has_head = df["head"].notna() if "head" in df.columns else pd.Series(False, index=df.index)
    out = pd.Series("layer", index=df.index)
    out[has_pos & ~has_head] = "layer_pos"
    out[has_head & ~has_pos] = "layer_head"
    out[has_head & has_pos] = "layer_head_pos"
    return out


def token_label(tok, max_len: int = 14) -> str:
    """A token as a tick label: whitespace made visible, HTML-escaped (plotly reads ``<...>`` as markup)."""
    s = "" if tok is None or (isinstance(tok, float) and np.isnan(tok)) else str(tok)
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    if s.startswith(" "):
        s = "·" + s[1:]
    if len(s) > max_len:
        s = s[: max_len - 1] + "…"
    return html.escape(s, quote=False)


def _one_sweep(data, what: str, component, mode, method, grid, head) -> tuple[pd.DataFrame, str]:
    df = _frame(data, what)
    df = select(df, what, component=component, mode=mode, method=method)
    for col, param in (("component", "component"), ("mode", "mode"), ("method", "method")):
        single_value(df, col, what, param)
    grids = _grids(df)
    present = list(dict.fromkeys(grids.tolist()))
    if grid is None:
        if len(present) > 1:
            raise WorkbenchError(f"{what}: the data mixes grids {present}; pick one with grid=...")
        grid = present[0]
    elif grid not in present:
        raise WorkbenchError(f"{what}: grid={grid!r} is not in the data; available: {present}")
    df = df[grids == grid]
    if grid == "layer_head_pos":
        if head is None:
            raise WorkbenchError(f"{what}: a layer x head x position sweep needs head=... (one head's layer x position)")
        df = select(df, what, head=head)
        grid = "layer_pos"
    return df, grid


def _heatmap_parts(df: pd.DataFrame, grid: str, value: str, last_n: int | None, labels: str):
    """``(z, x values, x tick text, layers, x axis title, first post-instruction x or None)``."""
    if grid == "layer_pos":
        positions = sorted(set(int(p) for p in df["pos"]))
        if last_n is not None:
            if last_n < 1:
                raise WorkbenchError(f"last_n must be >= 1, got {last_n}")
            positions = positions[-last_n:]
            df = df[df["pos"].isin(positions)]
        piv = df.pivot_table(index="layer", columns="pos", values=value, aggfunc="mean").reindex(columns=positions)
        per_pos = df.drop_duplicates("pos").set_index("pos")
        if labels not in ("token", "corrupted_token", "both", "pos"):
            raise WorkbenchError(f"labels must be 'token', 'corrupted_token', 'both' or 'pos', got {labels!r}")
        if labels == "pos" or "token" not in df.columns:
            text = [str(p) for p in positions]
        elif labels == "both" and "corrupted_token" in df.columns:
            text = [token_label(per_pos.at[p, "token"]) if per_pos.at[p, "token"] == per_pos.at[p, "corrupted_token"]
                    else f"{token_label(per_pos.at[p, 'token'])}/{token_label(per_pos.at[p, 'corrupted_token'])}"
                    for p in positions]
        else:
            col = labels if labels in df.columns else "token"
            text = [token_label(per_pos.at[p, col]) for p in positions]
        first_post = None
        if "post_instruction" in df.columns:
            post = [p for p in positions if bool(per_pos.at[p, "post_instruction"])]
            if post and post[0] != positions[0]:
                first_post = post[0]
        return piv.to_numpy(float), positions, text, piv.index.tolist(), "token (position)", first_post
    if grid == "layer_head":
        piv = df.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index(axis=1)
        heads = [int(h) for h in piv.columns]
        return piv.to_numpy(float), heads, [str(h) for h in heads], piv.index.tolist(), "head", None
    piv = df.groupby("layer", sort=True)[value].mean()
    return piv.to_numpy(float)[:, None], [0], ["all positions"], piv.index.tolist(), "", None


def patching_heatmap(
    data,
    component: str | None = None,
    mode: str | None = None,
    method: str | None = None,
    grid: str | None = None,
    head: int | None = None,
    value: str = "value",
    last_n: int | None = None,
    labels: str = "token",
) -> go.Figure:
    """One patching sweep as a heatmap: layers down, token-labelled positions (or heads) across.

    Args:
        data: a ``PatchResult``, a list of them, or their long DataFrame (columns ``layer``, ``value`` and
            ``pos`` + ``token`` or ``head``; ``component`` / ``mode`` / ``method`` when several sweeps are mixed).
        component, mode, method, grid: pick one sweep when ``data`` holds several (an error says which to pick).
        head: the head of a layer x head x position sweep.
        value: ``"value"`` (normalised, 0 = corrupted, 1 = clean) or ``"raw"`` (the metric).
        last_n: show only the last ``last_n`` positions.
        labels: x tick labels: ``"token"`` (clean run), ``"corrupted_token"``, ``"both"`` (``clean/corrupted``
            where they differ) or ``"pos"``.

    Returns:
        One heatmap trace, ``z[layer, position]`` (or ``[layer, head]``), diverging colours centred on 0.
    """
    what = "patching_heatmap"
    df, grid = _one_sweep(data, what, component, mode, method, grid, head)
    if value not in df.columns:
        raise WorkbenchError(f"{what}: the data has no column {value!r}; expected 'value' or 'raw'")
    z, xs, text, layers, xtitle, first_post = _heatmap_parts(df, grid, value, last_n, labels)
    fig = go.Figure(go.Heatmap(
        z=z, x=xs, y=layers, colorscale=DIVERGING, zmid=0.0 if value == "value" else None,
        colorbar=dict(title=dict(text="normalised effect" if value == "value" else "metric", side="right")),
        hovertemplate=f"layer %{{y}}<br>{xtitle or 'all positions'} %{{x}}<br>{value} %{{z:.3f}}<extra></extra>",
    ))
    fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=text, tickangle=-45 if grid == "layer_pos" else 0)
    if first_post is not None:
        fig.add_vline(x=first_post - 0.5, line_dash="dot", line_color="#444",
                      annotation_text="post-instruction →", annotation_position="top right",
                      annotation_yanchor="bottom", annotation_font_size=11)
    comp = single_value(df, "component", what) or ""
    mode_ = single_value(df, "mode", what)
    meth = single_value(df, "method", what)
    bits = [b for b in (COMPONENT_TITLES.get(comp, comp), meth, mode_) if b]
    width = max(520, 38 * len(xs) + 220) if grid == "layer_pos" else (max(480, 40 * len(xs) + 220))
    return styled(fig, "Activation patching: " + ", ".join(bits), xtitle, "layer",
                  width=min(width, 1400), height=max(380, 30 * len(layers) + 200))


def patching_heatmaps(
    data,
    components: Sequence[str] | None = None,
    mode: str | None = None,
    method: str | None = "exact",
    value: str = "value",
    last_n: int | None = None,
    labels: str = "token",
) -> go.Figure:
    """Layer x position sweeps of several components side by side, on one shared colour scale.

    Args:
        data: ``PatchResult``s or their long DataFrame (see :func:`patching_heatmap`).
        components: which components, in order (default: every component with a layer x position sweep).

    Returns:
        One heatmap trace per component (sharing ``coloraxis``), ``z[layer, position]``.
    """
    what = "patching_heatmaps"
    df = _frame(data, what)
    df = select(df, what, mode=mode, method=method if "method" in df.columns else None)
    if "component" not in df.columns:
        raise WorkbenchError(f"{what}: the data has no 'component' column; use patching_heatmap for one sweep")
    lp = df[_grids(df) == "layer_pos"]
    avail = list(dict.fromkeys(lp["component"].tolist()))
    comps = list(components) if components is not None else avail
    missing = [c for c in comps if c not in avail]
    if missing or not comps:
        raise WorkbenchError(f"{what}: no layer x position sweep of {missing or comps}; available: {avail}")
    fig = make_subplots(rows=1, cols=len(comps), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[COMPONENT_TITLES.get(c, c) for c in comps])
    for i, comp in enumerate(comps, start=1):
        sub, grid = _one_sweep(lp, what, comp, None, None, "layer_pos", None)
        z, xs, text, layers, _, _ = _heatmap_parts(sub, grid, value, last_n, labels)
        fig.add_trace(go.Heatmap(z=z, x=xs, y=layers, coloraxis="coloraxis", name=comp,
                                 hovertemplate=f"{comp}<br>layer %{{y}}<br>pos %{{x}}<br>{value} %{{z:.3f}}<extra></extra>"),
                      row=1, col=i)
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=text, tickangle=-45, row=1, col=i)
    vals = df[value].to_numpy(float)
    lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    fig.update_layout(coloraxis=dict(colorscale=DIVERGING, cmin=-lim, cmax=lim,
                                     colorbar=dict(title=dict(text="normalised effect" if value == "value" else value))))
    fig.update_yaxes(title_text="layer", row=1, col=1)
    n_pos = len(xs)
    return styled(fig, f"Activation patching ({method or 'all'}{', ' + mode if mode else ''})",
                  width=min(1600, len(comps) * (30 * n_pos + 120) + 160), height=max(400, 30 * len(layers) + 220))


def _key_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in ("component", "mode", "layer", "head", "pos") if c in df.columns]


def attribution_vs_exact(exact, attribution=None, value: str = "value") -> go.Figure:
    """Attribution patching's estimate of every cell against the exact patch, one trace per component.

    Args:
        exact: exact ``PatchResult``(s) / long DataFrame; or, with ``attribution=None``, one DataFrame holding
            both, told apart by its ``method`` column (``exact`` / ``attribution``).
        attribution: attribution ``PatchResult``(s) / long DataFrame over the same cells.
        value: the column to compare (``value`` normalised, or ``raw``).

    Returns:
        One scatter trace per component (legend shows Pearson r), then the ``y = x`` line.
    """
    what = "attribution_vs_exact"
    ex = _frame(exact, what)
    if attribution is None:
        if "method" not in ex.columns:
            raise WorkbenchError(f"{what}: pass attribution=..., or one DataFrame with a 'method' column")
        at = select(ex, what, method="attribution")
        ex = select(ex, what, method="exact")
    else:
        at = _frame(attribution, what)
    keys = [k for k in _key_columns(ex) if k in at.columns]
    for k in ("head", "pos"):
        if k in keys:
            ex = ex.assign(**{k: ex[k].fillna(-1)})
            at = at.assign(**{k: at[k].fillna(-1)})
    m = ex[keys + [value]].merge(at[keys + [value]], on=keys, suffixes=("_exact", "_attr"))
    m = m[m[[f"{value}_exact", f"{value}_attr"]].notna().all(axis=1)]
    if m.empty:
        raise WorkbenchError(f"{what}: the exact and attribution results share no cells (matched on {keys})")
    groups = list(m.groupby("component", sort=False)) if "component" in m.columns else [("cells", m)]
    colors = color_map([g for g, _ in groups])
    fig = go.Figure()
    for comp, g in groups:
        x, y = g[f"{value}_exact"].to_numpy(float), g[f"{value}_attr"].to_numpy(float)
        r = float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else float("nan")
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=f"{comp} (r = {r:.2f})", marker=dict(size=7, color=colors[comp], opacity=0.75),
            customdata=g["layer"], hovertemplate=f"{comp}, layer %{{customdata}}<br>exact %{{x:.3f}}<br>"
                                                 "attribution %{y:.3f}<extra></extra>",
        ))
    lo = float(min(m[f"{value}_exact"].min(), m[f"{value}_attr"].min()))
    hi = float(max(m[f"{value}_exact"].max(), m[f"{value}_attr"].max()))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line=dict(color="#888", dash="dash", width=1)))
    return styled(fig, "Attribution patching vs exact patching", f"exact patching ({value})",
                  f"attribution patching ({value})", width=640, height=560)


def subspace_patching_plot(subspace: pd.DataFrame) -> go.Figure:
    """Subspace patching along the direction vs patching the whole ``resid_pre``, per layer.

    Args:
        subspace: ``subspace_patch`` output: ``layer``, ``value`` (direction only), ``value_full`` (whole resid).

    Returns:
        Two traces: full patch, subspace patch.
    """
    df = require_frame(subspace, "subspace_patching_plot", ["layer", "value", "value_full"]).sort_values("layer")
    fig = go.Figure([
        go.Scatter(x=df["layer"], y=df["value_full"], mode="lines+markers", name="whole resid_pre",
                   line=dict(color="#7f7f7f", dash="dash")),
        go.Scatter(x=df["layer"], y=df["value"], mode="lines+markers", name="refusal-direction subspace only",
                   line=dict(color="#d62728", width=2.5)),
    ])
    return styled(fig, "Subspace patching along the refusal direction", "layer",
                  "normalised effect (0 = corrupted, 1 = clean)")

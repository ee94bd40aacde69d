"""Figures of the steering comparison (:func:`workbench.steering.compare.compare_methods`).

Inputs, as ``compare_methods`` returns them:

* ``result["methods"]``: ``{method: {"refusal_rate": {category: rate}, "kl_benign": x}}`` and, optionally,
  ``"refusal_ci": {category: [lo, hi]}`` (the Wilson 95 % intervals, drawn as error bars) --
  :func:`refusal_rate_bars` and the operating points of :func:`alpha_tradeoff`.
* ``result["tables"]``: ``{method: DataFrame}`` with columns ``category``, ``prompt``, ``reply``, ``refused``,
  ``refusal_score``, ``method`` and, for controllers, ``s`` (float) and ``w`` (list of per-layer floats) --
  :func:`controller_weights_heatmap`, :func:`controller_weights_by_category`, :func:`scale_distribution`,
  :func:`example_generations`, :func:`generations_table`. Every one of these also takes the whole result
  dict, the tables dict, or one concatenated DataFrame (with ``method``).
* ``result["curves"]``: DataFrame with columns ``alpha``, ``method`` and one refusal-rate column per
  category (``harmful``, ``jailbreak``, ``benign``, ``borderline``) -- :func:`alpha_tradeoff`, :func:`alpha_sweep`.
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import WorkbenchError
from ..vocab import CATEGORIES
from ._checks import require_frame, select, single_value
from .style import CATEGORY_ORDER, METHOD_ORDER, SEQUENTIAL, color_map, ordered, styled


# ------------------------------------------------------------------------------------------------ inputs
def tables_frame(tables, what: str = "tables_frame") -> pd.DataFrame:
    """One long DataFrame (with ``method``) from ``compare_methods``'s result, its ``tables`` dict or a DataFrame."""
    if isinstance(tables, Mapping) and "tables" in tables:
        tables = tables["tables"]
    if isinstance(tables, Mapping):
        if not tables:
            raise WorkbenchError(f"{what}: the tables dict is empty")
        frames = []
        for name, t in tables.items():
            t = require_frame(t, f"{what} (table {name!r})", ["category"])
            frames.append(t.assign(method=name) if "method" not in t.columns else t)
        tables = pd.concat(frames, ignore_index=True)
    return require_frame(tables, what, ["category"])


def _one_method(tables, method: str | None, what: str, columns: Sequence[str]) -> pd.DataFrame:
    df = tables_frame(tables, what)
    df = select(df, what, method=method)
    single_value(df, "method", what, "method")
    return require_frame(df, what, columns)


def _weights(df: pd.DataFrame, what: str) -> np.ndarray:
    """``Float[ndarray, "prompt layer"]`` from the ``w`` column (lists, arrays, or JSON strings from a CSV)."""
    rows = []
    for i, w in enumerate(df["w"].tolist()):
        if isinstance(w, str):
            w = json.loads(w)
        if w is None or (isinstance(w, float) and np.isnan(w)):
            meth = df["method"].iloc[0] if "method" in df.columns else "?"
            raise WorkbenchError(f"{what}: row {i} of method {meth!r} has no per-layer weights w "
                                 "(only controller methods, e.g. was_bce / was_e2e, have them)")
        rows.append(np.asarray(w, dtype=float).ravel())
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1:
        raise WorkbenchError(f"{what}: the w lists have different lengths {lengths}; expected one per layer")
    return np.stack(rows)


#: what the controller figures plot per layer: the weight ``w_l``, or the effective steering ``s * w_l`` (the edit at
#: layer ``l`` is ``alpha * s * w_l * d``, so ``w`` alone says nothing where ``s`` is 0)
LAYER_VALUES = ("w", "s*w")


def _layer_values(df: pd.DataFrame, value: str, what: str) -> np.ndarray:
    """``Float[ndarray, "prompt layer"]``: ``w`` or ``s * w`` per prompt (see :data:`LAYER_VALUES`)."""
    if value not in LAYER_VALUES:
        raise WorkbenchError(f"{what}: value must be one of {LAYER_VALUES}, got {value!r}")
    w = _weights(df, what)
    if value == "w":
        return w
    if "s" not in df.columns or df["s"].isna().any():
        raise WorkbenchError(f"{what}: value 's*w' needs the controller scale s of every row")
    return df["s"].to_numpy(float)[:, None] * w


def _sorted_by_category(df: pd.DataFrame) -> pd.DataFrame:
    order = {c: i for i, c in enumerate(ordered(df["category"].tolist(), CATEGORY_ORDER))}
    return df.assign(_o=df["category"].map(order)).sort_values("_o", kind="stable").drop(columns="_o")


def _short(text, n: int) -> str:
    s = "" if text is None else str(text).replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


# ------------------------------------------------------------------------------------------- controller
def controller_weights_heatmap(tables, method: str | None = "was_e2e", max_prompt_chars: int = 60,
                               value: str = "w") -> go.Figure:
    """Per-prompt layer weights ``w`` (or the effective steering ``s * w``) of a controller: prompts (grouped by
    category) x layers.

    Args:
        tables: ``compare_methods`` output (or its ``tables``, or a DataFrame) with ``category``, ``w`` and
            optionally ``prompt``, ``s``, ``method``.
        method: the controller to show (``None`` when the data holds one method).
        value: ``"w"`` (in [0, 1]) or ``"s*w"`` (:data:`LAYER_VALUES`; needs ``s``).

    Returns:
        One heatmap trace ``z[prompt, layer]`` with rows ordered harmful, jailbreak, borderline, benign, then
        others; category names label the groups on the y axis and lines separate them.
    """
    what = "controller_weights_heatmap"
    df = _sorted_by_category(_one_method(tables, method, what, ["category", "w"]))
    w = _layer_values(df, value, what)
    cats = df["category"].tolist()
    prompts = [html.escape(_short(p, max_prompt_chars)) for p in df.get("prompt", pd.Series([""] * len(df)))]
    s = df["s"].to_numpy(float) if "s" in df.columns else np.full(len(df), np.nan)
    custom = np.array([[c, p, f"{v:.3f}"] for c, p, v in zip(cats, prompts, s)], dtype=object)
    custom = np.repeat(custom[:, None, :], w.shape[1], axis=1)
    fig = go.Figure(go.Heatmap(
        z=w, x=list(range(w.shape[1])), y=list(range(len(df))), zmin=0,
        zmax=1 if value == "w" else max(float(np.nanmax(w)), 1e-12), colorscale=SEQUENTIAL,
        colorbar=dict(title=dict(text=value)), customdata=custom,
        hovertemplate="%{customdata[0]}: %{customdata[1]}<br>layer %{x}<br>" + value
                      + " %{z:.3f} (s = %{customdata[2]})<extra></extra>",
    ))
    ticks, text, start = [], [], 0
    groups = [(c, sum(1 for _ in g)) for c, g in itertools.groupby(cats)]
    for k, (c, n) in enumerate(groups):
        ticks.append(start + (n - 1) / 2)
        text.append(f"{c} ({n})")
        if k:
            fig.add_hline(y=start - 0.5, line_color="white", line_width=2)
        start += n
    fig.update_yaxes(tickmode="array", tickvals=ticks, ticktext=text, autorange="reversed", ticks="")
    meth = single_value(df, "method", what) or "controller"
    title = "Controller layer weights per prompt" if value == "w" else "Effective steering s·w per layer and prompt"
    return styled(fig, f"{title} ({meth})", "layer", "prompts by category",
                  height=min(1200, max(420, 4 * len(df) + 160)), width=max(520, 34 * w.shape[1] + 300))


def controller_weights_by_category(tables, method: str | None = "was_e2e", value: str = "w") -> go.Figure:
    """Mean controller weight ``w_l`` (or effective steering ``s * w_l``, ``value="s*w"``) per layer for each
    prompt category (std as error bars).

    Args:
        tables: as :func:`controller_weights_heatmap` (``category``, ``w``).

    Returns:
        One line trace per category; ``y`` the mean of ``w`` over the category's prompts.
    """
    what = "controller_weights_by_category"
    df = _one_method(tables, method, what, ["category", "w"])
    w = _layer_values(df, value, what)
    cats = ordered(df["category"].tolist(), CATEGORY_ORDER)
    colors = color_map(cats)
    fig = go.Figure()
    layers = list(range(w.shape[1]))
    for c in cats:
        m = (df["category"] == c).to_numpy()
        fig.add_trace(go.Scatter(x=layers, y=w[m].mean(0), mode="lines+markers", name=f"{c} (n={int(m.sum())})",
                                 line=dict(color=colors[c], width=2.5),
                                 error_y=dict(type="data", array=w[m].std(0), visible=True, thickness=1)))
    if value == "w":
        fig.update_yaxes(range=[0, 1.02])
    meth = single_value(df, "method", what) or "controller"
    title = "Mean controller layer weight per category" if value == "w" else "Mean effective steering s·w per category"
    return styled(fig, f"{title} ({meth})", "layer", f"mean {value}")


def scale_distribution(tables, method: str | Sequence[str] | None = "was_e2e") -> go.Figure:
    """Distribution of the controller's global scale ``s`` per prompt category.

    Args:
        tables: ``category``, ``s`` (and ``method``) per prompt, as :func:`controller_weights_heatmap`.
        method: one controller (one box trace per category), or several (one box trace per method, grouped by
            category on x), or ``None``: every method whose rows have ``s``.

    Returns:
        Box plots with every point shown.
    """
    what = "scale_distribution"
    df = tables_frame(tables, what)
    df = require_frame(df, what, ["category", "s"])
    if isinstance(method, str):
        methods = [method]
    elif method is None:
        methods = ordered(df.loc[df["s"].notna(), "method"].tolist(), METHOD_ORDER) if "method" in df.columns else [None]
    else:
        methods = list(method)
    frames = []
    for m in methods:
        sub = select(df, what, method=m) if m is not None else df
        sub = sub[sub["s"].notna()]
        if sub.empty:
            raise WorkbenchError(f"{what}: method {m!r} has no scale s (only controller methods have one)")
        frames.append(sub.assign(_m=m))
    df = pd.concat(frames, ignore_index=True)
    cats = ordered(df["category"].tolist(), CATEGORY_ORDER)
    fig = go.Figure()
    if len(methods) == 1:
        colors = color_map(cats)
        for c in cats:
            sub = df[df["category"] == c]
            fig.add_trace(go.Box(y=sub["s"], name=str(c), marker_color=colors[c], boxpoints="all", jitter=0.4,
                                 pointpos=0, line=dict(width=1.5),
                                 text=[html.escape(_short(p, 60)) for p in sub.get("prompt", [""] * len(sub))]))
        title = f"Controller scale s by category ({methods[0] or 'controller'})"
    else:
        colors = color_map(methods)
        for m in methods:
            sub = df[df["_m"] == m]
            fig.add_trace(go.Box(x=sub["category"], y=sub["s"], name=str(m), marker_color=colors[m],
                                 boxpoints="all", jitter=0.4, pointpos=0))
        fig.update_layout(boxmode="group")
        fig.update_xaxes(categoryorder="array", categoryarray=cats)
        title = "Controller scale s by category"
    return styled(fig, title, "category", "scale s")


# ------------------------------------------------------------------------------------------ comparisons
def rates_frame(results) -> pd.DataFrame:
    """``method``, ``category``, ``refusal_rate``, ``kl_benign`` and the interval ``lo``, ``hi`` (NaN where the
    result has no ``refusal_ci``) from ``compare_methods``'s result, its ``methods`` dict, or a DataFrame with
    ``method``, ``category``, ``refusal_rate`` (and optionally ``lo``, ``hi``)."""
    what = "refusal_rate_bars"
    if isinstance(results, pd.DataFrame):
        df = require_frame(results, what, ["method", "category", "refusal_rate"])
        return df.assign(**{k: np.nan for k in ("lo", "hi") if k not in df.columns})
    if isinstance(results, Mapping) and "methods" in results and isinstance(results["methods"], Mapping):
        results = results["methods"]
    if not isinstance(results, Mapping) or not results:
        raise WorkbenchError(f"{what} expects compare_methods(...) output, its 'methods' dict "
                             "{method: {'refusal_rate': {category: rate}}}, or a DataFrame with columns "
                             f"['method', 'category', 'refusal_rate']; got {type(results).__name__}")
    rows = []
    for m, r in results.items():
        if not isinstance(r, Mapping) or not isinstance(r.get("refusal_rate"), Mapping):
            raise WorkbenchError(f"{what}: method {m!r} has no 'refusal_rate' dict {{category: rate}}")
        ci = r.get("refusal_ci") or {}
        for c, v in r["refusal_rate"].items():
            lo, hi = ci.get(c, (np.nan, np.nan))
            rows.append({"method": m, "category": c, "refusal_rate": float(v), "kl_benign": r.get("kl_benign"),
                         "lo": float(lo), "hi": float(hi)})
    return require_frame(pd.DataFrame(rows), what, ["method", "category", "refusal_rate"])


def _error_bars(rate: pd.Series, lo: pd.Series, hi: pd.Series) -> dict | None:
    """Plotly ``error_y``/``error_x`` for an interval around ``rate`` (``None`` when no interval is known)."""
    if lo.isna().all() or hi.isna().all():
        return None
    return dict(type="data", symmetric=False, array=(hi - rate).clip(lower=0).tolist(),
                arrayminus=(rate - lo).clip(lower=0).tolist(), visible=True, thickness=1.2, width=3)


def refusal_rate_bars(results, methods: Sequence[str] | None = None,
                      categories: Sequence[str] | None = None) -> go.Figure:
    """Refusal rate of each steering method on each split (method x split grouped bars), with the Wilson 95 %
    interval as error bars when the result has ``refusal_ci``.

    Args:
        results: ``compare_methods`` output, its ``methods`` dict, or a DataFrame with ``method``, ``category``,
            ``refusal_rate`` (and optionally ``lo``, ``hi``).
        methods, categories: which and in what order (default: all, methods in the canonical order).

    Returns:
        One bar trace per category (split), x = method, y = refusal rate in [0, 1]; ``error_y`` spans
        ``[lo, hi]`` (``array`` = hi - rate, ``arrayminus`` = rate - lo).
    """
    what = "refusal_rate_bars"
    df = rates_frame(results)
    ms = list(methods) if methods is not None else ordered(df["method"].tolist(), METHOD_ORDER)
    cs = list(categories) if categories is not None else ordered(df["category"].tolist(), CATEGORY_ORDER)
    for col, want in (("method", ms), ("category", cs)):
        missing = [v for v in want if v not in set(df[col])]
        if missing:
            raise WorkbenchError(f"{what}: no rows for {col} {missing}; available: {ordered(df[col].tolist())}")
    colors = color_map(cs)
    fig = go.Figure()
    for c in cs:
        sub = df[df["category"] == c].set_index("method").reindex(ms)
        ci = [f" [{lo:.1%}, {hi:.1%}]" if pd.notna(lo) else "" for lo, hi in zip(sub["lo"], sub["hi"])]
        fig.add_trace(go.Bar(x=ms, y=sub["refusal_rate"], name=str(c), marker_color=colors[c],
                             error_y=_error_bars(sub["refusal_rate"], sub["lo"], sub["hi"]),
                             text=[f"{v:.0%}" if pd.notna(v) else "" for v in sub["refusal_rate"]],
                             textposition="outside", textfont=dict(size=10), customdata=ci,
                             hovertemplate=f"{c}<br>%{{x}}: %{{y:.1%}}%{{customdata}}<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%")
    return styled(fig, "Refusal rate by method and split", "method", "refusal rate",
                  width=max(700, 110 * len(ms) + 200), legend=dict(orientation="h", y=1.08, x=1, xanchor="right"))


def _curve_column(df: pd.DataFrame, spec, what: str) -> tuple[pd.Series, str]:
    cols = [spec] if isinstance(spec, str) else list(spec)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise WorkbenchError(f"{what}: the curves lack columns {missing}; got {list(df.columns)}")
    return df[cols].mean(axis=1), (cols[0] if len(cols) == 1 else "mean of " + ", ".join(cols))


def alpha_tradeoff(
    curves: pd.DataFrame,
    refusal: str | Sequence[str] = "harmful",
    false_refusal: str | Sequence[str] = "benign",
    points=None,
) -> go.Figure:
    """Refusal vs false refusal as the steering strength ``alpha`` grows, one curve per method.

    Args:
        curves: ``compare_methods(...)["curves"]`` (or the whole result): ``alpha``, ``method`` and the
            refusal-rate columns named by ``refusal`` / ``false_refusal``.
        refusal: the y column, or several (averaged), e.g. ``("harmful", "jailbreak")``.
        false_refusal: the x column(s), e.g. ``"benign"`` or ``("benign", "borderline")``.
        points: optional ``compare_methods`` result / ``methods`` dict: each method's chosen operating point
            on the test split, drawn as a diamond, with its Wilson 95 % interval on each axis that shows one
            category (when the result has ``refusal_ci``).

    Returns:
        One line trace per method (points labelled with alpha), then one marker trace per method in ``points``.
    """
    what = "alpha_tradeoff"
    if isinstance(curves, Mapping) and "curves" in curves:
        curves = curves["curves"]
    df = require_frame(curves, what, ["alpha", "method"])
    y, ylab = _curve_column(df, refusal, what)
    x, xlab = _curve_column(df, false_refusal, what)
    df = df.assign(_x=x, _y=y)
    ms = ordered(df["method"].tolist(), METHOD_ORDER)
    colors = color_map(ms)
    fig = go.Figure()
    for m in ms:
        sub = df[df["method"] == m].sort_values("alpha")
        fig.add_trace(go.Scatter(x=sub["_x"], y=sub["_y"], mode="lines+markers+text", name=str(m),
                                 line=dict(color=colors[m], width=2), text=[f"α={a:g}" for a in sub["alpha"]],
                                 textposition="top left", textfont=dict(size=9, color=colors[m]),
                                 hovertemplate=f"{m}<br>α %{{text}}<br>false refusal %{{x:.1%}}<br>"
                                               "refusal %{y:.1%}<extra></extra>"))
    if points is not None:
        frame = rates_frame(points)
        rates, lo, hi = (frame.pivot_table(index="method", columns="category", values=v, dropna=False)
                         for v in ("refusal_rate", "lo", "hi"))
        pm = ordered(rates.index.tolist(), METHOD_ORDER)
        pcolors = color_map(pm)

        def bars(spec, m, p):   # the test interval of a single-column axis (an average of columns has none)
            if not isinstance(spec, str):
                return None
            return _error_bars(p, lo.loc[[m], spec], hi.loc[[m], spec])

        for m in pm:
            px, _ = _curve_column(rates.loc[[m]], false_refusal, what)
            py, _ = _curve_column(rates.loc[[m]], refusal, what)
            fig.add_trace(go.Scatter(x=px, y=py, mode="markers", name=f"{m} (test)",
                                     error_x=bars(false_refusal, m, px), error_y=bars(refusal, m, py),
                                     marker=dict(symbol="diamond", size=13, color=pcolors[m],
                                                 line=dict(width=1, color="black"))))
    fig.update_xaxes(tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05])
    return styled(fig, "Steering trade-off: refusal vs false refusal", f"false refusal rate ({xlab})",
                  f"refusal rate ({ylab})", width=720, height=540)


def alpha_sweep(curves: pd.DataFrame, categories: Sequence[str] | None = None) -> go.Figure:
    """Refusal rate of each split against ``alpha``, one panel per method.

    Args:
        curves: ``alpha``, ``method`` and refusal-rate columns (default: those of harmful, jailbreak, benign,
            borderline that are present).

    Returns:
        One line trace per (method, category); legend entries once per category.
    """
    what = "alpha_sweep"
    if isinstance(curves, Mapping) and "curves" in curves:
        curves = curves["curves"]
    df = require_frame(curves, what, ["alpha", "method"])
    cs = list(categories) if categories is not None else [c for c in CATEGORIES if c in df.columns]
    df = require_frame(df, what, ["alpha", "method"] + cs)
    if not cs:
        raise WorkbenchError(f"{what}: no refusal-rate columns; expected some of {list(CATEGORIES)}")
    ms = ordered(df["method"].tolist(), METHOD_ORDER)
    colors = color_map(cs)
    fig = make_subplots(rows=1, cols=len(ms), shared_yaxes=True, subplot_titles=ms, horizontal_spacing=0.04)
    for j, m in enumerate(ms, start=1):
        sub = df[df["method"] == m].sort_values("alpha")
        for c in cs:
            fig.add_trace(go.Scatter(x=sub["alpha"], y=sub[c], mode="lines+markers", name=str(c), legendgroup=str(c),
                                     showlegend=j == 1, line=dict(color=colors[c], width=2)), row=1, col=j)
        fig.update_xaxes(title_text="α", row=1, col=j)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05])
    fig.update_yaxes(title_text="refusal rate", row=1, col=1)
    return styled(fig, "Refusal rate vs steering strength α (validation)", width=max(600, 330 * len(ms)))


# ---------------------------------------------------------------------------------------- generations
def example_generations(tables, baseline: str = "none", steered: str = "was_e2e", n_per_category: int = 2,
                        categories: Sequence[str] | None = None) -> pd.DataFrame:
    """Example prompts with the unsteered and the steered reply side by side.

    Per category, prompts whose judged outcome (``refused``) changes under steering come first, then the
    rest, each in table order; the first ``n_per_category`` are kept.

    Args:
        tables: ``compare_methods`` output / ``tables`` dict / long DataFrame with ``method``, ``category``,
            ``prompt``, ``reply``, ``refused`` (and ``s`` for controllers).

    Returns:
        Columns ``category``, ``prompt``, ``reply_<baseline>``, ``refused_<baseline>``, ``reply_<steered>``,
        ``refused_<steered>``, ``changed`` and ``s`` when the steered method has it.
    """
    what = "example_generations"
    if n_per_category < 1:
        raise WorkbenchError(f"{what}: n_per_category must be >= 1, got {n_per_category}")
    df = require_frame(tables_frame(tables, what), what, ["method", "category", "prompt", "reply", "refused"])
    a = select(df, what, method=baseline)
    b = select(df, what, method=steered)
    keep_b = ["category", "prompt", "reply", "refused"] + (["s"] if "s" in b.columns and b["s"].notna().any() else [])
    m = a[["category", "prompt", "reply", "refused"]].merge(
        b[keep_b], on=["category", "prompt"], suffixes=(f"_{baseline}", f"_{steered}"))
    if m.empty:
        raise WorkbenchError(f"{what}: methods {baseline!r} and {steered!r} share no (category, prompt)")
    m["changed"] = m[f"refused_{baseline}"].astype(bool) != m[f"refused_{steered}"].astype(bool)
    cs = list(categories) if categories is not None else ordered(m["category"].tolist(), CATEGORY_ORDER)
    out = []
    for c in cs:
        sub = m[m["category"] == c]
        if sub.empty:
            raise WorkbenchError(f"{what}: no prompts of category {c!r}; available: {ordered(m['category'].tolist())}")
        out.append(sub.sort_values("changed", ascending=False, kind="stable").head(n_per_category))
    return pd.concat(out, ignore_index=True)


def generations_table(tables, baseline: str = "none", steered: str = "was_e2e", n_per_category: int = 2,
                      categories: Sequence[str] | None = None, max_chars: int = 200) -> go.Figure:
    """A table figure of :func:`example_generations`: prompt, unsteered reply, steered reply (refusals tinted).

    Returns:
        One ``go.Table`` trace; columns category, prompt, reply (baseline), reply (steered) [, s].
    """
    ex = example_generations(tables, baseline, steered, n_per_category, categories)
    esc = lambda col: [html.escape(_short(v, max_chars)) for v in ex[col]]  # noqa: E731
    header = ["category", "prompt", f"reply: {baseline}", f"reply: {steered}"]
    cells = [ex["category"].tolist(), esc("prompt"), esc(f"reply_{baseline}"), esc(f"reply_{steered}")]
    refused_tint, plain = "#fde0dd", "white"
    fills = [[plain] * len(ex), [plain] * len(ex),
             [refused_tint if r else plain for r in ex[f"refused_{baseline}"]],
             [refused_tint if r else plain for r in ex[f"refused_{steered}"]]]
    widths = [90, 260, 260, 260]
    if "s" in ex.columns:
        header.append("s")
        cells.append([f"{v:.2f}" for v in ex["s"]])
        fills.append([plain] * len(ex))
        widths.append(50)
    fig = go.Figure(go.Table(
        columnwidth=widths,
        header=dict(values=[f"<b>{h}</b>" for h in header], fill_color="#eeeeee", align="left"),
        cells=dict(values=cells, fill_color=fills, align="left", font=dict(size=11), height=26),
    ))
    return styled(fig, f"Example generations: {baseline} vs {steered} (refusals shaded)",
                  width=1000, height=min(1600, 120 + 48 * len(ex)), margin=dict(l=20, r=20, t=60, b=20))

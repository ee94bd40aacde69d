"""The one shared look of every workbench figure: a plotly template, colour maps and small helpers.

Nothing here touches plotly's global state (``plotly.io.templates.default`` stays as it is): each figure
gets :data:`TEMPLATE` through :func:`styled`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import plotly.graph_objects as go
import plotly.io as pio

FONT = "Lato, 'Helvetica Neue', Arial, sans-serif"  # Lato ships with kaleido 0.2, so PNGs match the HTML

#: Colours of prompt categories (splits) and of steering methods; other names get :data:`PALETTE` colours.
COLORS: dict[str, str] = {
    # prompt categories
    "harmful": "#d62728",
    "jailbreak": "#9467bd",
    "benign": "#1f77b4",
    "borderline": "#ff7f0e",
    # steering methods
    "none": "#7f7f7f",
    "actadd": "#8c564b",
    "actadd_layer": "#bcbd22",
    "cast": "#17becf",
    "official": "#e377c2",
    "was_bce": "#2ca02c",
    "was_e2e": "#006d2c",
    # comparisons
    "exact": "#1f77b4",
    "attribution": "#ff7f0e",
    "differential": "#d62728",
    "random": "#7f7f7f",
    "steered": "#2ca02c",
    "unsteered": "#7f7f7f",
}

#: Fallback colours, in order, for names without an entry in :data:`COLORS`.
PALETTE: tuple[str, ...] = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b",
)

#: Preferred order of categories and methods in legends and groupings; others follow in order of appearance.
CATEGORY_ORDER: tuple[str, ...] = ("harmful", "jailbreak", "borderline", "benign")
METHOD_ORDER: tuple[str, ...] = ("none", "actadd", "actadd_layer", "cast", "official", "was_bce", "was_e2e")

#: A horizontal legend above the plot area, right-aligned (for figures whose right side holds a colour bar).
TOP_LEGEND = dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom")

DIVERGING = "RdBu_r"   # signed values centred on 0 (patching effects, cosines)
SEQUENTIAL = "Viridis"  # magnitudes (weights, scores)


def _build_template() -> go.layout.Template:
    base = go.layout.Template(pio.templates["plotly_white"])  # a copy; the registry is not modified
    base.layout.update(
        font=dict(family=FONT, size=13, color="#222"),
        title=dict(font=dict(size=16), x=0.02, xanchor="left"),
        colorway=list(PALETTE),
        margin=dict(l=70, r=30, t=60, b=60),
        legend=dict(bgcolor="rgba(255,255,255,0.7)", borderwidth=0),
        hoverlabel=dict(font=dict(family=FONT)),
        width=800,
        height=500,
    )
    base.layout.xaxis.update(showline=True, linecolor="#444", ticks="outside", zeroline=False)
    base.layout.yaxis.update(showline=True, linecolor="#444", ticks="outside", zeroline=False)
    return base


#: The workbench template, applied per figure (never installed as plotly's default).
TEMPLATE: go.layout.Template = _build_template()


def ordered(names: Iterable, preferred: Sequence[str] = CATEGORY_ORDER + METHOD_ORDER) -> list:
    """Unique ``names``: those in ``preferred`` first (in that order), then the rest in order of appearance."""
    seen = list(dict.fromkeys(names))
    first = [p for p in preferred if p in seen]
    return first + [n for n in seen if n not in first]


def color_map(names: Iterable) -> dict:
    """A colour for each of ``names``: :data:`COLORS` where known, else the next unused :data:`PALETTE` colour."""
    out, free = {}, [c for c in PALETTE]
    for n in dict.fromkeys(names):
        key = str(n)
        if key in COLORS:
            out[n] = COLORS[key]
        else:
            out[n] = free.pop(0) if free else PALETTE[len(out) % len(PALETTE)]
    return out


def styled(fig: go.Figure, title: str | None = None, xaxis: str | None = None, yaxis: str | None = None,
           **layout) -> go.Figure:
    """Apply :data:`TEMPLATE`, a title, axis titles and any other layout settings to ``fig``; returns it."""
    fig.update_layout(template=TEMPLATE, **layout)
    if title is not None:
        fig.update_layout(title_text=title)
    if xaxis is not None:
        fig.update_xaxes(title_text=xaxis)
    if yaxis is not None:
        fig.update_yaxes(title_text=yaxis)
    return fig

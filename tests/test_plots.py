"""Plotting layer: figures built from small DataFrames, asserted on their data; static export offline."""

import json
import struct

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from workbench import WorkbenchError
from workbench import plots
from workbench.plots import export as export_mod

Z95 = 1.959963984540054  # the 97.5 % normal quantile


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def scores():
    rows = []
    for layer in range(3):
        for pos in (-2, -1):
            rows.append({"layer": layer, "position": pos, "bypass_score": layer * 10 + pos,
                         "induce_score": 1.0 - layer + pos, "kl": 0.01 * layer, "passes": layer < 2,
                         "base_harmful_score": 5.0, "base_benign_score": -3.0})
    return pd.DataFrame(rows)


@pytest.fixture
def comparison():
    """A small compare_methods(...) result: 2 methods x 3 categories x 2 prompts, one controller with s, w."""
    cats = ["benign", "harmful", "jailbreak"]
    tables = {}
    for m in ("none", "was_e2e"):
        rows = []
        for c in cats:
            for i in range(2):
                refused = (c != "benign") if m == "was_e2e" else (c == "harmful")
                row = {"category": c, "prompt": f"{c} prompt <{i}>", "reply": f"{m} reply {i}",
                       "refused": refused, "refusal_score": 1.0 if refused else -1.0}
                if m == "was_e2e":
                    base = {"benign": 0.0, "harmful": 0.5, "jailbreak": 1.0}[c]
                    row["s"] = base + 0.1 * i
                    row["w"] = [base, base + 0.1 * i, 1.0 - base, 0.25]
                rows.append(row)
        tables[m] = pd.DataFrame(rows).assign(method=m)
    # 2 prompts per category: a rate of 0 has the Wilson interval [0, z²/(2 + z²)], a rate of 1 [2/(2 + z²), 1]
    top = Z95 ** 2 / (2 + Z95 ** 2)
    ci = {0.0: [0.0, top], 1.0: [1 - top, 1.0]}
    methods = {}
    for m, t in tables.items():
        rates = {c: float(t[t.category == c].refused.mean()) for c in cats}
        methods[m] = {"refusal_rate": rates, "refusal_ci": {c: ci[r] for c, r in rates.items()},
                      "n": {c: 2 for c in cats}, "kl_benign": 0.01}
    curves = pd.DataFrame([{"alpha": a, "method": "actadd", "harmful": min(1, a / 2), "jailbreak": a / 4,
                            "benign": a / 10, "borderline": a / 5} for a in (0.5, 1.0, 2.0)])
    return {"methods": methods, "tables": tables, "curves": curves}


def patch_df(component="resid_pre", method="exact", offset=0.0, n_layers=3, tokens=("<s>", "How", " bomb", "\n")):
    rows = []
    n = len(tokens)
    for layer in range(n_layers):
        for pos, tok in enumerate(tokens):
            rows.append({"component": component, "mode": "denoise", "method": method, "layer": layer, "pos": pos,
                         "pos_from_end": pos - n, "token": tok, "corrupted_token": "cake" if tok == " bomb" else tok,
                         "post_instruction": pos >= n - 1, "value": layer * 0.1 + pos * 0.01 + offset,
                         "raw": 2 * (layer + pos)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- directions
def test_candidate_scores_heatmap(scores):
    fig = plots.candidate_scores_heatmap(scores, "bypass_score", selected=(1, -1))
    assert isinstance(fig, go.Figure)
    heat = fig.data[0]
    z = np.asarray(heat.z)
    assert z.shape == (3, 2)                       # layers x positions
    assert list(heat.y) == [0, 1, 2] and list(heat.x) == [-2, -1]
    assert z[2, 1] == 19.0 and z[0, 0] == -2.0     # bypass = 10 * layer + position
    assert [t.type for t in fig.data] == ["heatmap", "scatter", "scatter"]  # + failing cells, + selected star
    assert list(fig.data[1].y) == [2, 2]           # layer 2 fails the filters
    assert fig.layout.xaxis.title.text == "post-instruction position" and fig.layout.yaxis.title.text == "layer"
    assert heat.zmid == 0.0


def test_bypass_induce_scatter(scores):
    fig = plots.bypass_induce_scatter(scores, selected=(0, -1))
    assert [t.name for t in fig.data] == ["passes filters", "fails filters", "selected (layer 0, pos -1)"]
    assert len(fig.data[0].x) == 4 and len(fig.data[1].x) == 2
    assert fig.data[2].x[0] == -1.0 and fig.data[2].y[0] == 0.0
    assert "bypass" in fig.layout.xaxis.title.text and "induce" in fig.layout.yaxis.title.text
    assert len(fig.layout.shapes) == 2             # base-rate reference lines


def test_projection_plot():
    rng = np.random.default_rng(0)
    rows = [{"category": c, "prompt_index": i, "layer": l, "position": p, "projection": shift + l + rng.normal() * 0.01}
            for c, shift in (("harmful", 5.0), ("benign", 0.0), ("jailbreak", 3.0))
            for i in range(4) for l in range(3) for p in (-2, -1)]
    df = pd.DataFrame(rows)
    fig = plots.projection_plot(df, position=-1)
    assert [t.name for t in fig.data] == ["harmful", "jailbreak", "benign"]
    harm = fig.data[0]
    np.testing.assert_allclose(harm.y, [5, 6, 7], atol=0.05)
    assert harm.line.color == plots.COLORS["harmful"]
    assert len(plots.projection_plot(df, show_prompts=True).data) == 3 * 4 + 3
    with pytest.raises(WorkbenchError, match=r"position=7 .* available: \[-2, -1\]"):
        plots.projection_plot(df, position=7)


def test_cosine_matrix():
    rows = [{"layer_a": a, "position_a": p, "layer_b": b, "position_b": q, "cos": 1.0 if a == b else 0.5 - 0.1 * p}
            for a in range(4) for b in range(4) for p in (-2, -1) for q in (-2, -1)]
    fig = plots.cosine_matrix(pd.DataFrame(rows), position=-1)
    z = np.asarray(fig.data[0].z)
    assert len(fig.data) == 1 and z.shape == (4, 4)
    np.testing.assert_allclose(np.diag(z), 1.0)
    np.testing.assert_allclose(z[0, 1], 0.6)
    assert fig.data[0].zmin == -1 and fig.data[0].zmax == 1


# --------------------------------------------------------------------------------------------- patching
def test_patching_heatmap_token_labels():
    df = patch_df()
    fig = plots.patching_heatmap(df, labels="both")
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 4)
    np.testing.assert_allclose(z[2, 3], 0.23)
    assert list(fig.layout.xaxis.ticktext) == ["&lt;s&gt;", "How", "·bomb/cake", "\\n"]
    assert fig.layout.yaxis.title.text == "layer"
    assert len(fig.layout.shapes) == 1             # post-instruction boundary
    assert len(plots.patching_heatmap(df, last_n=2).data[0].x) == 2
    heads = pd.DataFrame([{"component": "z", "layer": l, "head": h, "value": l + h / 10} for l in range(2) for h in range(3)])
    hz = np.asarray(plots.patching_heatmap(heads).data[0].z)
    assert hz.shape == (2, 3) and hz[1, 2] == pytest.approx(1.2)


def test_patching_heatmaps_and_ambiguity():
    df = pd.concat([patch_df("resid_pre"), patch_df("attn_out"), patch_df("resid_pre", "attribution", 0.05)])
    fig = plots.patching_heatmaps(df)
    assert len(fig.data) == 2 and all(t.coloraxis == "coloraxis" for t in fig.data)
    with pytest.raises(WorkbenchError, match="mixes 2 values of 'component'"):
        plots.patching_heatmap(df, method="exact")


def test_attribution_vs_exact():
    df = pd.concat([patch_df("resid_pre"), patch_df("resid_pre", "attribution", 0.05),
                    patch_df("mlp_out"), patch_df("mlp_out", "attribution", 0.0)])
    fig = plots.attribution_vs_exact(df)
    assert len(fig.data) == 3 and fig.data[-1].name == "y = x"
    assert fig.data[0].name == "resid_pre (r = 1.00)"
    np.testing.assert_allclose(np.asarray(fig.data[0].y) - np.asarray(fig.data[0].x), 0.05)
    assert len(fig.data[0].x) == 12
    assert fig.layout.xaxis.title.text == "exact patching (value)"


def test_subspace_patching_plot():
    fig = plots.subspace_patching_plot(pd.DataFrame({"layer": [1, 0], "value": [0.8, 0.1], "value_full": [1.0, 0.9]}))
    assert list(fig.data[1].y) == [0.1, 0.8]


# --------------------------------------------------------------------------------------------- sparsity
def test_sparsity_plots():
    df = pd.DataFrame([{"layer": l, "category": c, "threshold": t, "sparsity": 0.5 + 0.1 * l - t}
                       for l in range(3) for c in ("harmful", "benign") for t in (0.0, 0.1)])
    fig = plots.sparsity_by_layer(df, threshold=0.0)
    assert [t.name for t in fig.data] == ["harmful", "benign"]
    np.testing.assert_allclose(fig.data[0].y, [0.5, 0.6, 0.7])
    with pytest.raises(WorkbenchError, match="threshold="):
        plots.sparsity_by_layer(df)
    ppl = pd.DataFrame({"sparsity": [0.9, 0.5, 0.7], "ppl_increase_pct": [8.0, 0.2, 1.5], "scope": "overall"})
    fig = plots.ppl_sparsity_curve(ppl)
    assert list(fig.data[0].x) == [0.5, 0.7, 0.9] and len(fig.layout.shapes) == 2
    abl = pd.DataFrame([{"n_ablated": n, "selection": "random", "metric": "refusal_rate", "seed": s, "value": 0.9 - 0.01 * s}
                        for n in (0, 8) for s in range(3)] +
                       [{"n_ablated": n, "selection": "differential", "metric": m, "value": 0.9 - n / 10}
                        for n in (0, 8) for m in ("refusal_rate", "loss")])
    fig = plots.neuron_ablation_curve(abl)
    assert [(t.name, t.xaxis) for t in fig.data] == [("differential", "x"), ("random", "x"), ("differential", "x2")]
    np.testing.assert_allclose(fig.data[1].y, [0.89, 0.89])
    np.testing.assert_allclose(fig.data[1].error_y.array, [0.01, 0.01])


# --------------------------------------------------------------------------------------------- steering
def test_controller_weight_figures(comparison):
    fig = plots.controller_weights_heatmap(comparison, "was_e2e")
    z = np.asarray(fig.data[0].z)
    assert z.shape == (6, 4)                       # prompts x layers
    np.testing.assert_allclose(z[:, 0], [0.5, 0.5, 1.0, 1.0, 0.0, 0.0])  # harmful, jailbreak, benign order
    assert list(fig.layout.yaxis.ticktext) == ["harmful (2)", "jailbreak (2)", "benign (2)"]
    assert len(fig.layout.shapes) == 2             # group separators
    mean = plots.controller_weights_by_category(comparison["tables"])
    assert [t.name for t in mean.data] == ["harmful (n=2)", "jailbreak (n=2)", "benign (n=2)"]
    np.testing.assert_allclose(mean.data[0].y, [0.5, 0.55, 0.5, 0.25])
    with pytest.raises(WorkbenchError, match="no per-layer weights w"):
        plots.controller_weights_heatmap(pd.concat(comparison["tables"].values()).assign(w=None), "was_e2e")
    csv_like = comparison["tables"]["was_e2e"].assign(w=lambda d: d.w.map(json.dumps))
    assert np.asarray(plots.controller_weights_heatmap(csv_like, None).data[0].z).shape == (6, 4)
    # the effective steering s * w (worked by hand from the fixture): benign w = 1 at layer 2 counts for nothing at s = 0
    eff = np.asarray(plots.controller_weights_heatmap(comparison, "was_e2e", value="s*w").data[0].z)
    np.testing.assert_allclose(eff[:, 0], [0.25, 0.3, 1.0, 1.1, 0.0, 0.0])
    np.testing.assert_allclose(eff[:, 3], [0.125, 0.15, 0.25, 0.275, 0.0, 0.025])
    eff_mean = plots.controller_weights_by_category(comparison, value="s*w")
    np.testing.assert_allclose(eff_mean.data[0].y, [0.275, 0.305, 0.275, 0.1375])
    np.testing.assert_allclose(eff_mean.data[2].y, [0.0, 0.005, 0.05, 0.0125])
    assert "s·w" in eff_mean.layout.title.text
    with pytest.raises(WorkbenchError, match="value must be one of"):
        plots.controller_weights_by_category(comparison, value="w*s")
    with pytest.raises(WorkbenchError, match="needs the controller scale s"):
        plots.controller_weights_heatmap(comparison["tables"]["was_e2e"].drop(columns="s"), None, value="s*w")


def test_scale_distribution(comparison):
    fig = plots.scale_distribution(comparison)
    assert [t.name for t in fig.data] == ["harmful", "jailbreak", "benign"]
    np.testing.assert_allclose(fig.data[2].y, [0.0, 0.1])
    with pytest.raises(WorkbenchError, match="'none' has no scale s"):
        plots.scale_distribution(comparison, ["was_e2e", "none"])


def test_refusal_rate_bars(comparison):
    fig = plots.refusal_rate_bars(comparison)
    assert [t.name for t in fig.data] == ["harmful", "jailbreak", "benign"]
    assert list(fig.data[0].x) == ["none", "was_e2e"]
    assert list(fig.data[1].y) == [0.0, 1.0]       # jailbreak: none 0 %, was_e2e 100 %
    assert fig.layout.barmode == "group" and fig.layout.yaxis.title.text == "refusal rate"
    # Wilson 95 % error bars: k = 0 of 2 spans [0, z²/(2 + z²)] = [0, 0.6576], k = 2 of 2 [0.3424, 1]
    err = fig.data[1].error_y
    np.testing.assert_allclose(err.array, [0.6576, 0.0], atol=1e-4)
    np.testing.assert_allclose(err.arrayminus, [0.0, 0.6576], atol=1e-4)
    assert err.symmetric is False and err.visible
    # without intervals (an older summary, or a plain DataFrame) the bars have none
    bare = {m: {"refusal_rate": r["refusal_rate"]} for m, r in comparison["methods"].items()}
    assert plots.refusal_rate_bars(bare).data[1].error_y.array is None


def test_alpha_curves(comparison):
    fig = plots.alpha_tradeoff(comparison, refusal=("harmful", "jailbreak"), points=comparison)
    assert [t.name for t in fig.data] == ["actadd", "none (test)", "was_e2e (test)"]
    np.testing.assert_allclose(fig.data[0].x, [0.05, 0.1, 0.2])
    np.testing.assert_allclose(fig.data[0].y, [(0.25 + 0.125) / 2, (0.5 + 0.25) / 2, (1.0 + 0.5) / 2])
    assert list(fig.data[0].text) == ["α=0.5", "α=1", "α=2"]
    assert fig.data[2].y[0] == 1.0 and fig.data[2].x[0] == 0.0
    # the test points' intervals: on x (benign, one column) but not on y (an average of two columns)
    np.testing.assert_allclose(fig.data[2].error_x.array, [0.6576], atol=1e-4)
    assert fig.data[2].error_y.array is None
    assert fig.layout.xaxis.title.text == "false refusal rate (benign)"
    sweep = plots.alpha_sweep(comparison["curves"])
    assert len(sweep.data) == 4 and list(sweep.data[0].y) == [0.25, 0.5, 1.0]


def test_generations_table(comparison):
    ex = plots.example_generations(comparison, "none", "was_e2e", n_per_category=1)
    assert ex["category"].tolist() == ["harmful", "jailbreak", "benign"]
    assert ex["changed"].tolist() == [False, True, False]
    fig = plots.generations_table(comparison, n_per_category=2)
    table = fig.data[0]
    assert table.type == "table" and len(table.cells.values) == 5  # category, prompt, 2 replies, s
    assert table.cells.values[1][0] == "harmful prompt &lt;0&gt;"  # escaped for plotly's HTML-ish text
    assert len(table.cells.values[0]) == 6


def test_bad_input_names_missing_columns(scores):
    with pytest.raises(WorkbenchError, match=r"lacks columns \['induce_score'\]"):
        plots.bypass_induce_scatter(scores.drop(columns="induce_score"))
    with pytest.raises(WorkbenchError, match="expects a pandas DataFrame"):
        plots.candidate_scores_heatmap({"layer": [0]})
    with pytest.raises(WorkbenchError, match="no rows with method='cast'"):
        plots.controller_weights_heatmap({"tables": {"was_e2e": pd.DataFrame({"category": ["a"], "w": [[1.0]]})}},
                                         "cast")


def test_one_shared_style_no_global_state(scores, comparison):
    before = pio.templates.default
    figs = [plots.candidate_scores_heatmap(scores), plots.refusal_rate_bars(comparison)]
    assert pio.templates.default == before
    assert all(f.layout.template.layout.font.family == plots.TEMPLATE.layout.font.family for f in figs)


# ------------------------------------------------------------------------------------------------ export
def test_save_figure_writes_offline_html_and_png(tmp_path, comparison):
    fig = plots.refusal_rate_bars(comparison)
    out = plots.save_figure(fig, tmp_path / "figs" / "rates.png", width=600, height=400, scale=2)
    assert set(out) == {"html", "png"}
    png = out["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG (route: {plots.image_engine()})"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (1200, 800)
    assert 10_000 < len(png) < 2_000_000
    html = out["html"].read_text()
    assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
    bundle = tmp_path / "figs" / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000       # plotly.js itself, beside the HTML: opens offline


def test_save_figure_without_exporter_writes_nothing(tmp_path, monkeypatch, comparison):
    def no_kaleido():
        raise export_mod.ImageExportError("static image export needs kaleido, which is not installed")

    monkeypatch.setattr(export_mod, "image_engine", no_kaleido)
    with pytest.raises(plots.ImageExportError, match="kaleido"):
        plots.save_figure(plots.refusal_rate_bars(comparison), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WorkbenchError, match="unknown figure format 'gif'"):
        plots.save_figure(go.Figure(), tmp_path / "x", formats=("gif",))


# ---------------------------- the analyses' own objects (no model: built from tensors; patching may not be committed yet)
def test_directions_outputs_plot():
    import torch

    from workbench.directions.analysis import candidate_cosines
    from workbench.directions.candidates import Candidates
    from workbench.directions.select import apply_filters

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    cands = Candidates(dirs, dirs, torch.zeros_like(dirs), [0, 1, 2], [-2, -1], 4, 4)
    fig = plots.cosine_matrix(candidate_cosines(cands), position=-1)
    u = dirs[:, 1] / dirs[:, 1].norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), (u @ u.T).numpy(), atol=1e-6)

    raw = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "position": [-2, -1] * 3, "bypass_score": [1., 2, 3, 4, 5, 6],
                        "induce_score": [1., -1, 1, 1, 1, 1], "kl": [0.0] * 6})
    fig = plots.candidate_scores_heatmap(apply_filters(raw, n_layers=3))
    assert np.asarray(fig.data[0].z).shape == (3, 2) and len(fig.data) == 2  # layer 2 and one induce < 0 fail


def test_patch_results_plot():
    import torch

    exact_mod = pytest.importorskip("workbench.patching.exact")
    vals = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10
    kw = dict(component="resid_pre", grid="layer_pos", mode="denoise", metric="refusal_score", raw=vals,
              clean_value=1.0, corrupted_value=0.0, tokens=["<s>", "a", "b", "c"], corrupted_tokens=["<s>", "a", "x", "c"],
              n_post=1)
    exact = exact_mod.PatchResult(method="exact", values=vals, **kw)
    attr = exact_mod.PatchResult(method="attribution", values=vals * 0.5, **kw)
    heat = plots.patching_heatmap(exact)
    np.testing.assert_allclose(np.asarray(heat.data[0].z), vals.numpy())
    assert list(heat.layout.xaxis.ticktext) == ["&lt;s&gt;", "a", "b", "c"]
    sc = plots.attribution_vs_exact(exact, attr)
    np.testing.assert_allclose(np.asarray(sc.data[0].y), np.asarray(sc.data[0].x) * 0.5, atol=1e-6)
    assert len(plots.attribution_vs_exact([exact, attr]).data) == 2

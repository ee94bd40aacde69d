"""Plotly figures of the workbench analyses: each function takes a DataFrame / artifact and returns a
``go.Figure`` in the one shared style (:mod:`.style`; plotly's global default template is never changed).

Quick start::

    from workbench import plots

    fig = plots.candidate_scores_heatmap(selection.scores, selected=(d.layer, d.position))
    fig = plots.patching_heatmap(report.exact["resid_pre"], last_n=12)
    fig = plots.refusal_rate_bars(comparison)                     # compare_methods(...) output
    plots.save_figure(fig, "figures/refusal_rates")               # .html (offline) + .png

Families: :mod:`.directions`, :mod:`.patching`, :mod:`.sparsity`, :mod:`.steering`; export in :mod:`.export`.
"""

from .directions import (
    bypass_induce_scatter, candidate_scores_heatmap, cosine_matrix, layer_position_heatmap, projection_plot,
)
from .export import ImageExportError, image_engine, save_figure, to_image
from .patching import attribution_vs_exact, patching_heatmap, patching_heatmaps, subspace_patching_plot
from .sparsity import neuron_ablation_curve, ppl_sparsity_curve, sparsity_by_layer
from .steering import (
    alpha_sweep, alpha_tradeoff, controller_weights_by_category, controller_weights_heatmap, example_generations,
    generations_table, rates_frame, refusal_rate_bars, scale_distribution, tables_frame,
)
from .style import COLORS, TEMPLATE, color_map

__all__ = [
    "COLORS", "TEMPLATE", "ImageExportError", "alpha_sweep", "alpha_tradeoff", "attribution_vs_exact",
    "bypass_induce_scatter", "candidate_scores_heatmap", "color_map", "controller_weights_by_category",
    "controller_weights_heatmap", "cosine_matrix", "example_generations", "generations_table", "image_engine",
    "layer_position_heatmap", "neuron_ablation_curve", "patching_heatmap", "patching_heatmaps",
    "ppl_sparsity_curve", "projection_plot", "rates_frame", "refusal_rate_bars", "save_figure",
    "scale_distribution", "sparsity_by_layer", "subspace_patching_plot", "tables_frame", "to_image",
]

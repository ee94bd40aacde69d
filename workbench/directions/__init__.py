"""Refusal directions: candidates, selection, other finders, interventions, the Direction artifact, analyses.

Quick start::

    import workbench as wb
    from workbench import directions as wd

    model = wb.load_model()
    sel = wd.find_refusal_direction(
        model,
        wb.organism_prompts("train", "harmful"), wb.organism_prompts("train", "benign"),
        wb.organism_prompts("val", "harmful"), wb.organism_prompts("val", "benign"),
    )
    sel.scores                                   # DataFrame: every candidate's bypass / induce / KL
    d = sel.direction                            # Direction(layer, position, vector, ...)
    wb.generate(model, prompts, fwd_hooks=wd.ablation_hooks(model, d))
    wb.generate(model, prompts, fwd_hooks=wd.actadd_hooks(model, d, layers=d.layer))
    edited = wd.orthogonalize(model, d)          # a copy whose weights equal the ablation
    d.save("runs/x/direction"); wd.Direction.load("runs/x/direction", model=model)

    # contrastive activation addition (Rimsky et al. 2024): refusal vs compliance answer starts after the prompts
    sel = wd.find_refusal_direction(model, h_train, b_train, h_val, b_val, method="caa", caa=wd.CAAConfig())
"""

from .analysis import candidate_cosines, cosine_to, projection_by_layer, projection_summary
from .artifact import FORMAT_VERSION, Direction
from .caa import (
    CAAConfig,
    PooledEntry,
    actadd_check,
    answer_entry,
    answer_tokenizer,
    caa_candidates,
    caa_entries,
    mean_resid_norm,
)
from .candidates import (
    Candidates,
    MemoryEntry,
    activation_entry,
    candidate_directions,
    compute_resid_pre,
    diff_in_means,
    streaming_mean,
)
from .finders import embedding_centroid, logistic_probe, pca_directions, probe_directions
from .interventions import ablation_hooks, actadd_hooks, orthogonalize, project_out, unit
from .select import (
    Selection,
    SelectionConfig,
    apply_filters,
    find_refusal_direction,
    score_candidates,
    select_candidate,
)

__all__ = [
    "CAAConfig", "PooledEntry", "actadd_check", "answer_entry", "answer_tokenizer", "caa_candidates", "caa_entries",
    "mean_resid_norm",
    "Candidates", "Direction", "FORMAT_VERSION", "MemoryEntry", "Selection", "SelectionConfig",
    "ablation_hooks", "actadd_hooks", "activation_entry", "apply_filters", "candidate_cosines",
    "candidate_directions", "compute_resid_pre", "cosine_to", "diff_in_means", "embedding_centroid",
    "find_refusal_direction", "logistic_probe", "orthogonalize", "pca_directions", "probe_directions",
    "project_out", "projection_by_layer", "projection_summary", "score_candidates", "select_candidate",
    "streaming_mean", "unit",
]

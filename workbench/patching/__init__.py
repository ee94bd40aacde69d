"""Activation patching for refusal: exact (batched), attribution, and subspace patching with the illusion check.

Quick start::

    import workbench as wb
    from workbench import patching as wp

    model = wb.load_model()                                   # the organism
    pairs = wp.organism_pairs(model.tokenizer, limit=16)     # minimal (harmful, harmless) pairs
    runs = wp.prepare(model, pairs)                           # clean + corrupted runs, metric checked
    resid = wp.exact_patch(model, runs, "resid_pre")         # layer x position, denoising, batched
    attr = wp.attribution_patch(model, runs, "resid_pre")    # same cells, one backward
    wp.compare(resid, attr)["pearson"]
    resid.df.head()                                           # component, layer, pos, token, value, raw
    heads = wp.exact_patch(model, runs, "heads")             # layer x head (hook_z)
    wp.subspace_patch(model, runs, direction)                # only the projection on the refusal direction
    wp.illusion_check(model, runs, direction, layer=4)       # Makelov et al.'s row space / nullspace split
"""

from .attribution import attribution_patch, compare, pearson
from .capture import Run, capture_run
from .engine import ENGINES
from .exact import MODES, PatchingRuns, PatchResult, exact_patch, first_layer_above, prepare
from .metrics import COMPLIANCE_PREFIXES, METRICS, Metric, compliance_token_ids, make_metric, normalise
from .pairs import PromptPairs, make_pairs, organism_pairs, read_pairs
from .run import run_patching
from .sites import ALIASES, GRIDS, HOOKS, hook_name, resolve
from .subspace import (
    READERS, IllusionCheck, direction_tensor, illusion_check, reader_gram, split_direction, subspace_patch,
)

__all__ = [
    "ALIASES", "COMPLIANCE_PREFIXES", "ENGINES", "GRIDS", "HOOKS", "METRICS", "MODES", "READERS", "IllusionCheck",
    "Metric", "PatchResult", "PatchingRuns", "PromptPairs", "Run", "attribution_patch", "capture_run", "compare",
    "compliance_token_ids", "direction_tensor", "exact_patch", "first_layer_above", "hook_name", "illusion_check",
    "make_metric", "make_pairs", "normalise", "organism_pairs", "pearson", "prepare", "read_pairs", "reader_gram",
    "resolve", "run_patching", "split_direction", "subspace_patch",
]

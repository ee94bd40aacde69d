"""Sparsity of MLP activations and of the refusal signal (issue 7).

Everything streams over the cache store (:mod:`workbench.store`: ``entry.iter_shards``, one shard in memory)
or runs real forward passes with hooks on ``blocks.{l}.mlp.hook_post`` (the input of the down projection; for
SwiGLU ``act(gate(x)) * up(x)``), and returns pandas DataFrames in long format for :mod:`workbench.plots`.

Quick start::

    import workbench as wb
    from workbench import sparsity as ws

    model = wb.load_model()                                         # the organism
    sets = {"harmful": wb.organism_prompts("test", "harmful"), "benign": wb.organism_prompts("test", "benign"),
            "jailbreak": wb.organism_prompts("test", "jailbreak")}
    cal = ws.mlp_entry(model, wb.organism_prompts("train", "benign"))     # store entry, positions="all"
    chess = ws.channel_thresholds(cal, quantile=0.5)                  # CHESS per-channel thresholds
    tabs = ws.sparsity_by_category(model, sets, channel=chess)        # .sparsity .ratio .channel DataFrames
    text = ws.organism_heldout(model.tokenizer, "val")                # val prompts + replies, loss on replies
    ppl = ws.ppl_sparsity(model, text, p=(1, 5))                      # .result (overall + per layer), .curve
    topk = ws.topk_sweep(model, text, {"harmful": sets["harmful"]})  # loss / refusal as k falls
    rank = ws.differential_neurons_for(model, wb.organism_prompts("train", "harmful"),
                                       wb.organism_prompts("train", "benign"))   # Cohen's d per neuron
    abl = ws.ablation_curve(model, rank, sets["harmful"], ws.organism_heldout(model.tokenizer, "val", ["benign"]))
    abl.halving                                                      # n that halves refusal vs random
    ws.direction_sparsity(direction); ws.direction_alignment(model, direction).by_layer

Figures: ``plots.sparsity_by_layer(tabs.sparsity, threshold=0.01)``, ``plots.ppl_sparsity_curve(ppl.curve)``,
``plots.neuron_ablation_curve(abl.curve)``.
"""

from ._common import MLP_POST, mlp_out_weight, mlp_post_name
from .direction import (
    Alignment, direction_alignment, direction_sparsity, direction_vector, neuron_cosines, participation_ratio,
    topk_share,
)
from .heldout import SCOPES, HeldoutText, heldout_text, lm_loss, organism_heldout, token_losses
from .hooks import ThresholdZeroing, group_neurons, neuron_ablation_hooks, topk_hooks
from .neurons import (
    CONTROLS, DEFAULT_NS, POOLS, AblationCurve, ablation_curve, cohens_d, differential_neurons,
    differential_neurons_for,
)
from .ppl import CRITERIA, WEIGHTINGS, PPLSparsity, ppl_curve, ppl_sparsity
from .stats import (
    DEFAULT_THRESHOLD, DEFAULT_THRESHOLDS, CategorySparsity, ChannelThresholds, activation_ratio,
    activation_sparsity, channel_sparsity, channel_thresholds, count_inactive, mlp_entry, sparsity_by_category,
    sparsity_of,
)
from .topk import DEFAULT_K_FRACTIONS, resolve_ks, topk_sweep

__all__ = [
    "CONTROLS", "CRITERIA", "DEFAULT_K_FRACTIONS", "DEFAULT_NS", "DEFAULT_THRESHOLD", "DEFAULT_THRESHOLDS", "MLP_POST",
    "POOLS", "SCOPES", "WEIGHTINGS", "AblationCurve", "Alignment", "CategorySparsity", "ChannelThresholds",
    "HeldoutText", "PPLSparsity", "ThresholdZeroing", "ablation_curve", "activation_ratio", "activation_sparsity",
    "channel_sparsity", "channel_thresholds", "cohens_d", "count_inactive", "differential_neurons",
    "differential_neurons_for", "direction_alignment", "direction_sparsity", "direction_vector", "group_neurons",
    "heldout_text", "lm_loss", "mlp_entry", "mlp_out_weight", "mlp_post_name", "neuron_ablation_hooks",
    "neuron_cosines", "organism_heldout", "participation_ratio", "ppl_curve", "ppl_sparsity", "resolve_ks",
    "sparsity_by_category", "sparsity_of", "token_losses", "topk_hooks", "topk_share", "topk_sweep",
]

"""The end-to-end direction run behind ``workbench directions``: find + select, then measure on the test split.

Prompts come from the organism splits (train: candidates, val: selection, test: the reported rates).
The measured quantities (test split, greedy decoding, substring judge):

* ``refusal_rate.harmful_base`` / ``benign_base`` -- no intervention;
* ``refusal_rate.harmful_ablated`` -- the selected direction ablated everywhere (:func:`ablation_hooks`);
* ``refusal_rate.benign_actadd`` -- the raw difference in means added at the selected layer, all positions
  (:func:`actadd_hooks`, coefficient 1);
* ``kl_harmless_ablated`` -- mean KL(base || ablated) of the next-token distribution at the last position of
  the benign test prompts;
* ``cos_ground_truth`` -- cosine with the planted direction, when the model directory has
  ``ground_truth.safetensors``.
"""

from __future__ import annotations


import torch

from ..chat import tokenize_chat
from ..data import organism_prompts
from ..generation import generate
from ..judge import refusal_rate
from .interventions import ablation_hooks, actadd_hooks, unit
from .select import SelectionConfig, Selection, _kl, base_logits, find_refusal_direction


@torch.no_grad()
def mean_kl(model, prompts, fwd_hooks, batch_size: int = 64) -> float:
    """Mean KL(base || hooked) of the next-token distribution at the last position of ``prompts``."""
    batch = tokenize_chat(model.tokenizer, list(prompts))
    base = torch.log_softmax(base_logits(model, batch, batch_size), -1)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        new = base_logits(model, batch, batch_size)
    return float(_kl(base, new).mean())


def directions_report(
    model,
    harmless_category: str = "benign",
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
    config: SelectionConfig | None = None,
    max_new_tokens: int = 24,
    store=None,
    show_progress: bool = True,
) -> tuple[dict, Selection]:
    """Find and select the refusal direction on the organism prompts and measure it on the test split.

    Returns:
        ``(summary, selection)``; ``summary`` has ``selected`` (layer, position), ``cos_ground_truth`` (only
        with a ground truth), ``refusal_rate`` (harmful_ablated, benign_actadd, harmful_base, benign_base),
        ``kl_harmless_ablated`` and the selected candidate's val ``scores``.
    """
    cfg = config or SelectionConfig()
    h_tr = organism_prompts("train", "harmful", limit_train)
    b_tr = organism_prompts("train", harmless_category, limit_train)
    h_va = organism_prompts("val", "harmful", limit_val)
    b_va = organism_prompts("val", harmless_category, limit_val)
    h_te = organism_prompts("test", "harmful", limit_test)
    b_te = organism_prompts("test", harmless_category, limit_test)
    sel = find_refusal_direction(model, h_tr, b_tr, h_va, b_va, cfg, store=store, show_progress=show_progress)
    d = sel.direction
    abl = ablation_hooks(model, d)
    add = actadd_hooks(model, d, layers=d.layer)
    gen = {"max_new_tokens": max_new_tokens, "batch_size": cfg.batch_size, "show_progress": show_progress}
    rates = {
        "harmful_ablated": refusal_rate(generate(model, h_te, fwd_hooks=abl, **gen)),
        "benign_actadd": refusal_rate(generate(model, b_te, fwd_hooks=add, **gen)),
        "harmful_base": refusal_rate(generate(model, h_te, **gen)),
        "benign_base": refusal_rate(generate(model, b_te, **gen)),
    }
    summary: dict = {"selected": {"layer": d.layer, "position": d.position}}
    from ..organism import ground_truth_of

    gt = ground_truth_of(model)
    if gt is not None:
        gt_layer, gt_vec = gt
        cos = float(unit(d.vector.float()) @ unit(gt_vec.float()))
        summary["cos_ground_truth"] = round(cos, 4)
        summary["ground_truth_layer"] = gt_layer
        d.scores["cos_ground_truth"] = cos
    summary["refusal_rate"] = {k: round(v, 4) for k, v in rates.items()}
    summary["kl_harmless_ablated"] = round(mean_kl(model, b_te, abl, cfg.batch_size), 5)
    summary["scores"] = {k: (round(float(d.scores[k]), 4) if d.scores.get(k) is not None else None)
                         for k in ("bypass_score", "induce_score", "kl", "norm", "base_harmful_score",
                                   "base_harmless_score")}
    summary["n"] = {"train": [len(h_tr), len(b_tr)], "val": [len(h_va), len(b_va)], "test": [len(h_te), len(b_te)]}
    d.meta["test"] = {k: v for k, v in summary.items() if k not in ("scores", "n")}
    return summary, sel

"""The directions stage: find and select the refusal direction (Arditi et al. 2024), then measure it on test.

Reads the prompt data (train: candidates, val: selection, test: the reported rates; ``harmful`` against
``benign``). Writes ``direction.{safetensors,json}`` (the artifact later stages read), ``candidate_scores.csv``,
``candidate_cosines.csv``, ``projections.csv`` and ``summary.json`` with (test split, greedy, the judge):

* ``refusal_rate.harmful_base`` / ``benign_base`` -- no intervention;
* ``refusal_rate.harmful_ablated`` -- the selected direction ablated everywhere (:func:`ablation_hooks`);
* ``refusal_rate.benign_actadd`` -- the raw difference in means added at the selected layer, all positions
  (:func:`actadd_hooks`, coefficient 1);
* ``kl_benign_ablated`` -- mean KL(base || ablated) of the next-token distribution at the last position of the
  benign test prompts;
* ``cos_ground_truth`` -- cosine with the planted direction, when the model has one (the organism).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..directions.select import SelectionConfig
from .base import Result, Stage

DIRECTION = "direction"


@dataclass
class DirectionsConfig:
    """How the direction is selected and measured."""

    #: thresholds and batch size of the selection (Arditi et al.'s defaults)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    #: reply length of the measured refusal rates
    max_new_tokens: int = 24
    #: prompts per category for the per-layer projection figure (test split)
    projection_prompts: int = 64


@dataclass
class DirectionsResult(Result):
    """Summary, tables (candidate scores, cosines, projections) and the selected :class:`Direction`."""

    direction: object = None

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.direction.save(out / DIRECTION)
        return super().save(out)

    @classmethod
    def load(cls, out_dir, model=None, **_):
        from ..directions import Direction

        base = Result.load(out_dir)
        return cls(base.summary, base.tables, Direction.load(Path(out_dir) / DIRECTION, model=model))


@torch.no_grad()
def mean_kl(model, prompts, fwd_hooks, batch_size: int = 64) -> float:
    """Mean KL(base || hooked) of the next-token distribution at the last position of ``prompts``."""
    from ..chat import tokenize_chat
    from ..directions.select import _kl, base_logits

    batch = tokenize_chat(model.tokenizer, list(prompts))
    base = torch.log_softmax(base_logits(model, batch, batch_size), -1)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        new = base_logits(model, batch, batch_size)
    return float(_kl(base, new).mean())


class DirectionsStage(Stage):
    name = "directions"
    config_class = DirectionsConfig
    result_class = DirectionsResult

    def run(self, model, data, store, config: DirectionsConfig, inputs, show_progress: bool = True):
        from ..directions import ablation_hooks, actadd_hooks, candidate_cosines, find_refusal_direction, \
            projection_by_layer, unit
        from ..generation import generate
        from ..judge import refusal_rate
        from ..organism import ground_truth_of

        for split in ("train", "val", "test"):
            data.require(split, "harmful", "benign")
        h_tr, b_tr = data.prompts("train", "harmful"), data.prompts("train", "benign")
        h_va, b_va = data.prompts("val", "harmful"), data.prompts("val", "benign")
        h_te, b_te = data.prompts("test", "harmful"), data.prompts("test", "benign")
        sel_cfg = config.selection
        sel = find_refusal_direction(model, h_tr, b_tr, h_va, b_va, sel_cfg, store=store, show_progress=show_progress)
        d = sel.direction
        abl = ablation_hooks(model, d)
        add = actadd_hooks(model, d, layers=d.layer)
        gen = {"max_new_tokens": config.max_new_tokens, "batch_size": sel_cfg.batch_size,
               "show_progress": show_progress}
        rates = {
            "harmful_ablated": refusal_rate(generate(model, h_te, fwd_hooks=abl, **gen)),
            "benign_actadd": refusal_rate(generate(model, b_te, fwd_hooks=add, **gen)),
            "harmful_base": refusal_rate(generate(model, h_te, **gen)),
            "benign_base": refusal_rate(generate(model, b_te, **gen)),
        }
        summary: dict = {"selected": {"layer": d.layer, "position": d.position}}
        gt = ground_truth_of(model)
        if gt is not None:
            gt_layer, gt_vec = gt
            cos = float(unit(d.vector.float()) @ unit(gt_vec.float()))
            summary["cos_ground_truth"] = round(cos, 4)
            summary["ground_truth_layer"] = gt_layer
            d.scores["cos_ground_truth"] = cos
        summary["refusal_rate"] = {k: round(v, 4) for k, v in rates.items()}
        summary["kl_benign_ablated"] = round(mean_kl(model, b_te, abl, sel_cfg.batch_size), 5)
        summary["scores"] = {k: (round(float(d.scores[k]), 4) if d.scores.get(k) is not None else None)
                             for k in ("bypass_score", "induce_score", "kl", "norm", "base_harmful_score",
                                       "base_benign_score")}
        summary["n"] = {"train": [len(h_tr), len(b_tr)], "val": [len(h_va), len(b_va)],
                        "test": [len(h_te), len(b_te)]}
        d.meta["test"] = {k: v for k, v in summary.items() if k not in ("scores", "n")}
        n_proj = config.projection_prompts
        sets = {c: data.prompts("test", c, n_proj) for c in ("harmful", "benign", "jailbreak")
                if data.prompts("test", c)}
        proj = projection_by_layer(model, d, sets, store=store, show_progress=show_progress)
        tables = {"candidate_scores": sel.scores, "candidate_cosines": candidate_cosines(sel.candidates),
                  "projections": proj}
        return DirectionsResult(summary, tables, d)

    def figures(self, result: DirectionsResult):
        from .. import plots

        d, t = result.direction, result.tables
        sel = (d.layer, d.position)
        return [
            ("candidate_scores", "Candidate directions: bypass score (layer x position)",
             plots.candidate_scores_heatmap(t["candidate_scores"], selected=sel)),
            ("bypass_vs_induce", "Bypass vs induce score of every candidate",
             plots.bypass_induce_scatter(t["candidate_scores"], selected=sel)),
            ("candidate_cosines", "Cosine similarity of candidates across layers",
             plots.cosine_matrix(t["candidate_cosines"])),
            ("projections", "Projection on the refusal direction per layer", plots.projection_plot(t["projections"])),
        ]

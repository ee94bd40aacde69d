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

Candidates come from the difference in means (``method="diff_in_means"``, the default; Arditi et al. 2024), from
contrastive activation addition (``method="caa"``: refusal minus compliance answer starts appended after the
same train prompts; Rimsky et al. 2024, :mod:`workbench.directions.caa`), or from both (``method="both"``: each
method's candidates are scored and selected; the artifact ``direction`` is the one whose selected candidate scores
best under the selection rule, ties to the difference in means, the other is saved as ``direction_<method>``).
The summary adds (the first ``check_prompts`` val prompts per category, greedy replies of ``check_new_tokens``
tokens, the substring judge):

* ``val_refusal_base`` -- harmful and benign refusal rates without any intervention;
* ``selection_rule`` -- ``"bypass"`` (lowest bypass score) or ``"induce"`` (highest induce score), with
  ``selection_rule_reason``: under ``selection_rule="auto"`` a model whose unsteered val harmful refusal rate is
  below ``non_refusing_below`` does not refuse, its bypass scores mean nothing, and the induce score selects;
* ``methods.<method>`` -- each method's selected candidate, its scores and ``actadd_check``: harmful and benign
  refusal rates with ``c * mean_resid_norm * unit(direction)`` added at its layer (all positions) for each
  ``c`` of ``check_coefficients``; ``mean_resid_norm`` is the mean residual norm at the selected layer and
  position over the train activations the candidates were computed from;
* ``method`` (as configured) and ``artifact_method`` (the method of ``direction``).

Tables added: ``actadd_check.csv`` (every method's check) and, with ``method="both"``,
``candidate_scores_<method>.csv`` of the method that is not the artifact's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..configs import PositiveInt
from ..directions.caa import CAAConfig
from ..directions.select import METHODS, SelectionConfig
from ..errors import WorkbenchError
from .base import Result, Stage

log = logging.getLogger(__name__)

DIRECTION = "direction"
#: values of :attr:`DirectionsConfig.method` and :attr:`DirectionsConfig.selection_rule`
METHOD_CHOICES = METHODS + ("both",)
RULE_CHOICES = ("auto", "bypass", "induce")


@dataclass
class DirectionsConfig:
    """How the direction is selected and measured."""

    #: thresholds and batch size of the selection (Arditi et al.'s defaults)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    #: reply length of the measured refusal rates
    max_new_tokens: PositiveInt = 24
    #: prompts per category for the per-layer projection figure (test split)
    projection_prompts: PositiveInt = 64
    #: candidates: diff_in_means (harmful minus benign prompts), caa (refusal minus compliance answer starts after
    #: the same prompts, Rimsky et al. 2024) or both
    method: Literal["diff_in_means", "caa", "both"] = "diff_in_means"
    #: the difference-in-means candidates' positions, negative offsets within the post-instruction tokens
    #: (default: all of them); CAA's are ``caa.answer_positions``
    positions: tuple[int, ...] | None = None
    #: answer starts and positions of CAA
    caa: CAAConfig = field(default_factory=CAAConfig)
    #: auto (induce when the model does not refuse, else bypass), bypass (lowest bypass score) or induce (highest
    #: induce score)
    selection_rule: Literal["auto", "bypass", "induce"] = "auto"
    #: auto rule: a val harmful refusal rate below this means the model does not refuse
    non_refusing_below: float = 0.2
    #: ActAdd check: multiples of the mean residual norm at the selected layer
    check_coefficients: tuple[float, ...] = (0.25, 0.5, 1.0)
    #: reply length of the val refusal rates (base rates and ActAdd check)
    check_new_tokens: PositiveInt = 16
    #: val prompts per category for the base rates and the ActAdd check (0: all)
    check_prompts: PositiveInt = 64

    def __post_init__(self):
        if self.method not in METHOD_CHOICES:
            raise WorkbenchError(f"unknown directions method {self.method!r}; expected one of {list(METHOD_CHOICES)}")
        if self.selection_rule not in RULE_CHOICES:
            raise WorkbenchError(f"unknown selection_rule {self.selection_rule!r}; expected one of {list(RULE_CHOICES)}")
        if not 0.0 <= self.non_refusing_below <= 1.0:
            raise WorkbenchError(f"non_refusing_below must be a rate in [0, 1], got {self.non_refusing_below}")
        coefs = tuple(self.check_coefficients)
        if not coefs or any(not c > 0 for c in coefs):
            raise WorkbenchError(f"check_coefficients must be positive numbers, got {list(coefs)}")
        self.check_coefficients = coefs
        if self.check_new_tokens < 1:
            raise WorkbenchError(f"check_new_tokens must be >= 1, got {self.check_new_tokens}")
        if self.check_prompts < 0:
            raise WorkbenchError(f"check_prompts must be >= 0 (0: every val prompt), got {self.check_prompts}")

    @property
    def methods(self) -> list[str]:
        """The candidate methods this config runs, the difference in means first."""
        return list(METHODS) if self.method == "both" else [self.method]


@dataclass
class DirectionsResult(Result):
    """Summary, tables (candidate scores, cosines, projections) and the selected :class:`Direction`; with
    ``method="both"`` the other method's selected direction in ``others`` (saved as ``direction_<method>``)."""

    direction: object = None
    others: dict = field(default_factory=dict)

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.direction.save(out / DIRECTION)
        for method, d in self.others.items():
            d.save(out / f"{DIRECTION}_{method}")
        return super().save(out)

    @classmethod
    def load(cls, out_dir, model=None, **_):
        from ..directions import Direction

        base = Result.load(out_dir)
        others = {p.stem[len(DIRECTION) + 1:]: Direction.load(p.with_suffix(""), model=model)
                  for p in sorted(Path(out_dir).glob(f"{DIRECTION}_*.json"))}
        return cls(base.summary, base.tables, Direction.load(Path(out_dir) / DIRECTION, model=model), others)


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


def selection_rule(config: DirectionsConfig, harmful_val_refusal: float) -> tuple[str, str]:
    """``(rule, reason)``: the configured rule, or under ``"auto"`` ``"induce"`` when the unsteered val harmful
    refusal rate is below ``config.non_refusing_below`` (a model that does not refuse), else ``"bypass"``."""
    if config.selection_rule != "auto":
        return config.selection_rule, "set in the config"
    rate = f"unsteered val harmful refusal rate {harmful_val_refusal:.3f}"
    if harmful_val_refusal < config.non_refusing_below:
        return "induce", (f"{rate} < {config.non_refusing_below}: the model does not refuse, so bypass scores are "
                          "meaningless; the highest induce score selects")
    return "bypass", f"{rate} >= {config.non_refusing_below}: the lowest bypass score selects"


def find_and_check(model, method: str, prompts, check_prompts, config: DirectionsConfig, rule: str, store,
                   show_progress: bool):
    """``(Selection, ActAdd check table)`` of one candidate method: :func:`find_refusal_direction` (``prompts``:
    harmful and benign train and val), then :func:`actadd_check` on ``check_prompts`` (harmful, benign) at the
    selected layer, scaled by :func:`mean_resid_norm` of the train activations the candidates came from (read back
    from the store)."""
    from ..directions import activation_entry, actadd_check, caa_entries, find_refusal_direction, mean_resid_norm

    h_tr, b_tr, h_va, b_va = prompts
    sel_cfg = config.selection
    positions = list(config.positions) if config.positions and method == "diff_in_means" else None
    sel = find_refusal_direction(model, h_tr, b_tr, h_va, b_va, sel_cfg, store=store, show_progress=show_progress,
                                 method=method, caa=config.caa, rule=rule, positions=positions)
    d = sel.direction
    kw = {"store": store, "batch_size": sel_cfg.batch_size, "show_progress": show_progress}
    if method == "caa":
        refusal, compliance = caa_entries(model, list(h_tr) + list(b_tr), config.caa, **kw)
        entries = refusal + compliance
    else:
        entries = [activation_entry(model, p, **kw) for p in (h_tr, b_tr)]
    scale = mean_resid_norm(entries, d.layer, d.position)
    check = actadd_check(model, d, *check_prompts, scale, config.check_coefficients,
                         max_new_tokens=config.check_new_tokens, **{k: v for k, v in kw.items() if k != "store"})
    return sel, check.assign(mean_resid_norm=scale)


def best_method(found: dict, rule: str) -> str:
    """The method whose selected candidate scores best under ``rule`` (lowest bypass / highest induce score);
    ties go to the first method (the difference in means)."""
    key = "bypass_score" if rule == "bypass" else "induce_score"
    sign = 1.0 if rule == "bypass" else -1.0
    return min(found, key=lambda m: (sign * float(found[m][0].direction.scores[key]), list(found).index(m)))


def _rounded_scores(d) -> dict:
    return {k: (round(float(d.scores[k]), 4) if d.scores.get(k) is not None else None)
            for k in ("bypass_score", "induce_score", "kl", "norm", "base_harmful_score", "base_benign_score")}


def _method_summary(d, check) -> dict:
    out = {"selected": {"layer": d.layer, "position": d.position}, "scores": _rounded_scores(d)}
    if d.scores.get("cos_ground_truth") is not None:
        out["cos_ground_truth"] = round(float(d.scores["cos_ground_truth"]), 4)
    out["actadd_check"] = {
        "mean_resid_norm": round(float(check["mean_resid_norm"].iloc[0]), 4),
        "rates": [{"coefficient": float(r.coefficient), "harmful": round(float(r.harmful), 4),
                   "benign": round(float(r.benign), 4)} for r in check.itertuples()],
    }
    return out


def _concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


class DirectionsStage(Stage):
    name = "directions"
    config_class = DirectionsConfig
    result_class = DirectionsResult

    def run(self, model, data, store, config: DirectionsConfig, inputs, show_progress: bool = True):
        from ..directions import ablation_hooks, actadd_hooks, candidate_cosines, projection_by_layer, unit
        from ..generation import generate
        from ..judge import refusal_rate
        from ..organism import ground_truth_of

        for split in ("train", "val", "test"):
            data.require(split, "harmful", "benign")
        h_tr, b_tr = data.prompts("train", "harmful"), data.prompts("train", "benign")
        h_va, b_va = data.prompts("val", "harmful"), data.prompts("val", "benign")
        h_te, b_te = data.prompts("test", "harmful"), data.prompts("test", "benign")
        sel_cfg = config.selection
        check_gen = {"max_new_tokens": config.check_new_tokens, "batch_size": sel_cfg.batch_size,
                     "show_progress": show_progress}
        n_check = config.check_prompts or None
        h_chk, b_chk = h_va[:n_check], b_va[:n_check]
        val_base = {"harmful": refusal_rate(generate(model, h_chk, **check_gen)),
                    "benign": refusal_rate(generate(model, b_chk, **check_gen))}
        rule, reason = selection_rule(config, val_base["harmful"])
        found, failed = {}, {}
        for m in config.methods:
            try:
                found[m] = find_and_check(model, m, (h_tr, b_tr, h_va, b_va), (h_chk, b_chk), config, rule, store,
                                          show_progress)
            except WorkbenchError as exc:  # with "both", one method without a passing candidate is a result
                if len(config.methods) == 1:
                    raise
                failed[m] = str(exc)
                log.warning("directions: method %s selected nothing: %s", m, exc)
        if not found:
            raise WorkbenchError("no direction method selected a candidate: " +
                                 "; ".join(f"{m}: {e}" for m, e in failed.items()))
        primary = best_method(found, rule)
        sel, checks = found[primary]
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
            for s, _ in found.values():
                s.direction.scores["cos_ground_truth"] = float(unit(s.direction.vector.float()) @ unit(gt_vec.float()))
            summary["cos_ground_truth"] = round(d.scores["cos_ground_truth"], 4)
            summary["ground_truth_layer"] = gt_layer
        summary["refusal_rate"] = {k: round(v, 4) for k, v in rates.items()}
        summary["kl_benign_ablated"] = round(mean_kl(model, b_te, abl, sel_cfg.batch_size), 5)
        summary["scores"] = _rounded_scores(d)
        summary["n"] = {"train": [len(h_tr), len(b_tr)], "val": [len(h_va), len(b_va)],
                        "test": [len(h_te), len(b_te)]}
        d.meta["test"] = {k: v for k, v in summary.items() if k not in ("scores", "n")}
        summary["method"] = config.method
        summary["artifact_method"] = primary
        summary["selection_rule"] = rule
        summary["selection_rule_reason"] = reason
        summary["val_refusal_base"] = {k: round(v, 4) for k, v in val_base.items()}
        summary["methods"] = {m: _method_summary(found[m][0].direction, found[m][1]) if m in found
                              else {"error": failed[m]} for m in config.methods}
        for m, (s, c) in found.items():
            s.direction.meta["actadd_check"] = summary["methods"][m]["actadd_check"]
            s.direction.meta["val_refusal_base"] = summary["val_refusal_base"]
        n_proj = config.projection_prompts
        sets = {c: data.prompts("test", c, n_proj) for c in ("harmful", "benign", "jailbreak")
                if data.prompts("test", c)}
        proj = projection_by_layer(model, d, sets, store=store, show_progress=show_progress)
        tables = {"candidate_scores": sel.scores, "candidate_cosines": candidate_cosines(sel.candidates),
                  "projections": proj}
        for m, (s, _) in found.items():
            if m != primary:
                tables[f"candidate_scores_{m}"] = s.scores
        tables["actadd_check"] = _concat([c.assign(method=m) for m, (_, c) in found.items()])
        others = {m: s.direction for m, (s, _) in found.items() if m != primary}
        return DirectionsResult(summary, tables, d, others)

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

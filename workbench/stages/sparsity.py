"""The sparsity stage: MLP activation sparsity, PPL-p%, top-k, differential neurons and the direction's
sparsity, on the prompt data (behind ``workbench sparsity`` and ``workbench run``).

What runs on which prompts (at most ``limit`` per category):

* per-category sparsity (global thresholds, activation ratio, CHESS per-channel thresholds):
  ``stats_split`` (test) harmful / benign / jailbreak, every real position;
  the CHESS thresholds are calibrated on ``calibration_split`` (train) benign prompts;
* PPL-p%: ``heldout_split`` (val) conversations, every category, with their replies (loss on
  ``heldout_scope``); the data's ``reply`` field when it has one (the organism's target replies), else the model's
  own greedy replies (``heldout_reply_tokens`` long), as recorded in the summary;
* top-k: the same held-out loss, refusal rates of the ``stats_split`` harmful and benign prompts;
* differential neurons: ranked on ``calibration_split`` harmful vs benign (``positions``, ``pool``), ablated
  while measuring ``stats_split`` harmful refusal and the loss on the ``heldout_split`` benign conversations;
* direction: the directions stage's direction when present, else the organism's planted ground truth and the
  difference in means of ``resid_pre`` (last position, ``calibration_split`` harmful - benign) at the layer
  after the planted one (the middle layer without a ground truth).

:class:`SparsityConfig` describes a run completely; it is saved in the summary. Writes one CSV per table and
``summary.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from ..configs import PositiveInt
from ..errors import WorkbenchError
from ..directions.artifact import as_vector
from ..sparsity.direction import direction_alignment, direction_sparsity, neuron_cosines
from ..sparsity.heldout import heldout_text
from ..sparsity.neurons import DEFAULT_NS, ablation_curve, differential_neurons_for
from ..sparsity.ppl import ppl_sparsity
from ..sparsity.stats import DEFAULT_THRESHOLD, DEFAULT_THRESHOLDS, channel_thresholds, mlp_entry, sparsity_by_category
from ..sparsity.topk import DEFAULT_K_FRACTIONS, topk_sweep
from .base import Result, Stage

STEPS = ("stats", "ppl", "topk", "neurons", "direction")


@dataclass
class SparsityConfig:
    """Everything that defines a sparsity run (see the module docstring for what runs on which split)."""

    stats_split: str = "test"
    calibration_split: str = "train"
    heldout_split: str = "val"
    limit: PositiveInt | None = 128
    heldout_limit: PositiveInt | None = None
    #: reply length of the model's own replies used as held-out text when the data has no replies
    heldout_reply_tokens: PositiveInt = 32
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    default_threshold: float = DEFAULT_THRESHOLD
    chess_quantile: float = 0.5
    p: tuple[float, ...] = (1.0, 5.0)
    #: search a PPL-p% threshold per layer as well as the overall one (31 searches instead of 1 on a 30-layer
    #: model, each up to ``max_evals`` forward passes over the held-out text: switch off on CPU for large models)
    ppl_per_layer: bool = True
    criterion: str = "ppl"
    weighting: str = "none"
    heldout_scope: str = "reply"
    ppl_tol: float = 0.01
    topk: tuple[float, ...] = DEFAULT_K_FRACTIONS
    topk_layers: tuple[int, ...] | None = None
    positions: str = "post_instruction"
    pool: str = "mean"
    ablation_ns: tuple[int, ...] = DEFAULT_NS
    ablation_mode: str = "zero"
    n_seeds: PositiveInt = 3
    control: str = "layer_matched"
    max_new_tokens: PositiveInt = 16
    batch_size: PositiveInt = 32
    steps: tuple[str, ...] = STEPS

    def __post_init__(self):
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise WorkbenchError(f"unknown steps {bad}; expected a subset of {STEPS}")
        if self.default_threshold not in self.thresholds:
            self.thresholds = tuple(sorted(set(self.thresholds) | {self.default_threshold}))


def _r(x, nd: int = 4):
    return None if x is None else round(float(x), nd)


def diff_in_means_last(model, harmful, benign, layer: int, store=None, batch_size: int = 32,
                       show_progress: bool = False) -> torch.Tensor:
    """``Float[Tensor, "d_model"]``: mean ``resid_pre`` of ``layer`` at the last position, harmful - benign
    (:func:`workbench.directions.diff_in_means` through the store, float64 means)."""
    from ..directions import candidate_directions

    return candidate_directions(model, harmful, benign, store=store, batch_size=batch_size, positions="last",
                                layers=[layer], show_progress=show_progress).vector(layer, -1).float()


def heldout_rows(model, data, cfg: SparsityConfig, show_progress: bool = False) -> tuple[list[dict], str]:
    """The held-out conversations of ``cfg.heldout_split`` (at most ``heldout_limit``) and where their replies come
    from: the data's ``reply`` field, else the model's own greedy replies (``heldout_reply_tokens`` tokens)."""
    rows = data.rows_of(cfg.heldout_split)
    with_reply = [r for r in rows if isinstance(r.get("reply"), str)]
    if with_reply:
        rows, source = with_reply, "the data's replies"
    else:
        from ..generation import generate

        rows = rows[: cfg.heldout_limit] if cfg.heldout_limit else rows
        replies = generate(model, [r["prompt"] for r in rows], max_new_tokens=cfg.heldout_reply_tokens,
                           batch_size=cfg.batch_size, show_progress=show_progress)
        rows = [{**r, "reply": rep} for r, rep in zip(rows, replies) if rep.strip()]
        source = f"the model's greedy replies ({cfg.heldout_reply_tokens} tokens)"
    if cfg.heldout_limit:
        rows = rows[: cfg.heldout_limit]
    if not rows:
        raise WorkbenchError(f"the prompt data ({data.source}) has no {cfg.heldout_split} conversations for the "
                             "held-out loss")
    return rows, source


def sparsity_report(model, data, config: SparsityConfig | None = None, direction=None, store=None,
                    show_progress: bool = True) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Run every sparsity analysis on ``data`` (a :class:`workbench.promptsets.PromptSets`).

    Args:
        direction: optional refusal direction (tensor or Direction artifact) for the direction step.

    Returns:
        ``(summary, tables)``: a JSON-able summary (per-layer sparsity at the default threshold, PPL-p%
        sparsity, differential-neuron halving count vs random, ...) and every DataFrame by name.
    """
    cfg = config or SparsityConfig()
    t0 = time.time()
    bs, sp = cfg.batch_size, show_progress
    n_layers = int(model.cfg.n_layers)
    data.require(cfg.stats_split, "harmful", "benign")
    data.require(cfg.calibration_split, "harmful", "benign")
    test = {c: data.prompts(cfg.stats_split, c, cfg.limit) for c in ("harmful", "benign", "jailbreak")
            if data.prompts(cfg.stats_split, c)}
    cal_h = data.prompts(cfg.calibration_split, "harmful", cfg.limit)
    cal_b = data.prompts(cfg.calibration_split, "benign", cfg.limit)
    held_rows, held_source = heldout_rows(model, data, cfg, sp)
    text = heldout_text(model.tokenizer, held_rows, scope=cfg.heldout_scope)
    summary: dict = {"model": (getattr(model, "_wb_source", None) or {}).get("name"), "d_mlp": int(model.cfg.d_mlp),
                     "n_layers": n_layers, "hook": "blocks.{l}.mlp.hook_post",
                     "n_prompts": {k: len(v) for k, v in test.items()}, "heldout_replies": held_source}
    tables: dict[str, pd.DataFrame] = {}
    timings = {}

    if "stats" in cfg.steps:
        t = time.time()
        cal = mlp_entry(model, cal_b, store=store, batch_size=bs, show_progress=sp)
        chess = channel_thresholds(cal, cfg.chess_quantile, show_progress=sp)
        tabs = sparsity_by_category(model, test, cfg.thresholds, cfg.default_threshold, chess, store=store,
                                    batch_size=bs, show_progress=sp)
        tables.update(sparsity=tabs.sparsity, activation_ratio=tabs.ratio, channel_sparsity=tabs.channel,
                      channel_thresholds=chess.to_frame())
        at = tabs.sparsity[tabs.sparsity["threshold"] == cfg.default_threshold]
        summary["default_threshold"] = cfg.default_threshold
        summary["sparsity_at_default_threshold"] = {
            c: {int(r.layer): _r(r.sparsity) for r in g.itertuples()} for c, g in at.groupby("category", sort=False)}
        summary["activation_ratio_mean"] = {
            c: {int(r.layer): _r(r.mean) for r in g.itertuples()} for c, g in tabs.ratio.groupby("category", sort=False)}
        summary["chess"] = {"quantile": cfg.chess_quantile, "calibration": f"{cfg.calibration_split}/benign",
                            "sparsity": {c: {int(r.layer): _r(r.sparsity) for r in g.itertuples()}
                                         for c, g in tabs.channel.groupby("category", sort=False)}}
        timings["stats"] = round(time.time() - t, 1)

    if "ppl" in cfg.steps:
        t = time.time()
        ppl = ppl_sparsity(model, text, cfg.p, scopes=None if cfg.ppl_per_layer else ["overall"],
                           criterion=cfg.criterion, weighting=cfg.weighting, tol=cfg.ppl_tol, batch_size=bs,
                           show_progress=sp)
        tables.update(ppl_result=ppl.result, ppl_curve=ppl.curve)
        summary["ppl"] = {
            "criterion": cfg.criterion, "weighting": cfg.weighting, "heldout": f"{cfg.heldout_split} ({len(held_rows)} "
            f"conversations, loss on {cfg.heldout_scope} tokens: {ppl.n_targets})", "base_loss": _r(ppl.base_loss, 5),
            **{f"p{pv:g}": {r.scope: {"threshold": _r(r.threshold, 6), "sparsity": _r(r.sparsity),
                                      "ppl_increase_pct": _r(r.ppl_increase_pct, 3),
                                      "loss_increase_pct": _r(r.loss_increase_pct, 3)}
                            for r in ppl.result[ppl.result["p"] == pv].itertuples()} for pv in cfg.p},
        }
        timings["ppl"] = round(time.time() - t, 1)

    if "topk" in cfg.steps:
        t = time.time()
        tk = topk_sweep(model, text, {"harmful": test["harmful"], "benign": test["benign"]}, cfg.topk,
                        cfg.topk_layers, cfg.max_new_tokens, bs, sp)
        tables["topk"] = tk
        summary["topk"] = {int(k): {r.metric: _r(r.value) for r in g.itertuples()
                                    if r.metric in ("loss", "ppl_increase_pct", "refusal_rate:harmful",
                                                    "refusal_rate:benign")}
                           for k, g in tk.groupby("k", sort=False)}
        timings["topk"] = round(time.time() - t, 1)

    if "neurons" in cfg.steps:
        t = time.time()
        rank = differential_neurons_for(model, cal_h, cal_b, positions=cfg.positions, pool=cfg.pool, store=store,
                                        batch_size=bs, show_progress=sp)
        benign_text = heldout_text(model.tokenizer, [r for r in held_rows if r["category"] == "benign"]
                                   or held_rows, scope=cfg.heldout_scope)
        ns = tuple(n for n in cfg.ablation_ns if n <= len(rank))
        abl = ablation_curve(model, rank, test["harmful"], benign_text, ns, cfg.ablation_mode, cfg.n_seeds,
                             cfg.control, max_new_tokens=cfg.max_new_tokens, batch_size=bs, show_progress=sp)
        tables.update(differential_neurons=rank, ablation_curve=abl.curve)
        top = rank.head(10)
        summary["differential_neurons"] = {
            "ranked_on": f"{cfg.calibration_split} harmful vs benign ({len(cal_h)}+{len(cal_b)}), "
                         f"positions={cfg.positions}, pool={cfg.pool}",
            "top": [{"layer": int(r.layer), "neuron": int(r.neuron), "cohens_d": _r(r.cohens_d, 3)} for r in top.itertuples()],
            "n_abs_d_above_1": int((rank["abs_d"] > 1).sum()),
            "halving": {k: (_r(v) if isinstance(v, float) else v) for k, v in abl.halving.items()},
        }
        timings["neurons"] = round(time.time() - t, 1)

    if "direction" in cfg.steps:
        t = time.time()
        dirs = {}
        from ..organism import ground_truth_of

        truth = ground_truth_of(model)
        gt = (truth[1], truth[0]) if truth is not None else None  # (vector, layer)
        if direction is not None:
            dirs["given"] = (as_vector(direction, d_model=int(model.cfg.d_model)).float(),
                             getattr(direction, "layer", None))
        else:
            if gt is not None:
                dirs["ground_truth"] = gt
            layer = min(gt[1] + 1, n_layers - 1) if gt is not None and gt[1] is not None else n_layers // 2
            dirs["diff_in_means"] = (diff_in_means_last(model, cal_h, cal_b, layer, store, bs, sp), layer)
        out = {}
        for name, (vec, layer) in dirs.items():
            ds = direction_sparsity(vec).assign(direction=name)
            al = direction_alignment(model, vec)
            tables[f"direction_sparsity_{name}"] = ds
            tables[f"direction_alignment_{name}"] = al.by_layer.assign(direction=name)
            tables[f"direction_alignment_top_{name}"] = al.top.assign(direction=name)
            share = {int(r.k): _r(r.share) for r in ds.itertuples() if r.k in (1, 4, 16, 64)}
            rshare = {int(r.k): _r(r.random_share) for r in ds.itertuples() if r.k in (1, 4, 16, 64)}
            out[name] = {"layer": layer, "norm": _r(vec.norm(), 3), "top_k_share": share, "random_top_k_share": rshare,
                         "participation_ratio": _r(ds["participation_ratio"].iloc[0], 2), "d_model": int(vec.shape[0]),
                         "alignment": {int(r.layer): {"max_abs_cos": _r(r.max_abs_cos), "top_neuron": int(r.top_neuron),
                                                      "random_max_abs_cos": _r(r.random_max_abs_cos)}
                                       for r in al.by_layer.itertuples()}}
            if "differential_neurons" in tables:
                rk = tables["differential_neurons"]
                cos = {l: neuron_cosines(model, vec, l) for l in sorted(set(rk["layer"].head(50)))}
                top50 = rk.head(50)
                c = [float(cos[l][i]) for l, i in zip(top50["layer"], top50["neuron"])]
                out[name]["top50_differential_mean_abs_cos"] = _r(sum(abs(x) for x in c) / len(c))
        summary["direction"] = out
        timings["direction"] = round(time.time() - t, 1)

    summary = {"headline": _headline(summary, cfg), **summary}
    summary["seconds"] = {**timings, "total": round(time.time() - t0, 1)}
    summary["config"] = asdict(cfg)
    return summary, tables


def _headline(summary: dict, cfg: SparsityConfig) -> dict:
    """The three numbers issue 7 asks for, gathered from the full summary."""
    out: dict = {}
    if "sparsity_at_default_threshold" in summary:
        out[f"sparsity_at_threshold_{cfg.default_threshold:g}"] = summary["sparsity_at_default_threshold"]
    if "ppl" in summary and 1.0 in cfg.p:
        p1 = summary["ppl"]["p1"]
        out["ppl1_sparsity"] = {k: v["sparsity"] for k, v in p1.items()}
        out["ppl1_threshold"] = {k: v["threshold"] for k, v in p1.items()}
    if "differential_neurons" in summary:
        h = summary["differential_neurons"]["halving"]
        out["halving"] = {k: h.get(k) for k in ("n_halving", "base_refusal_rate", "differential_refusal_rate",
                                               "random_refusal_rate", "mode", "control")}
    return out


class SparsityStage(Stage):
    name = "sparsity"
    config_class = SparsityConfig
    reads = {"directions": ("direction.safetensors", "direction.json")}

    def run(self, model, data, store, config: SparsityConfig, inputs, show_progress: bool = True) -> Result:
        direction = None
        if "directions" in inputs:
            from ..directions import Direction

            direction = Direction.load(inputs["directions"] / "direction", model=model)
        summary, tables = sparsity_report(model, data, config, direction=direction, store=store,
                                          show_progress=show_progress)
        return Result(summary, tables)

    def figures(self, result: Result):
        from .. import plots

        t, figs = result.tables, []
        if "sparsity" in t:
            figs.append(("sparsity_by_layer", "MLP activation sparsity per layer",
                         plots.sparsity_by_layer(t["sparsity"], threshold=result.summary.get("default_threshold"))))
        if "ppl_curve" in t:
            figs.append(("ppl_sparsity", "PPL-p% sparsity", plots.ppl_sparsity_curve(t["ppl_curve"])))
        if "ablation_curve" in t:
            figs.append(("neuron_ablation", "Differential vs random neuron ablation",
                         plots.neuron_ablation_curve(t["ablation_curve"])))
        return figs

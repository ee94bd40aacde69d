"""The steering stage: every steering method trained on train, its operating point picked on val, all evaluated
on test (:func:`workbench.steering.compare.compare_methods`; WAS: Guiding Giants, arXiv 2505.20309).

Reads the directions stage's ``direction`` (required) and the prompt data (the standard categories
:data:`workbench.vocab.CATEGORIES` present in it). Writes ``steering.json`` (= ``summary.json``: per-method
rates with Wilson 95 % intervals and n, the paired McNemar tests against ``none`` and ``was_e2e``, the mean and
spread over ``seeds`` when several are given, operating points, the direction and the config),
``steering_generations.jsonl`` (every reply, judged), ``alpha_curves.csv`` and one saved controller per trained method under ``controllers/<method>``, at the
operating point picked on val.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..errors import WorkbenchError
from ..steering.compare import CompareConfig, compare_seeds
from .base import Result, Stage

GENERATIONS = "steering_generations.jsonl"
#: every reply on the data's held-out family (when it has one)
HELDOUT_GENERATIONS = "steering_heldout_generations.jsonl"

#: the steering stage's config (defaults of ``workbench controller eval`` and ``workbench run``)
SteeringConfig = CompareConfig


@dataclass
class SteeringResult(Result):
    """Summary, the per-prompt generations and alpha curves, the trained controllers (with their directions)."""

    compare: dict | None = None   # compare_methods' in-memory output of a fresh run

    def save(self, out_dir):
        from ..steering.controller import save_controller

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.compare is not None:
            res = self.compare
            for name, ctrl in res["controllers"].items():   # each at its operating point (cfg.alpha, picked on val)
                save_controller(ctrl, res["controller_directions"][name], out / "controllers" / name)
            pd.concat(list(res["tables"].values())).to_json(out / GENERATIONS, orient="records", lines=True)
            if res.get("heldout_tables"):
                pd.concat(list(res["heldout_tables"].values())).to_json(out / HELDOUT_GENERATIONS,
                                                                         orient="records", lines=True)
            res["curves"].to_csv(out / "alpha_curves.csv", index=False)
        (out / "steering.json").write_text(json.dumps(self.summary, indent=2, default=str))
        return Result(self.summary).save(out)

    @classmethod
    def load(cls, out_dir, **_):
        base = Result.load(out_dir)
        path = Path(out_dir) / GENERATIONS
        if path.exists():
            base.tables["generations"] = pd.read_json(path, orient="records", lines=True)
        return cls(base.summary, base.tables)


def run_comparison(model, direction, data, cc: CompareConfig | None = None,
                   show_progress: bool = True, store=None) -> SteeringResult:
    """Train and evaluate every method of ``cc.methods`` along ``direction`` (a Direction with a layer) on
    ``data``'s standard categories (once per seed of ``cc.seeds``, :func:`~workbench.steering.compare.compare_seeds`);
    the controllers' training inputs come from ``store`` when given."""
    from ..data import CATEGORIES

    cc = cc or CompareConfig()
    if direction.layer is None:
        raise WorkbenchError("the steering direction needs a layer (a Direction from find_refusal_direction)")
    if direction.vector.ndim != 1:
        raise WorkbenchError(f"the steering direction must be one vector, got shape {tuple(direction.vector.shape)}")
    alpha_unit = float(direction.vector.float().norm())
    for split in ("train", "val", "test"):
        data.require(split, "harmful", "benign")
    splits = {s: data.split(s, CATEGORIES) for s in ("train", "val", "test")}
    res = compare_seeds(model, direction, int(direction.layer), splits["train"], splits["val"], splits["test"],
                        alpha_unit=alpha_unit, cc=cc, show_progress=show_progress, store=store,
                        heldout=data.heldout_sets(CATEGORIES) or None)
    summary = {"methods": res["methods"], "paired": res["paired"], "choices": res["choices"],
               "heldout": ({"families": data.heldout_families(), "paired": res["heldout_paired"]}
                           if "heldout_tables" in res else None),
               "direction": {"layer": direction.layer, "position": direction.position, "method": direction.method,
                             "alpha_unit": round(alpha_unit, 4)},
               "config": asdict(cc)}
    if "seeds" in res:
        summary["seeds"] = res["seeds"]
    return SteeringResult(summary, {}, res)


class SteeringStage(Stage):
    name = "steering"
    config_class = CompareConfig
    result_class = SteeringResult
    reads = {"directions": ("direction.safetensors", "direction.json")}
    requires = ("directions",)

    def run(self, model, data, store, config: CompareConfig, inputs, show_progress: bool = True):
        from ..directions import Direction

        direction = Direction.load(inputs["directions"] / "direction", model=model)
        return run_comparison(model, direction, data, config, show_progress, store=store)

    def figures(self, result: SteeringResult):
        from .. import plots

        res = result.compare
        if res is None:
            return []
        figs = [
            ("refusal_rates", "Refusal rate by method and split (test)", plots.refusal_rate_bars(res)),
            ("controller_weights", "WAS effective steering s·w_l per prompt (prompts x layers)",
             plots.controller_weights_heatmap(res["tables"], method="was_e2e", value="s*w")),
            ("controller_weights_mean", "Mean effective steering s·w_l per category",
             plots.controller_weights_by_category(res["tables"], method="was_e2e", value="s*w")),
            ("scale_distribution", "Controller scale s by category",
             plots.scale_distribution(res["tables"], method="was_e2e")),
        ]
        if len(res["curves"]):
            figs.append(("alpha_tradeoff", "Alpha trade-off: refusal vs false refusal (validation)",
                         plots.alpha_tradeoff(res["curves"], points=res)))
        figs.append(("example_generations", "Example generations with and without steering",
                     plots.generations_table(res["tables"])))
        return figs

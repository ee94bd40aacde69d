"""``workbench evaluate``: greedy replies per prompt set, judged for refusal, optionally under an intervention
(a saved direction ablated or added, or a saved WAS controller)."""

from __future__ import annotations

import argparse

from ..errors import WorkbenchError


def _prompt_data(a: argparse.Namespace, split: str):
    """The :class:`PromptSets` to evaluate: ``--dataset`` sources (benchmarks, files, hub ids; all put in the
    evaluated ``split``) or ``--data``."""
    from ..promptsets import PromptSets, load_data

    if not a.dataset:
        return load_data(a.data).limited(a.limit)
    from ..datasets import prompt_sets

    cats = a.category or []
    if cats and len(cats) != len(a.dataset):
        raise WorkbenchError(f"{len(a.dataset)} --dataset but {len(cats)} --category; give one per dataset or none")
    sets: dict = {}
    for i, src in enumerate(a.dataset):
        sets.update(prompt_sets(src, column=a.column, category=cats[i] if cats else None, limit=a.limit,
                                split=a.dataset_split))
    rows = [{"prompt": p, "category": c, "split": split} for c, ps in sets.items() for p in ps]
    return PromptSets.from_rows(rows, ", ".join(a.dataset))


def _intervention(a: argparse.Namespace, model) -> dict:
    """``{"plan": ..., "fwd_hooks": ..., "intervention": description}`` of --direction/--intervention/--controller."""
    if a.controller:
        from ..steering.controller import load_controller
        from ..steering.steer import controller_plan

        if a.direction or a.intervention:
            raise WorkbenchError("--controller steers by itself; give it without --direction/--intervention")
        ctrl, direction = load_controller(a.controller, model=model)
        return {"plan": controller_plan(ctrl, direction, "controller"),
                "intervention": {"controller": a.controller, "alpha": ctrl.cfg.alpha}}
    if a.intervention and not a.direction:
        raise WorkbenchError(f"--intervention {a.intervention} needs --direction (a saved Direction)")
    if not a.direction:
        return {}
    from ..directions import Direction, ablation_hooks, actadd_hooks

    d = Direction.load(a.direction, model=model)
    kind = a.intervention or "ablate"
    hooks = ablation_hooks(model, d) if kind == "ablate" else actadd_hooks(model, d, layers=d.layer, coefficient=a.coeff)
    return {"fwd_hooks": hooks, "intervention": {"direction": a.direction, "kind": kind, "layer": d.layer,
                                                 **({"coeff": a.coeff} if kind == "actadd" else {})}}


def cmd_rejudge(a: argparse.Namespace) -> dict:
    import pandas as pd

    from ..evaluate import rejudge
    from ..stages import EvaluateConfig
    from .options import config_from_args

    try:
        table = pd.read_json(a.rejudge, orient="records", lines=True)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"cannot read the generations file {a.rejudge!r}: {exc}") from exc
    return {"file": a.rejudge, **rejudge(table, config_from_args(EvaluateConfig, a).judge or "decline")}


def cmd_evaluate(a: argparse.Namespace) -> dict:
    if a.rejudge:
        return cmd_rejudge(a)
    from ..models import load_model
    from ..stages import STAGES, EvaluateConfig
    from .options import config_from_args

    cfg = config_from_args(EvaluateConfig, a)
    data = _prompt_data(a, cfg.split)
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    steer = _intervention(a, model)
    if a.with_base and "intervention" not in steer:
        raise WorkbenchError("--with-base compares the unsteered model with a steered one: give --controller or "
                             "--direction")
    result = STAGES["evaluate"].run(model, data, None, cfg, {}, show_progress=not a.quiet,
                                    plan=steer.get("plan"), fwd_hooks=steer.get("fwd_hooks", ()))
    source = {"datasets": a.dataset} if a.dataset else {"data": data.source}
    out = {"model": a.model, **source, **result.summary}
    if "intervention" in steer:
        out["intervention"] = steer["intervention"]
    if a.with_base:
        from ..evaluate import Evaluation, paired_refusals

        base = STAGES["evaluate"].run(model, data, None, cfg, {}, show_progress=not a.quiet)
        out["base"] = {k: base.summary[k] for k in ("refusal_rate", "refusal_ci", "refusal_score", "n")}
        out["paired_vs_base"] = paired_refusals(Evaluation(base.tables["generations"]),
                                                Evaluation(result.tables["generations"]))
    if a.save:
        result.tables["generations"].to_json(a.save, orient="records", lines=True)
    if a.out:
        out["saved_to"] = str(result.save(a.out))
    return out


def register(sub, bench_sub) -> None:
    from ..stages import EvaluateConfig
    from . import add_common_args, add_data_args
    from .options import add_config_options

    p = sub.add_parser("evaluate", help="greedy replies per prompt set, judged for refusal (optionally steered)")
    add_common_args(p)
    add_data_args(p)
    add_config_options(p, EvaluateConfig)
    p.add_argument("--save", default=None, help="write per-prompt replies to this JSONL file")
    p.add_argument("--out", default=None, help="save the result (summary.json, generations.jsonl) under this directory")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME_OR_PATH",
                   help="evaluate these prompts instead of --data (repeatable): a benchmark name "
                        "(advbench, toxicchat, jailbreak, alpaca, xstest), NAME=FILE for a local copy, a "
                        "CSV/JSON/JSONL/Parquet file (its category column kept) or a hub dataset id")
    p.add_argument("--column", default=None, help="prompt column of --dataset (default: the dataset's own)")
    p.add_argument("--category", action="append", default=None,
                   help="category name for each --dataset (default: benchmark name, file categories or file stem)")
    p.add_argument("--dataset-split", default=None, help="hub split of --dataset (default: the benchmark's own)")
    p.add_argument("--direction", default=None, help="a saved Direction to apply (see --intervention)")
    p.add_argument("--intervention", choices=["ablate", "actadd"], default=None,
                   help="with --direction: ablate it everywhere (default) or add it at its layer")
    p.add_argument("--coeff", type=float, default=1.0, help="actadd coefficient (multiples of the direction)")
    p.add_argument("--controller", default=None, help="a saved WAS controller directory to steer with")
    p.add_argument("--with-base", action="store_true",
                   help="with --controller/--direction: also evaluate the unsteered model on the same prompts (same "
                        "chat template, same decoding) and report both with an exact McNemar test per category")
    p.add_argument("--rejudge", default=None, metavar="FILE",
                   help="judge the replies of a saved generations JSONL (an evaluation's or a steering run's) again "
                        "with --judge (default: decline) and print the rates per method and category; no model is run")
    p.set_defaults(func=cmd_evaluate)

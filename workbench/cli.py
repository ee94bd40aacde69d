"""The ``workbench`` command line: thin commands over the public API.

Every command has ``--help``; long work shows progress bars unless ``--quiet``; ``--json`` prints the
result as JSON on stdout (logs and bars go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import WorkbenchError
from .models import DEFAULT_MODEL


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default=DEFAULT_MODEL, help="'organism' (default), a local HF directory or a hub name")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


def cmd_evaluate(a: argparse.Namespace) -> dict:
    from .data import CATEGORIES, organism_splits
    from .models import load_model
    from .parallel import evaluate_distributed

    if a.dataset:
        from .datasets import prompt_sets

        cats = a.category or []
        if cats and len(cats) != len(a.dataset):
            raise WorkbenchError(f"{len(a.dataset)} --dataset but {len(cats)} --category; give one per dataset or none")
        sets: dict = {}
        for i, src in enumerate(a.dataset):
            got = prompt_sets(src, column=a.column, category=cats[i] if cats else None, limit=a.limit,
                              split=a.dataset_split)
            sets.update(got)
    else:
        sets = organism_splits(a.split, CATEGORIES, limit=a.limit)
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    # under torchrun the prompts are sharded over the ranks (one process: plain evaluate_refusal)
    ev = evaluate_distributed(model, sets, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                              show_progress=not a.quiet, judge=a.judge)
    source = {"datasets": a.dataset, "judge": ev.table.attrs.get("judge")} if a.dataset else {"split": a.split}
    out = {"model": a.model, **source, **ev.summary()}
    if a.save:
        ev.table.to_json(a.save, orient="records", lines=True)
    return out


def cmd_organism_build(a: argparse.Namespace) -> dict:
    from .organism.build import main_build

    return main_build(seed=a.seed, out_dir=a.out, quiet=a.quiet)


def cmd_run(a: argparse.Namespace) -> dict:
    """The main job (see :mod:`workbench.pipeline`)."""
    from .pipeline import STAGES, RunConfig, run_main_job

    stages = tuple(x.strip() for x in a.stages.split(",")) if a.stages else STAGES
    cfg = RunConfig(model=a.model, out_dir=a.out, device=a.device, dtype=a.dtype, store=a.store, stages=stages,
                    png=not a.no_png, e2e_steps=a.e2e_steps, limit=a.limit, force=a.force,
                    show_progress=not a.quiet)
    summary = run_main_job(cfg)
    if a.publish:
        from .report import publish_run

        publish_run(a.out, a.publish)
    if a.json:
        return summary
    brief = {"out": a.out, "seconds": summary["seconds"]}
    if "steering" in summary:
        brief["steering"] = {m: r["refusal_rate"] for m, r in summary["steering"]["methods"].items()}
    if "directions" in summary:
        brief["directions"] = {k: summary["directions"].get(k) for k in ("selected", "cos_ground_truth", "refusal_rate")}
    brief["report"] = f"{a.out}/report.html"
    return brief


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="greedy replies per prompt split, judged for refusal")
    _common(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--save", default=None, help="write per-prompt replies to this JSONL file")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME_OR_PATH",
                   help="evaluate these prompts instead of the organism split (repeatable): a benchmark name "
                        "(advbench, toxicchat, jailbreak, alpaca, xstest), NAME=FILE for a local copy, a "
                        "CSV/JSON/JSONL/Parquet file or a hub dataset id")
    p.add_argument("--column", default=None, help="prompt column of --dataset (default: the dataset's own)")
    p.add_argument("--category", action="append", default=None,
                   help="category name for each --dataset (default: benchmark name or file stem)")
    p.add_argument("--dataset-split", default=None, help="hub split of --dataset (default: the benchmark's own)")
    p.add_argument("--judge", default="substring",
                   help="'substring' (default) or hf:DIR for a local sequence-classification judge")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("organism", help="the embedded model organism")
    osub = p.add_subparsers(dest="organism_command", required=True)
    b = osub.add_parser("build", help="generate the corpus and train the organism (deterministic from --seed)")
    _common(b, model=False)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="workbench/organism/data", help="output directory")
    b.set_defaults(func=cmd_organism_build)

    p = sub.add_parser("run", help="the main job on one model: every analysis, figures and a report")
    _common(p)
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--stages", default=None, help="comma-separated subset of evaluate,directions,patching,sparsity,steering")
    p.add_argument("--store", default=None, help="activation store root (default $WORKBENCH_CACHE or ~/.cache/workbench)")
    p.add_argument("--e2e-steps", type=int, default=600, help="end-to-end controller training steps")
    p.add_argument("--no-png", action="store_true", help="HTML figures only")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many prompts per category and split in every stage (a quick run)")
    p.add_argument("--force", action="store_true",
                   help="recompute every stage (default: reuse the stages a previous run into --out finished with "
                        "the same model, configuration and workbench code)")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="also copy the figures, report and small data tables to DIR (e.g. figures/)")
    p.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="ratio benchmarks against peers, measured in one process")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for register in _registrars():
        register(sub, bench_sub)
    return parser


#: Modules that add their own commands: each defines ``register(sub, bench_sub)`` which adds parsers to the
#: top-level subparsers ``sub`` and to the ``workbench bench ...`` subparsers ``bench_sub``. Use
#: :func:`add_common_args` for --model/--device/--dtype/--quiet/--json. One line per analysis module.
COMMAND_MODULES: list[str] = [
    "workbench.commands_cache",
    "workbench.commands_directions",
    "workbench.commands_patching",
    "workbench.commands_steering",
    "workbench.commands_sparsity",
    "workbench.commands_doctor",
]


def _registrars():
    import importlib

    for name in COMMAND_MODULES:
        yield importlib.import_module(name).register


add_common_args = _common
emit = _emit


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .fallbacks import recording_fallbacks

    try:
        with recording_fallbacks() as fallbacks:
            result = args.func(args)
    except WorkbenchError as exc:
        print(f"workbench: error: {exc}", file=sys.stderr)
        return 2
    if fallbacks and isinstance(result, dict):  # every fallback also reaches the JSON, not only the log
        result.setdefault("fallbacks", fallbacks)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints
        _emit(result, args.json)
    # a command reporting checks (``workbench doctor``) says ``"ok": false`` when one failed: exit status 1
    return 1 if isinstance(result, dict) and result.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())

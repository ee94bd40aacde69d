"""``workbench run``: the main job (see :mod:`workbench.pipeline`); every option comes from
:class:`workbench.pipeline.RunConfig` and its stage configs (``--steering.e2e-steps 300``,
``--directions.kl-threshold 0.2`` ...), or from a saved ``config.json`` (``--config``)."""

from __future__ import annotations

import argparse
import dataclasses


def cmd_run(a: argparse.Namespace) -> dict:
    from ..pipeline import RunConfig, rebuild_report, run_main_job
    from .options import config_from_args

    if a.side_by_side:
        from ..side_by_side import side_by_side

        labels = a.labels.split(",") if a.labels else [str(d).rstrip("/").rsplit("/", 1)[-1] for d in a.side_by_side]
        if len(labels) != len(a.side_by_side):
            from ..errors import WorkbenchError

            raise WorkbenchError(f"--labels names {len(labels)} runs, --side-by-side gives {len(a.side_by_side)}")
        table = "\n".join(side_by_side(dict(zip(labels, a.side_by_side))))
        if not a.json:
            print(table)
            return {}
        return {"markdown": table}
    if a.report_only:
        out = a.out or (RunConfig.load(a.config).out_dir if a.config else RunConfig().out_dir)
        summary = rebuild_report(out)
        if a.publish:
            from ..report import publish_run

            publish_run(out, a.publish)
        return summary if a.json else {"out": out, "stages": summary["earlier"], "report": f"{out}/report.html"}
    base = RunConfig.load(a.config) if a.config else RunConfig()
    cfg = config_from_args(RunConfig, a, base=base)
    overrides = {k: v for k, v in (("model", a.model), ("device", a.device), ("dtype", a.dtype),
                                    ("out_dir", a.out)) if v is not None}
    cfg = dataclasses.replace(cfg, show_progress=not a.quiet, **overrides)
    summary = run_main_job(cfg)
    if a.publish:
        from ..report import publish_run

        publish_run(cfg.out_dir, a.publish)
    if a.json:
        return summary
    brief = {"out": cfg.out_dir, "data": summary.get("data"), "seconds": summary["seconds"],
             "reused": summary.get("reused")}
    if "steering" in summary:
        brief["steering"] = {m: r["refusal_rate"] for m, r in summary["steering"]["methods"].items()}
    if "directions" in summary:
        brief["directions"] = {k: summary["directions"].get(k) for k in ("selected", "cos_ground_truth", "refusal_rate")}
    brief["report"] = f"{cfg.out_dir}/report.html"
    return brief


def register(sub, bench_sub) -> None:
    from ..pipeline import STAGES, RunConfig
    from .options import add_config_options

    p = sub.add_parser("run", help="the main job on one model and prompt data: every analysis, figures and a report")
    p.add_argument("--model", default=None, help="'organism' (default), a local HF directory or a hub name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    p.add_argument("--out", default=None, help="output directory (default: runs/latest)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="start from a saved run configuration (a run's config.json); options given override it")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="also copy the figures, report and small data tables to DIR (e.g. figures/)")
    p.add_argument("--side-by-side", nargs="+", default=None, metavar="DIR",
                   help="print one Markdown table of the key numbers of these finished run directories (nothing run)")
    p.add_argument("--labels", default=None, help="comma-separated column names for --side-by-side")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild summary.json and the report of --out from the stages it holds (nothing recomputed)")
    add_config_options(p, RunConfig, skip=("model", "device", "dtype", "out_dir", "show_progress") + STAGES)
    for stage in STAGES:
        cls = type(getattr(RunConfig(), stage))
        add_config_options(p, cls, prefix=f"{stage}.", group=f"{stage} stage")
    p.set_defaults(func=cmd_run)

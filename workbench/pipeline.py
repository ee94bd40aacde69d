"""The main job behind ``workbench run``: the stages of :mod:`workbench.stages` in a loop, then figures and report.

Every stage runs on the model, the prompt data (``--data``: :func:`workbench.promptsets.load_data`), the one
activation store and the artifact directories of the stages it reads; it writes its artifacts under
``out_dir/<stage>/``, adds a block to ``summary.json`` and draws its figures into ``out_dir/figures/`` (HTML,
offline, and PNG); ``report.md`` and ``report.html`` tie them together.

Two levels of reuse: the activation store serves any run on the same model and prompts (cached activations are
never recomputed), and a finished stage leaves ``out_dir/<stage>/stage.json`` with a key over the stage's own
config, the model fingerprint and dtype, the data's content hash, the sha256 of every upstream artifact the stage
reads, the workbench source and the runtime versions (python, torch, transformers, transformer-lens, workbench).
A second run into the same ``out_dir`` with the same key reuses that stage instead of recomputing it
(``force=True`` / ``--force`` recomputes); changing one stage's config recomputes that stage and the stages that
read its artifacts, nothing else.

``summary.json`` records the software that produced it (``"versions"``: :func:`workbench.provenance.versions`,
git commit included), the data (``"data"``: source, hash, counts) and every fallback taken (``"fallbacks"``: see
:mod:`workbench.fallbacks`); each ``stage.json`` keeps its stage's fallbacks, so a reused stage still reports them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .configs import PositiveInt, from_dict, to_dict
from .errors import WorkbenchError
from .fallbacks import recording_fallbacks
from .provenance import runtime_versions, versions
from .stages import STAGES as STAGE_REGISTRY
from .stages import DirectionsConfig, EvaluateConfig, PatchingConfig, SparsityConfig, SteeringConfig

STAGES = tuple(STAGE_REGISTRY)


@dataclass
class RunConfig:
    """One main-job run; saved as ``config.json`` (``workbench run --config config.json`` repeats it)."""

    #: 'organism', a local Hugging Face directory or a hub id
    model: str = "organism"
    #: prompt data: 'organism' or a prompt file (JSONL/CSV/... with prompt, category[, split, reply])
    data: str = "organism"
    #: output directory of the run
    out_dir: str = "runs/latest"
    #: cpu, cuda, cuda:1 ... (default: cuda when available)
    device: str | None = None
    #: float32 (default), bfloat16, float16
    dtype: str | None = None
    #: activation store directory (default: the user cache)
    store: str | None = None
    #: the stages to run, in order
    stages: tuple[str, ...] = STAGES
    #: draw figures
    figures: bool = True
    #: also write PNGs next to the HTML figures
    png: bool = True
    #: at most this many prompts per category and split in every stage, and this many held-out conversations in
    #: the sparsity stage (a quick run)
    limit: PositiveInt | None = None
    #: recompute every stage even when out_dir holds a finished one with the same key
    force: bool = False
    show_progress: bool = True
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)

    def stage_config(self, stage: str):
        """The config of ``stage`` as this run applies it (``limit`` also caps sparsity's held-out set)."""
        config = getattr(self, stage)
        if stage == "sparsity" and self.limit is not None:
            cap = min(self.limit, config.heldout_limit or self.limit)
            config = dataclasses.replace(config, heldout_limit=cap)
        return config

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A run configuration from a ``config.json`` (as a run writes it)."""
        path = Path(path)
        try:
            return from_dict(cls, json.loads(path.read_text()), f"{path}")
        except (OSError, json.JSONDecodeError) as exc:
            raise WorkbenchError(f"cannot read the run configuration {str(path)!r}: {exc}") from exc


def source_hash() -> str:
    """sha256 over the workbench package's Python sources (a stage record from other code is not reused)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_key(stage: str, config, model_fp: str, data_hash: str, inputs: dict[str, str], code: str,
              dtype: str | None = None, device: str | None = None) -> str:
    """Reuse key of a stage: its own config, the model fingerprint (and dtype, device), the data hash, the sha256
    of each upstream artifact it reads (``inputs``: ``{"directions/direction.json": sha256}``), the workbench
    source hash and the runtime versions (:func:`workbench.provenance.runtime_versions`; the git commit is left
    out, ``code`` covers it)."""
    blob = json.dumps({"stage": stage, "config": to_dict(config), "model": model_fp, "dtype": dtype,
                       "device": device, "data": data_hash, "inputs": inputs, "code": code,
                       "versions": runtime_versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Run:
    cfg: RunConfig
    out: Path
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (stage, title, html path)

    def save_figures(self, stage: str, figs) -> list[tuple[str, str, Path]]:
        from .plots import save_figure

        formats = ("html", "png") if self.cfg.png else ("html",)
        added = []
        for name, title, fig in figs:
            paths = save_figure(fig, self.out / "figures" / name, formats=formats)
            added.append((stage, title, Path(paths["html"])))
        self.figures.extend(added)
        return added


def stage_inputs(out: Path, stage, planned: tuple[str, ...]) -> tuple[dict[str, Path], dict[str, str]]:
    """The upstream artifact directories ``stage`` reads under ``out`` and the sha256 of their files; a missing
    required upstream is an error naming the stage to run first."""
    dirs, hashes = {}, {}
    for up, files in stage.reads.items():
        paths = [out / up / f for f in files]
        if all(p.exists() for p in paths):
            dirs[up] = out / up
            hashes.update({f"{up}/{p.name}": file_sha256(p) for p in paths})
        elif up in stage.requires:
            raise WorkbenchError(f"the {stage.name} stage reads the {up} stage's artifacts ({', '.join(files)}), "
                                 f"which {str(out / up)!r} does not hold; run the {up} stage first (add it to "
                                 f"the stages: {','.join(dict.fromkeys((up,) + planned))})")
    return dirs, hashes


def _finished_record(out: Path, stage: str) -> dict | None:
    """The ``stage.json`` record of a finished stage under ``out`` whose figures all exist, else ``None``."""
    rec_path = out / stage / "stage.json"
    if not rec_path.exists():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkbenchError(f"cannot read the stage record {str(rec_path)!r}: {exc}; delete it to recompute the "
                             f"{stage} stage") from exc
    if not all((out / p).exists() for _, _, p in rec.get("figures", [])):
        return None
    return rec


def earlier_stages(out: Path, skip, summary: dict, figures: list) -> list[str]:
    """Add the stages finished in ``out`` by an earlier run, other than ``skip`` (those this run ran), to
    ``summary`` (their block, seconds and fallbacks) and ``figures``, so the directory's report covers every stage
    it holds; returns their names. Each record is shown as it is: it keeps the key of the run that made it."""
    kept = []
    for name in STAGES:
        rec = None if name in skip else _finished_record(out, name)
        if rec is None:
            continue
        summary[name] = rec["summary"]
        if rec.get("seconds") is not None:
            summary.setdefault("seconds", {})[name] = rec["seconds"]
        summary.setdefault("fallbacks", []).extend(rec.get("fallbacks", []))
        figures.extend((s, t, out / p) for s, t, p in rec.get("figures", []))
        kept.append(name)
    return kept


def rebuild_report(out_dir: str | Path) -> dict:
    """Rewrite ``summary.json``, ``report.md`` and ``report.html`` of a run directory from the records of the stages
    it holds (``workbench run --report-only``): no model is loaded and nothing is recomputed. The model, data and
    versions come from the directory's ``summary.json``."""
    from .report import write_report

    out = Path(out_dir)
    path = out / "summary.json"
    if not path.exists():
        raise WorkbenchError(f"{str(out)!r} holds no summary.json: not a run directory (run `workbench run` first)")
    old = json.loads(path.read_text())
    summary = {k: old[k] for k in ("model", "data", "versions") if k in old}
    summary["seconds"] = {k: v for k, v in old.get("seconds", {}).items() if k not in STAGES}
    figures: list = []
    summary["earlier"] = earlier_stages(out, (), summary, figures)
    if not summary["earlier"]:
        raise WorkbenchError(f"{str(out)!r} holds no finished stage (no <stage>/stage.json)")
    path.write_text(json.dumps(summary, indent=2, default=str))
    write_report(summary, figures, out)
    return summary


def _reuse(run: _Run, stage: str, key: str) -> dict | None:
    """The ``stage.json`` record of a finished stage with this key (its figures re-registered), else ``None``."""
    rec = None if run.cfg.force else _finished_record(run.out, stage)
    if rec is None or rec.get("key") != key:
        return None
    run.figures.extend((s, t, run.out / p) for s, t, p in rec.get("figures", []))
    return rec


def run_main_job(cfg: RunConfig) -> dict:
    """Run every stage of ``cfg.stages`` in order; returns the summary (also written to ``summary.json``).

    A stage finished by an earlier run into the same ``out_dir`` with the same key (see :func:`stage_key`) is
    reused, not recomputed, unless ``cfg.force``; ``summary["reused"]`` lists them. The summary records
    ``"versions"`` (:func:`workbench.provenance.versions`), ``"data"`` and ``"fallbacks"`` (every fallback of the
    run, those recorded by reused stages included).
    """
    from . import models
    from .promptsets import load_data
    from .store import ActivationStore

    unknown = [s for s in cfg.stages if s not in STAGE_REGISTRY]
    if unknown:
        raise WorkbenchError(f"unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    out = Path(cfg.out_dir)
    data = load_data(cfg.data).limited(cfg.limit)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    t0 = time.time()
    run = _Run(cfg, out)
    summary: dict = {}
    with recording_fallbacks() as fallbacks:
        model = models.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        store = ActivationStore(cfg.store)
        summary.update(model=cfg.model, data=data.describe(), versions=versions(), fallbacks=fallbacks)
        timings = {"load_model": round(time.time() - t0, 1)}
        model_fp, code = models.fingerprint(model), source_hash()
        reused = []
        for name in cfg.stages:
            t = time.time()
            stage, config = STAGE_REGISTRY[name], cfg.stage_config(name)
            inputs, hashes = stage_inputs(out, stage, cfg.stages)
            key = stage_key(name, config, model_fp, data.hash, hashes, code, cfg.dtype, cfg.device)
            rec = _reuse(run, name, key)
            if rec is not None:
                reused.append(name)
                fallbacks.extend(rec.get("fallbacks", []))
            else:
                n_fallbacks = len(fallbacks)
                result = stage.run(model, data, store, config, inputs, show_progress=cfg.show_progress)
                result.save(out / name)
                figs = run.save_figures(name, stage.figures(result)) if cfg.figures else []
                rec = {"key": key, "summary": result.summary,
                       "figures": [(s, ti, str(p.relative_to(out))) for s, ti, p in figs],
                       "fallbacks": fallbacks[n_fallbacks:], "seconds": round(time.time() - t, 1)}
                (out / name / "stage.json").write_text(json.dumps(rec, indent=2, default=str))
            summary[name] = rec["summary"]
            timings[name] = round(time.time() - t, 1)
            (out / "summary.json").write_text(json.dumps({**summary, "seconds": timings}, indent=2, default=str))
    timings["total"] = round(time.time() - t0, 1)
    summary["seconds"] = timings
    summary["reused"] = reused
    summary["earlier"] = earlier_stages(out, cfg.stages, summary, run.figures)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from .report import write_report

    write_report(summary, run.figures, out)
    return summary

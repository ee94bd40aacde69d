"""The main job behind ``workbench run``: cache -> directions -> patching -> sparsity -> controller -> figures
-> report.

Every stage reads and writes the one activation store, saves its artifacts under ``out_dir/<stage>/``, and
adds a block to ``summary.json``. Figures go to ``out_dir/figures/`` as HTML (offline) and PNG; ``report.md``
and ``report.html`` tie them together.

Two levels of reuse: the activation store serves any run on the same model and prompts (cached activations
are never recomputed), and a finished stage leaves ``out_dir/<stage>/stage.json`` with a key over the model
fingerprint, the run configuration, the workbench source and the runtime versions (python, torch, transformers,
transformer-lens, workbench: an upgrade recomputes); a second run into the same ``out_dir`` with
the same key reuses that stage's results and figures instead of recomputing them (``force=True`` /
``--force`` recomputes). Most of a stage's time is generation under interventions, which no activation
cache can save, so the stage records are what make a repeated run fast.

``summary.json`` records the software that produced it (``"versions"``: :func:`workbench.provenance.versions`,
git commit included) and every fallback taken (``"fallbacks"``: ``[{"kind", "message"}, ...]``, see
:mod:`workbench.fallbacks`); each ``stage.json`` keeps its stage's fallbacks, so a reused stage still reports them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkbenchError
from .fallbacks import recording_fallbacks
from .provenance import runtime_versions, versions

STAGES = ("evaluate", "directions", "patching", "sparsity", "steering")


@dataclass
class RunConfig:
    """One main-job run; saved as ``config.json`` so the run can be repeated."""

    model: str = "organism"
    out_dir: str = "runs/latest"
    device: str | None = None
    dtype: str | None = None
    store: str | None = None
    stages: tuple[str, ...] = STAGES
    figures: bool = True
    png: bool = True
    e2e_steps: int = 600
    n_pairs: int = 16
    #: at most this many prompts per category and split in every stage (``None``: all; small = a quick run)
    limit: int | None = None
    #: recompute every stage even when ``out_dir`` holds a finished one with the same key
    force: bool = False
    show_progress: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class RunState:
    model: object
    store: object
    out: Path
    cfg: RunConfig
    summary: dict = field(default_factory=dict)
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (stage, title, html path)
    direction: object = None

    def figure(self, stage: str, name: str, title: str, fig) -> None:
        if not self.cfg.figures:
            return
        from .plots import save_figure

        formats = ("html", "png") if self.cfg.png else ("html",)
        paths = save_figure(fig, self.out / "figures" / name, formats=formats)
        self.figures.append((stage, title, Path(paths["html"])))


def _stage_evaluate(st: RunState) -> dict:
    from .data import CATEGORIES, organism_splits
    from .evaluate import evaluate_refusal

    ev = evaluate_refusal(st.model, organism_splits("test", CATEGORIES, limit=st.cfg.limit),
                          show_progress=st.cfg.show_progress)
    (st.out / "evaluate").mkdir(exist_ok=True)
    ev.table.to_json(st.out / "evaluate" / "generations.jsonl", orient="records", lines=True)
    return ev.summary()


def _stage_directions(st: RunState) -> dict:
    from . import plots
    from .directions import candidate_cosines, projection_by_layer
    from .directions.report import directions_report
    from .data import organism_prompts

    lim = st.cfg.limit
    summary, sel = directions_report(st.model, limit_train=lim, limit_val=lim, limit_test=lim, store=st.store,
                                     show_progress=st.cfg.show_progress)
    d = sel.direction
    st.direction = d
    out = st.out / "directions"
    out.mkdir(exist_ok=True)
    d.save(out / "direction")
    sel.scores.to_csv(out / "candidate_scores.csv", index=False)
    st.figure("directions", "candidate_scores", "Candidate directions: bypass score (layer x position)",
              plots.candidate_scores_heatmap(sel.scores, selected=(d.layer, d.position)))
    st.figure("directions", "bypass_vs_induce", "Bypass vs induce score of every candidate",
              plots.bypass_induce_scatter(sel.scores, selected=(d.layer, d.position)))
    st.figure("directions", "candidate_cosines", "Cosine similarity of candidates across layers",
              plots.cosine_matrix(candidate_cosines(sel.candidates)))
    sets = {c: organism_prompts("test", c, min(64, lim or 64)) for c in ("harmful", "benign", "jailbreak")}
    proj = projection_by_layer(st.model, d, sets, store=st.store, show_progress=st.cfg.show_progress)
    proj.to_csv(out / "projections.csv", index=False)
    st.figure("directions", "projections", "Projection on the refusal direction per layer",
              plots.projection_plot(proj))
    return summary


def _stage_patching(st: RunState) -> dict:
    from . import plots
    from .patching import prepare, run_patching
    from .patching.pairs import organism_pairs
    from .patching.run import organism_ground_truth

    pairs = organism_pairs(st.model.tokenizer, limit=st.cfg.n_pairs, drop_unequal=True)
    components = ("resid_pre", "attn_out", "mlp_out", "heads")
    runs = prepare(st.model, pairs, "refusal_score", components, store=st.store or True,
                   show_progress=st.cfg.show_progress)
    truth = organism_ground_truth(st.model)
    planted = truth[0] if truth is not None else None
    report = run_patching(st.model, runs, components=components, direction=st.direction, planted_layer=planted,
                          show_progress=st.cfg.show_progress)
    report.save(st.out / "patching")
    st.figure("patching", "patching_resid", "Denoising patching (normalised refusal score) by layer x position",
              plots.patching_heatmaps([report.exact[c] for c in ("resid_pre", "attn_out", "mlp_out")]))
    if "heads" in report.exact:
        st.figure("patching", "patching_heads", "Attention heads (layer x head)", plots.patching_heatmap(report.exact["heads"]))
    if report.attribution:
        exact = [report.exact[c] for c in report.attribution]
        st.figure("patching", "attribution_vs_exact", "Attribution vs exact patching",
                  plots.attribution_vs_exact(exact, list(report.attribution.values())))
    if report.subspace is not None:
        st.figure("patching", "subspace", "Subspace patching and the illusion check",
                  plots.subspace_patching_plot(report.subspace))
    return report.summary


def _stage_sparsity(st: RunState) -> dict:
    from . import plots
    from .sparsity.report import SparsityConfig, save_tables, sparsity_report

    sc = SparsityConfig() if st.cfg.limit is None else SparsityConfig(limit=st.cfg.limit, heldout_limit=st.cfg.limit)
    summary, tables = sparsity_report(st.model, sc, direction=st.direction, store=st.store,
                                      show_progress=st.cfg.show_progress)
    save_tables(tables, st.out / "sparsity")
    if "sparsity" in tables:
        st.figure("sparsity", "sparsity_by_layer", "MLP activation sparsity per layer",
                  plots.sparsity_by_layer(tables["sparsity"], threshold=summary.get("default_threshold")))
    if "ppl_curve" in tables:
        st.figure("sparsity", "ppl_sparsity", "PPL-p% sparsity", plots.ppl_sparsity_curve(tables["ppl_curve"]))
    if "ablation_curve" in tables:
        st.figure("sparsity", "neuron_ablation", "Differential vs random neuron ablation",
                  plots.neuron_ablation_curve(tables["ablation_curve"]))
    return summary


def _stage_steering(st: RunState) -> dict:
    from . import plots
    from .steering.compare import CompareConfig
    from .steering.pipeline import resolve_direction, run_comparison

    d = st.direction or resolve_direction(st.model, show_progress=st.cfg.show_progress)
    out = run_comparison(st.model, d, CompareConfig(e2e_steps=st.cfg.e2e_steps), out_dir=st.out / "steering",
                         limit=st.cfg.limit, show_progress=st.cfg.show_progress)
    res = out.pop("_result")
    st.figure("steering", "refusal_rates", "Refusal rate by method and split (test)", plots.refusal_rate_bars(res))
    st.figure("steering", "controller_weights", "WAS controller layer weights (prompts x layers)",
              plots.controller_weights_heatmap(res["tables"], method="was_e2e"))
    st.figure("steering", "controller_weights_mean", "Mean layer weight per category",
              plots.controller_weights_by_category(res["tables"], method="was_e2e"))
    st.figure("steering", "scale_distribution", "Controller scale s by category",
              plots.scale_distribution(res["tables"], method="was_e2e"))
    if len(res["curves"]):
        st.figure("steering", "alpha_tradeoff", "Alpha trade-off: refusal vs false refusal (validation)",
                  plots.alpha_tradeoff(res["curves"], points=res))
    st.figure("steering", "example_generations", "Example generations with and without steering",
              plots.generations_table(res["tables"]))
    return out


_STAGE_FUNCS: dict[str, Callable[[RunState], dict]] = {
    "evaluate": _stage_evaluate, "directions": _stage_directions, "patching": _stage_patching,
    "sparsity": _stage_sparsity, "steering": _stage_steering,
}


def source_hash() -> str:
    """sha256 over the workbench package's Python sources (a stage record from other code is not reused)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _stage_key(cfg: RunConfig, stage: str, model_fp: str, code: str) -> str:
    """Reuse key of a stage: stage, run configuration, model fingerprint, workbench source hash and the runtime
    versions (:func:`workbench.provenance.runtime_versions`; the git commit is left out, ``code`` covers it)."""
    conf = {k: v for k, v in cfg.__dict__.items() if k not in ("out_dir", "stages", "show_progress", "force")}
    blob = json.dumps({"stage": stage, "config": conf, "model": model_fp, "code": code,
                       "versions": runtime_versions()}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reuse_stage(st: RunState, stage: str, key: str) -> dict | None:
    """The ``stage.json`` record (``key``, ``summary``, ``figures``, ``fallbacks``) of a finished stage with this
    key (its figures re-registered), else ``None``."""
    rec_path = st.out / stage / "stage.json"
    if st.cfg.force or not rec_path.exists():
        return None
    rec = json.loads(rec_path.read_text())
    figs = [(s, t, st.out / p) for s, t, p in rec.get("figures", [])]
    if rec.get("key") != key or not all(p.exists() for _, _, p in figs):
        return None
    if stage == "directions":
        from .directions import Direction

        path = st.out / "directions" / "direction"
        if not path.with_suffix(".safetensors").exists():
            return None
        st.direction = Direction.load(path, model=st.model)
    st.figures.extend(figs)
    return rec


def _run_stage(st: RunState, stage: str, key: str, fallbacks: list[dict]) -> dict:
    """Compute ``stage`` and write its ``stage.json`` record: ``key``, ``summary``, ``figures`` and the
    ``fallbacks`` taken while it ran (the tail of ``fallbacks``, the run's list, that it added)."""
    n_figs, n_fallbacks = len(st.figures), len(fallbacks)
    result = _STAGE_FUNCS[stage](st)
    (st.out / stage).mkdir(exist_ok=True)
    rec = {"key": key, "summary": result,
           "figures": [(s, ti, str(p.relative_to(st.out))) for s, ti, p in st.figures[n_figs:]],
           "fallbacks": fallbacks[n_fallbacks:]}
    (st.out / stage / "stage.json").write_text(json.dumps(rec, indent=2, default=str))
    return rec


def run_main_job(cfg: RunConfig) -> dict:
    """Run every stage of ``cfg.stages`` in order; returns the summary (also written to ``summary.json``).

    A stage finished by an earlier run into the same ``out_dir`` with the same key (model, configuration,
    workbench source, runtime versions) is reused, not recomputed, unless ``cfg.force``; ``summary["reused"]``
    lists them. The summary records ``"versions"`` (:func:`workbench.provenance.versions`) and ``"fallbacks"``
    (every fallback of the run, those recorded by reused stages included).
    """
    from .models import fingerprint, load_model
    from .store import ActivationStore

    unknown = [s for s in cfg.stages if s not in _STAGE_FUNCS]
    if unknown:
        raise WorkbenchError(f"unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=list))
    t0 = time.time()
    with recording_fallbacks() as fallbacks:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        st = RunState(model, ActivationStore(cfg.store), out, cfg)
        st.summary.update(model=cfg.model, versions=versions(), fallbacks=fallbacks)
        timings = {"load_model": round(time.time() - t0, 1)}
        model_fp, code = fingerprint(model), source_hash()
        reused = []
        for stage in cfg.stages:
            t = time.time()
            key = _stage_key(cfg, stage, model_fp, code)
            rec = _reuse_stage(st, stage, key)
            if rec is not None:
                reused.append(stage)
                fallbacks.extend(rec.get("fallbacks", []))
            else:
                rec = _run_stage(st, stage, key, fallbacks)
            st.summary[stage] = rec["summary"]
            timings[stage] = round(time.time() - t, 1)
            (out / "summary.json").write_text(json.dumps({**st.summary, "seconds": timings}, indent=2, default=str))
    timings["total"] = round(time.time() - t0, 1)
    st.summary["seconds"] = timings
    st.summary["reused"] = reused
    (out / "summary.json").write_text(json.dumps(st.summary, indent=2, default=str))
    from .report import write_report

    write_report(st.summary, st.figures, out)
    return st.summary

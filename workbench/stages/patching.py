"""The patching stage: exact activation patching on prompt pairs, attribution patching, subspace patching along
the refusal direction and the illusion check (see :func:`workbench.patching.run_patching`).

Pairs: the data's minimal pairs when it has them (the organism ships 256), else harmful and benign prompts of
``pair_split`` matched by token length (:func:`workbench.patching.pairs.pairs_by_length`). Reads the directions
stage's ``direction`` when present (subspace patching along it; else the pairs' difference in means). Writes
``patching.json``, ``patching_sweeps.csv``, ``patching_subspace.csv`` and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import PositiveInt
from ..errors import WorkbenchError
from .base import Result, Stage

DEFAULT_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "heads")


@dataclass
class PatchingConfig:
    """Which pairs and components are patched."""

    #: number of prompt pairs (0 or none: all)
    n_pairs: PositiveInt | None = 16
    #: components swept (resid_pre, attn_out, mlp_out, heads, z, ...)
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    #: the patching metric
    metric: str = "refusal_score"
    #: split whose harmful and benign prompts are paired when the data has no minimal pairs
    pair_split: str = "train"


@dataclass
class PatchingResult(Result):
    """Summary, the long table of every sweep (``patching_sweeps``) and the subspace table."""

    report: object = None   # the in-memory PatchingReport of a fresh run (figures use it)

    def save(self, out_dir):
        if self.report is not None:
            self.report.save(out_dir)
        return Result(self.summary).save(out_dir)


def prompt_pairs(model, data, config: PatchingConfig):
    """The :class:`PromptPairs` of a run: the data's minimal pairs, else pairs matched by token length."""
    from ..patching.pairs import make_pairs, pairs_by_length

    if data.pairs:
        clean, corrupted = zip(*data.pairs)
        return make_pairs(model.tokenizer, clean, corrupted, drop_unequal=True, limit=config.n_pairs)
    data.require(config.pair_split, "harmful", "benign")
    harmful, benign = data.prompts(config.pair_split, "harmful"), data.prompts(config.pair_split, "benign")
    try:
        return pairs_by_length(model.tokenizer, harmful, benign, limit=config.n_pairs)
    except WorkbenchError as exc:
        raise WorkbenchError(f"patching: {exc} (the {config.pair_split} split of {data.source} has {len(harmful)} "
                             f"harmful and {len(benign)} benign prompts; a larger --limit or another "
                             "--patching.pair-split gives more equal-length pairs)") from exc


class PatchingStage(Stage):
    name = "patching"
    config_class = PatchingConfig
    result_class = PatchingResult
    reads = {"directions": ("direction.safetensors", "direction.json")}

    def run(self, model, data, store, config: PatchingConfig, inputs, show_progress: bool = True):
        from ..directions import Direction
        from ..patching import prepare, run_patching
        from ..patching.run import organism_ground_truth

        pairs = prompt_pairs(model, data, config)
        comps = tuple(config.components)
        runs = prepare(model, pairs, config.metric, comps, store=store or True, show_progress=show_progress)
        truth = organism_ground_truth(model)
        direction = (Direction.load(inputs["directions"] / "direction", model=model)
                     if "directions" in inputs else None)
        report = run_patching(model, runs, components=comps, direction=direction,
                              planted_layer=truth[0] if truth is not None else None, show_progress=show_progress)
        report.summary["pairs"] = "minimal pairs of the data" if data.pairs else \
            f"{config.pair_split} harmful and benign prompts matched by token length"
        return PatchingResult(report.summary, {}, report)

    def figures(self, result: PatchingResult):
        from .. import plots

        rep = result.report
        if rep is None:
            return []
        figs = []
        resid = [rep.exact[c] for c in ("resid_pre", "attn_out", "mlp_out") if c in rep.exact]
        if resid:
            figs.append(("patching_resid", "Denoising patching (normalised refusal score) by layer x position",
                         plots.patching_heatmaps(resid)))
        if "heads" in rep.exact:
            figs.append(("patching_heads", "Attention heads (layer x head)", plots.patching_heatmap(rep.exact["heads"])))
        if rep.attribution:
            exact = [rep.exact[c] for c in rep.attribution]
            figs.append(("attribution_vs_exact", "Attribution vs exact patching",
                         plots.attribution_vs_exact(exact, list(rep.attribution.values()))))
        if rep.subspace is not None:
            figs.append(("subspace", "Subspace patching and the illusion check",
                         plots.subspace_patching_plot(rep.subspace)))
        return figs

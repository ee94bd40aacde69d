"""The evaluate stage: replies (greedy, or sampled: ``EvaluateConfig.decoding``) to every prompt set of one split,
judged for refusal (no intervention).

Reads the prompt data only; writes ``generations.jsonl`` (one row per prompt: category, prompt, reply, refused,
refusal score) and ``summary.json`` (refusal rate, refusal score and count per category).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..configs import PositiveInt
from ..decoding import Decoding
from .base import Result, Stage

GENERATIONS = "generations.jsonl"


@dataclass
class EvaluateConfig:
    """What the evaluate stage measures."""

    #: the split evaluated
    split: str = "test"
    #: categories evaluated (default: every category of the data)
    categories: tuple[str, ...] | None = None
    #: reply length in tokens
    max_new_tokens: PositiveInt = 24
    #: prompts per forward (an int, or "auto" for the adaptive batch size)
    batch_size: PositiveInt | str = 32
    #: refusal judge: "substring" (default) or another registered judge
    judge: str | None = None
    #: prompts longer than the model's context (with the reply): an error (default), or cut at the "left" or "right"
    truncate: str | None = None
    #: greedy (default) or sampling: strategy, temperature, top_p, seed, n_samples (workbench.decoding)
    decoding: Decoding = field(default_factory=Decoding)


@dataclass
class EvaluateResult(Result):
    """Summary plus the per-prompt ``generations`` table."""

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        gen = self.tables.get("generations")
        if gen is not None:
            gen.to_json(out / GENERATIONS, orient="records", lines=True)
        return Result(self.summary).save(out)

    @classmethod
    def load(cls, out_dir, **_):
        base = Result.load(out_dir)
        path = Path(out_dir) / GENERATIONS
        tables = {"generations": pd.read_json(path, orient="records", lines=True)} if path.exists() else {}
        return cls(base.summary, tables)


class EvaluateStage(Stage):
    name = "evaluate"
    config_class = EvaluateConfig
    result_class = EvaluateResult

    def run(self, model, data, store, config: EvaluateConfig, inputs, show_progress: bool = True,
            plan=None, fwd_hooks=()) -> EvaluateResult:
        """Evaluate ``config.categories`` of ``config.split`` (under torchrun the prompts are sharded over the
        ranks). ``plan`` / ``fwd_hooks``: an optional steering plan or hooks applied while generating."""
        from ..evaluate import evaluate_distributed

        sets = data.split(config.split, config.categories)
        if not sets:
            from ..errors import WorkbenchError

            raise WorkbenchError(f"the prompt data ({data.source}) has no {config.split} prompts of categories "
                                 f"{list(config.categories or data.categories)}")
        ev = evaluate_distributed(model, sets, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                  show_progress=show_progress, judge=config.judge, plan=plan, fwd_hooks=fwd_hooks,
                                  decoding=config.decoding, truncate=config.truncate)
        summary = {"split": config.split, "judge": ev.table.attrs.get("judge"), **ev.summary()}
        if config.decoding.sampling:
            summary["decoding"] = config.decoding.to_dict()
        return EvaluateResult(summary, {"generations": ev.table})

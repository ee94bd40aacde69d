"""Refusal evaluation: greedy replies judged by :func:`workbench.judge.is_refusal`, plus the refusal score."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from .chat import tokenize_chat
from .errors import WorkbenchError
from .generation import Hook, generate_batch
from .judge import is_refusal, refusal_score, refusal_token_ids
from .progress import progress


@dataclass
class Evaluation:
    """Per-prompt results (``table``) and the summary the CLI prints as JSON."""

    table: pd.DataFrame

    def summary(self) -> dict:
        g = self.table.groupby("category", sort=False)
        return {
            "refusal_rate": {k: round(float(v), 4) for k, v in g["refused"].mean().items()},
            "refusal_score": {k: round(float(v), 4) for k, v in g["refusal_score"].mean().items()},
            "n": {k: int(v) for k, v in g.size().items()},
        }


def evaluate_refusal(
    model,
    prompt_sets: Mapping[str, Sequence[str]],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    fwd_hooks: Sequence[Hook] = (),
    system: str | None = None,
    show_progress: bool = True,
) -> Evaluation:
    """Generate greedy replies for every prompt set and judge them.

    Args:
        prompt_sets: ``{category: prompts}``, e.g. :func:`workbench.data.organism_splits`.
        fwd_hooks: TransformerLens hooks active during generation (steering, ablation...).

    Returns:
        An :class:`Evaluation`; ``table`` has one row per prompt with ``category``, ``prompt``, ``reply``,
        ``refused`` (substring judge) and ``refusal_score`` (log-odds of a refusal first token).
    """
    if not prompt_sets or all(len(v) == 0 for v in prompt_sets.values()):
        raise WorkbenchError("evaluate_refusal needs at least one non-empty prompt set")
    ref_ids = refusal_token_ids(model.tokenizer)
    jobs = [(cat, p) for cat, ps in prompt_sets.items() for p in ps]
    rows = []
    starts = range(0, len(jobs), batch_size)
    for s in progress(starts, "evaluate", show_progress, total=len(starts)):
        chunk = jobs[s:s + batch_size]
        batch = tokenize_chat(model.tokenizer, [p for _, p in chunk], system)
        replies, logits = generate_batch(model, batch, max_new_tokens, fwd_hooks)
        scores = refusal_score(logits, ref_ids).tolist()
        for (cat, prompt), reply, score in zip(chunk, replies, scores):
            rows.append({"category": cat, "prompt": prompt, "reply": reply,
                         "refused": is_refusal(reply), "refusal_score": score})
    return Evaluation(pd.DataFrame(rows))

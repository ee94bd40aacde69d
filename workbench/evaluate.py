"""Refusal evaluation: greedy replies judged by :func:`workbench.judge.is_refusal`, plus the refusal score."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from .chat import tokenize_chat
from .errors import WorkbenchError
from .generation import Hook, generate_batch
from .judge import is_refusal, refusal_score, refusal_token_ids
from .progress import progress


@dataclass
class Evaluation:
    """Per-prompt results (``table``) and the summary the CLI prints as JSON."""

    table: pd.DataFrame
    #: ``Float[Tensor, "prompt d_vocab"]`` next-token log-probs at the last prompt position (``keep_logprobs``)
    logprobs: torch.Tensor | None = None

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
    plan=None,
    keep_logprobs: bool = False,
) -> Evaluation:
    """Generate greedy replies for every prompt set and judge them.

    Args:
        prompt_sets: ``{category: prompts}``, e.g. :func:`workbench.data.organism_splits`.
        fwd_hooks: TransformerLens hooks active during generation (ablation, fixed steering...).
        plan: a :class:`workbench.steering.SteeringPlan` whose hooks depend on the batch (a controller or
            a gate); its per-row info (``s``, ``w``, ``gate``) becomes columns of the table.

    Returns:
        An :class:`Evaluation`; ``table`` has one row per prompt with ``category``, ``prompt``, ``reply``,
        ``refused`` (substring judge) and ``refusal_score`` (log-odds of a refusal first token).
    """
    if not prompt_sets or all(len(v) == 0 for v in prompt_sets.values()):
        raise WorkbenchError("evaluate_refusal needs at least one non-empty prompt set")
    ref_ids = refusal_token_ids(model.tokenizer)
    jobs = [(cat, p) for cat, ps in prompt_sets.items() for p in ps]
    rows, logprobs = [], []
    starts = range(0, len(jobs), batch_size)
    for s in progress(starts, "evaluate", show_progress, total=len(starts)):
        chunk = jobs[s:s + batch_size]
        batch = tokenize_chat(model.tokenizer, [p for _, p in chunk], system)
        hooks, info = list(fwd_hooks), {}
        if plan is not None:
            plan_hooks, info = plan.hooks_for(model, batch)
            hooks += plan_hooks
        replies, logits = generate_batch(model, batch, max_new_tokens, hooks)
        scores = refusal_score(logits, ref_ids).tolist()
        if keep_logprobs:
            logprobs.append(torch.log_softmax(logits.float(), -1).cpu())
        for i, ((cat, prompt), reply, score) in enumerate(zip(chunk, replies, scores)):
            row = {"category": cat, "prompt": prompt, "reply": reply,
                   "refused": is_refusal(reply), "refusal_score": score}
            row.update({k: v[i] for k, v in info.items()})
            rows.append(row)
    return Evaluation(pd.DataFrame(rows), torch.cat(logprobs) if keep_logprobs else None)


def first_token_kl(reference: Evaluation, steered: Evaluation, category: str | None = None) -> float:
    """Mean KL(reference || steered) of the first reply token distribution (both with ``keep_logprobs``)."""
    if reference.logprobs is None or steered.logprobs is None:
        raise WorkbenchError("first_token_kl needs evaluations run with keep_logprobs=True")
    if list(reference.table["prompt"]) != list(steered.table["prompt"]):
        raise WorkbenchError("first_token_kl compares evaluations of the same prompts in the same order")
    rows = slice(None) if category is None else torch.tensor((reference.table["category"] == category).to_numpy())
    p, q = reference.logprobs[rows], steered.logprobs[rows]
    return float((p.exp() * (p - q)).sum(-1).mean())

"""Patching metrics on the next-token logits at the last prompt position, and their normalisation.

A metric maps ``Float[Tensor, "rows d_vocab"]`` logits to ``Float[Tensor, "rows"]``. A sweep cell's value
is the metric averaged over the pairs, normalised so the corrupted (harmless) run is 0 and the clean
(harmful) run is 1: ``(patched - corrupted) / (clean - corrupted)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..judge import first_token_ids, refusal_score, refusal_token_ids

#: Replies that comply start with one of these; first words that are single tokens give the compliance ids.
COMPLIANCE_PREFIXES: tuple[str, ...] = ("Sure", "Certainly", "Of course", "Here", "Absolutely", "Yes", "Okay", "Step")

METRICS = ("refusal_score", "logit_diff")


@dataclass(frozen=True)
class Metric:
    """A named metric ``Float[Tensor, "rows d_vocab"] -> Float[Tensor, "rows"]`` (last-position logits)."""

    name: str
    fn: Callable[[Tensor], Tensor]

    def __call__(self, logits_last: Tensor) -> Tensor:
        return self.fn(logits_last)


def compliance_token_ids(tokenizer, prefixes: Iterable[str] = COMPLIANCE_PREFIXES) -> list[int]:
    """First token ids of compliant reply openings (:func:`workbench.judge.first_token_ids`)."""
    ids = first_token_ids(tokenizer, prefixes)
    if not ids:
        raise WorkbenchError(f"no compliance token ids: none of {sorted({p.split()[0] for p in prefixes})} is a "
                             "single token of this tokenizer; use metric='refusal_score'")
    return ids


def make_metric(model_or_tokenizer, metric: str | Metric | Callable = "refusal_score",
                refusal_ids: Sequence[int] | None = None, compliance_ids: Sequence[int] | None = None) -> Metric:
    """Build a :class:`Metric`.

    Args:
        metric: ``"refusal_score"`` (Arditi et al.'s log-odds of a refusal token, the default),
            ``"logit_diff"`` (mean refusal-token logit minus mean compliance-token logit), a :class:`Metric`,
            or any callable ``logits_last -> Float[Tensor, "rows"]``.
    """
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric)
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if metric == "refusal_score":
        ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(tok)
        return Metric("refusal_score", lambda logits: refusal_score(logits, ids))
    if metric == "logit_diff":
        r = torch.as_tensor(list(refusal_ids) if refusal_ids is not None else refusal_token_ids(tok))
        c = torch.as_tensor(list(compliance_ids) if compliance_ids is not None else compliance_token_ids(tok))
        overlap = set(r.tolist()) & set(c.tolist())
        if overlap:
            raise WorkbenchError(f"refusal and compliance token ids overlap ({sorted(overlap)}); they must be disjoint")

        def logit_diff(logits: Tensor) -> Tensor:
            lg = logits.float()
            return lg[..., r.to(lg.device)].mean(-1) - lg[..., c.to(lg.device)].mean(-1)

        return Metric("logit_diff", logit_diff)
    raise WorkbenchError(f"unknown metric {metric!r}; expected one of {METRICS} or a callable")


def check_separable(clean: float, corrupted: float, metric_name: str = "metric", rtol: float = 1e-6) -> None:
    """Raise when the metric does not tell the clean from the corrupted run (normalisation by zero)."""
    scale = max(1.0, abs(clean), abs(corrupted))
    if not (abs(clean - corrupted) > rtol * scale) or not torch.isfinite(torch.tensor([clean, corrupted])).all():
        raise WorkbenchError(
            f"the {metric_name} is constant on the pairs (clean = {clean:.6g}, corrupted = {corrupted:.6g}); "
            "normalising by clean - corrupted would divide by zero. Use pairs the model treats differently "
            "(a harmful clean prompt and a harmless corrupted one) or another metric"
        )


def normalise(values: Tensor, clean: float, corrupted: float) -> Tensor:
    """``(values - corrupted) / (clean - corrupted)``: 0 = the corrupted run, 1 = the clean run."""
    return (values - corrupted) / (clean - corrupted)

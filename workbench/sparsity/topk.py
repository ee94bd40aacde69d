"""Top-k sparsification of the MLP hidden layer (The Lazy Neuron Phenomenon, Li et al. 2023).

Keep only the ``k`` largest ``|a|`` of every token's MLP hidden vector (``blocks.{l}.mlp.hook_post``) in the
chosen layers and zero the rest, for a falling grid of ``k``; measure the held-out loss and the refusal
rates (greedy replies, substring judge) of prompt sets under the same hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from ..errors import WorkbenchError
from ..progress import progress
from ._common import d_mlp, model_layers
from .heldout import HeldoutText, lm_loss
from .hooks import topk_hooks

#: default k grid as fractions of d_mlp
DEFAULT_K_FRACTIONS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01)


def resolve_ks(model, ks) -> list[int]:
    """Ints are absolute ``k``; floats in (0, 1] are fractions of ``d_mlp`` (rounded, at least 1). Sorted falling."""
    d = d_mlp(model)
    if isinstance(ks, (int, float)):
        ks = [ks]
    out = []
    for k in ks:
        if isinstance(k, bool):
            raise WorkbenchError(f"k {k!r} is a bool; expected an int in 1..{d} or a fraction in (0, 1]")
        if isinstance(k, int):
            if not 1 <= k <= d:
                raise WorkbenchError(f"k={k} is out of range 1..d_mlp={d}")
            out.append(k)
        elif isinstance(k, float) and 0 < k <= 1:
            out.append(max(1, int(round(k * d))))
        else:
            raise WorkbenchError(f"k {k!r} must be an int in 1..{d} or a fraction in (0, 1]")
    if not out:
        raise WorkbenchError("the k grid is empty")
    return sorted(set(out), reverse=True)


def _refusal(model, prompt_sets, hooks, max_new_tokens, batch_size) -> dict:
    from ..evaluate import evaluate_refusal

    ev = evaluate_refusal(model, prompt_sets, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          fwd_hooks=hooks, show_progress=False)
    s = ev.summary()
    out = {}
    for cat in prompt_sets:
        out[f"refusal_rate:{cat}"] = s["refusal_rate"][cat]
        out[f"refusal_score:{cat}"] = s["refusal_score"][cat]
    return out


def topk_sweep(
    model,
    text: HeldoutText | None = None,
    prompt_sets: Mapping[str, Sequence[str]] | None = None,
    ks=DEFAULT_K_FRACTIONS,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Loss and refusal rates as ``k`` falls.

    Args:
        text: held-out text for the loss (optional).
        prompt_sets: ``{category: prompts}`` for refusal rates (optional), e.g. harmful and benign.
        ks: ints (absolute) or fractions of ``d_mlp``; ``k = d_mlp`` is the dense reference.
        layers: the sparsified layers (default: all).

    Returns:
        Long format, one row per (k, metric): ``k, k_fraction, layers, metric, value`` with metrics ``loss``,
        ``ppl_increase_pct`` (vs the dense loss), ``refusal_rate:<category>``, ``refusal_score:<category>``.
    """
    if text is None and not prompt_sets:
        raise WorkbenchError("topk_sweep needs held-out text (loss) and/or prompt_sets (refusal rates)")
    if text is not None and not isinstance(text, HeldoutText):
        raise WorkbenchError(f"text must be a HeldoutText, got {type(text).__name__}")
    layers = model_layers(model, layers)
    ks = resolve_ks(model, ks)
    d = d_mlp(model)
    base = lm_loss(model, text, (), batch_size) if text is not None else None
    label = ",".join(map(str, layers))
    rows = []
    for k in progress(ks, "top-k", show_progress):
        hooks = topk_hooks(model, k, layers)
        vals = {}
        if text is not None:
            loss = lm_loss(model, text, hooks, batch_size)
            vals["loss"] = loss
            vals["ppl_increase_pct"] = 100.0 * math.expm1(loss - base)
        if prompt_sets:
            vals.update(_refusal(model, prompt_sets, hooks, max_new_tokens, batch_size))
        for m, v in vals.items():
            rows.append({"k": k, "k_fraction": k / d, "layers": label, "metric": m, "value": v})
    return pd.DataFrame(rows, columns=["k", "k_fraction", "layers", "metric", "value"])

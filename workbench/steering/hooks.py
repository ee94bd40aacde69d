"""Steering hooks: ``Δh_l = c_{b,l} · d`` added to the residual stream at the last position.

By default the hook edits position ``-1`` (``positions="last"``): during the prefill (left-padded) that is the
last prompt token, and on every cached decoding step (sequence length 1) it is the newly generated token, so
one hook covers the last prompt position and every generated token, as Weighted Activation Steering prescribes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..errors import WorkbenchError
from ..vocab import Positions, position_index
from ..vocab import hook_name as vocab_hook_name

#: the residual-stream sites a steering vector may be added at
HOOK_ALIASES = ("resid_pre", "resid_post")


def hook_name(alias: str, layer: int) -> str:
    """``("resid_pre", 3)`` -> ``"blocks.3.hook_resid_pre"`` (:func:`workbench.vocab.hook_name`)."""
    if alias not in HOOK_ALIASES:
        raise WorkbenchError(f"unknown steering hook {alias!r}; expected one of {sorted(HOOK_ALIASES)}")
    return vocab_hook_name(alias, layer)


def steering_hooks(
    coeffs: Tensor, direction: Tensor, hook: str = "resid_pre", positions: Positions = "last",
) -> list[tuple[str, Callable]]:
    """Hooks adding ``coeffs[b, l] * direction`` to layer ``l``'s residual stream of row ``b``.

    Args:
        coeffs: ``Float[Tensor, "batch n_layers"]`` (``s · w_l · α`` per row and layer; differentiable);
            a single row broadcasts over any batch.
        direction: ``Float[Tensor, "d_model"]``, used as given (pass a unit vector).
        positions: the positions edited (:data:`workbench.vocab.Positions`, counted from the end of each
            forward). The default ``"last"`` is the last prompt token in the prefill and the new token in each
            cached step; ``("last_k", n_reply + 1)`` steers a teacher-forced forward over prompt + reply exactly as
            generation is; ``"all"`` edits every position (ActAdd-style).
    """
    if coeffs.ndim != 2:
        raise WorkbenchError(f"coeffs must be [batch, n_layers], got shape {tuple(coeffs.shape)}")
    cols = position_index(positions)

    def make(layer: int) -> Callable:
        def fn(act: Tensor, hook=None) -> Tensor:
            c = coeffs[:, layer].to(device=act.device, dtype=act.dtype)  # plans build coeffs on the CPU
            if c.shape[0] == 1:
                c = c.expand(act.shape[0])
            elif c.shape[0] != act.shape[0]:
                raise WorkbenchError(f"steering coeffs for {c.shape[0]} rows applied to a batch of {act.shape[0]}")
            d = direction.to(device=act.device, dtype=act.dtype)
            out = act.clone()
            out[:, cols] = out[:, cols] + c[:, None, None] * d
            return out

        return fn

    return [(hook_name(hook, l), make(l)) for l in range(coeffs.shape[1]) if bool((coeffs[:, l] != 0).any())]


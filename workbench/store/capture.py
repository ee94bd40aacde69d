"""Capture hooks: forward hooks that copy the selected positions of the requested hook points, one shard at a
time, and stop the forward as soon as the last one has fired.

:class:`ShardCapture` holds the hooks and what they captured; :class:`StopForward` is what ends the forward
early; :func:`split_forward` computes a shard in row chunks that shrink on out-of-memory; :func:`model_lock`
keeps two threads from running (and hooking) one model at once. :class:`Computed` holds activations a caller
already computed with a forward of its own; a shard is then captured from them, through the same hooks, instead
of from a forward.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..batching import OOMBackoff
from ..errors import WorkbenchError
from .request import Request

_MODEL_LOCKS_GUARD = threading.Lock()
_MODEL_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_lock(model) -> threading.RLock:
    """One lock per model object: hooks are global to a model, so two threads must not run it at once.
    (Kept outside the model so that ``copy.deepcopy(model)`` still works.)"""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class StopForward(Exception):
    """Raised from the last needed hook to end the forward pass early."""


class ShardCapture:
    """Forward hooks that copy the selected positions of the hooks needed for the current batch."""

    def __init__(self, positions: list[int] | str, dtype: torch.dtype):
        self.positions = positions
        self.dtype = dtype
        self.wanted: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}
        self.batch, self.length = 0, 0
        if positions != "all":
            k = -positions[0]
            self.tail = k if positions == list(range(-k, 0)) else None

    def start(self, wanted, batch: int, length: int) -> None:
        self.wanted, self.out, self.batch, self.length = set(wanted), {}, batch, length

    def hook(self, name: str):
        def fn(t, hook=None):
            if name not in self.wanted or name in self.out:
                return None
            if isinstance(t, tuple):
                t = t[0]
            if t.dim() < 2 or t.shape[0] != self.batch or t.shape[1] != self.length:
                raise WorkbenchError(
                    f"hook {name} gives a tensor of shape {tuple(t.shape)}; the store keeps activations with the "
                    f"batch at dim 0 and positions at dim 1 (expected ({self.batch}, {self.length}, ...))"
                )
            if self.positions == "all":
                v = t
            elif self.tail is not None:
                v = t[:, t.shape[1] - self.tail:]
            else:
                v = t[:, [t.shape[1] + p for p in self.positions]]
            self.out[name] = v.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
            if len(self.out) == len(self.wanted):
                raise StopForward
            return None

        return fn


def split_forward(model, cap: ShardCapture, need, ids, am, backoff: OOMBackoff) -> dict[str, torch.Tensor]:
    """One shard's captures, computed in row chunks that :class:`OOMBackoff` halves on out-of-memory."""

    def part(rows: range) -> dict[str, torch.Tensor]:
        cap.start(need, len(rows), ids.shape[1])
        try:
            model(ids[rows.start:rows.stop], attention_mask=am[rows.start:rows.stop])
        except StopForward:
            pass
        out, cap.out = cap.out, {}
        return out

    parts = backoff.map(part, range(ids.shape[0]))
    return {h: torch.cat([p[h] for p in parts]) for h in parts[0] if all(h in p for p in parts)}


@dataclass
class Computed:
    """Activations of a request's prompts from a forward the caller ran anyway (e.g. the clean run of activation
    patching), to be written into the entry instead of computing it with a forward of the store's own.

    Attributes:
        input_ids: ``Int[Tensor, "prompt pos"]`` the tokens that forward ran on, left-padded; they must be the
            request's own tokens (the store's chat formatting), possibly with more all-padding columns on the left.
        attention_mask: ``Int[Tensor, "prompt pos"]`` of ``input_ids``.
        acts: hook name -> ``Float[Tensor, "prompt pos ..."]`` at every position of ``input_ids``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    acts: Mapping[str, Tensor]

    def check(self, req: Request) -> None:
        """Raise WorkbenchError unless these are the request's tokens and hold every requested hook."""
        ids, am = req.batch.input_ids.cpu(), req.batch.attention_mask.cpu()
        n, length = ids.shape
        c_ids, c_am = self.input_ids.cpu(), self.attention_mask.cpu()
        if c_ids.shape != c_am.shape or c_ids.shape[0] != n or c_ids.shape[1] < length:
            raise WorkbenchError(
                f"the computed activations' tokens have shape {tuple(c_ids.shape)} (mask {tuple(c_am.shape)}); "
                f"expected ({n}, >= {length}) for the {n} prompts of the request"
            )
        extra = c_ids.shape[1] - length
        same = bool((c_am[:, :extra] == 0).all()) and torch.equal(c_am[:, extra:].bool(), am.bool()) \
            and bool(((c_ids[:, extra:] == ids) | (am == 0)).all())
        if not same:
            raise WorkbenchError(
                "the computed activations were taken on other tokens than the store's chat-formatted prompts "
                "(a different tokenizer, template or system prompt?); expected the request's input_ids"
            )
        lacking = [h for h in req.hook_names if h not in self.acts]
        if lacking:
            raise WorkbenchError(f"the computed activations hold no hook {lacking[0]!r} "
                                 f"(they hold {sorted(self.acts)}); expected every requested hook")
        for h in req.hook_names:
            shape = tuple(self.acts[h].shape)
            if shape[:2] != tuple(c_ids.shape):
                raise WorkbenchError(f"computed activations of {h} have shape {shape}; expected "
                                     f"{tuple(c_ids.shape)} + (...) (prompts x positions of input_ids)")

    def row_shape(self, name: str, n_pos: int) -> list[int]:
        """Per-row shape ``[n_pos, *rest]`` of hook ``name``."""
        return [n_pos, *self.acts[name].shape[2:]]

    def capture(self, cap: ShardCapture, need, a: int, b: int, length: int) -> dict[str, torch.Tensor]:
        """Rows ``a..b`` of the hooks ``need``, their last ``length`` positions, through ``cap``'s hooks (selected
        positions, storage dtype, on CPU), as a forward on those rows cut to ``length`` would capture them."""
        cap.start(need, b - a, length)
        for h in need:
            try:
                cap.hook(h)(self.acts[h][a:b, self.acts[h].shape[1] - length:])
            except StopForward:
                pass
        out, cap.out = cap.out, {}
        return out

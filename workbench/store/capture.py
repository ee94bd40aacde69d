"""Capture hooks: forward hooks that copy the selected positions of the requested hook points, one shard at a
time, and stop the forward as soon as the last one has fired.

:class:`ShardCapture` holds the hooks and what they captured; :class:`StopForward` is what ends the forward
early; :func:`split_forward` computes a shard in row chunks that shrink on out-of-memory; :func:`model_lock`
keeps two threads from running (and hooking) one model at once.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..batching import OOMBackoff
from ..errors import WorkbenchError

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

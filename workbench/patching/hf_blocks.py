"""Hugging Face block internals: calling one decoder block of a base run on a suffix of its positions.

The ``"resume"`` engine enters the stack at some block and computes only positions ``start:``. That needs what
the block received in the base run (:attr:`Run.block_kwargs <workbench.patching.capture.Run>`), cut to those
positions, and the base run's keys and values of the earlier positions standing in for the KV cache
(:func:`resume_kwargs`, :class:`PrefixKV`); :class:`UnsupportedBlock` says a block takes something that
cannot be cut. :func:`prune_last_mlp` swaps the last block's MLP for one that computes only the last position,
and :func:`final_logits` applies the final norm, unembedding and (Gemma) logit soft-capping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .capture import Run


class PrefixKV:
    """A stand-in KV cache holding the base run's keys/values of positions ``< start`` for one block."""

    def __init__(self, keys: Tensor | None, values: Tensor | None):
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int = 0, *args, **kwargs):
        if self.keys is None or self.keys.shape[-2] == 0:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])


class UnsupportedBlock(Exception):
    """A block receives an argument the ``"resume"`` engine cannot restrict to a suffix of positions."""


def _select(x: Tensor, pairs: Tensor, batch: int) -> Tensor:
    """Rows ``pairs`` of a per-pair tensor; a batch-1 tensor broadcasts and is kept as is."""
    return x[pairs] if x.shape[0] == batch and batch > 1 else x


def resume_kwargs(run: Run, j: int, pairs: Tensor, start: int) -> dict:
    """Block ``j``'s keyword arguments for the rows ``pairs``, restricted to query positions ``start:``.

    Raises:
        UnsupportedBlock: the block received a tensor argument this function does not know how to cut.
    """
    assert run.block_kwargs is not None and run.kv is not None
    batch, n_pos = run.tokens.shape
    out = {}
    for key, val in run.block_kwargs[j].items():
        if key in ("past_key_values", "past_key_value", "layer_past"):
            k, v = run.kv[j]
            out[key] = PrefixKV(k[pairs, :, :start], v[pairs, :, :start])
        elif key == "attention_mask":
            if val is None:
                out[key] = None
            elif isinstance(val, Tensor) and val.ndim == 4:
                out[key] = _select(val, pairs, batch)[:, :, start:, :]
            elif isinstance(val, Tensor) and val.ndim == 2:
                out[key] = _select(val, pairs, batch)
            else:
                raise UnsupportedBlock(f"attention_mask of shape {getattr(val, 'shape', None)}")
        elif key == "position_embeddings" and isinstance(val, tuple):
            out[key] = tuple(_select(t, pairs, batch)[..., start:, :] for t in val)
        elif key == "position_ids" and isinstance(val, Tensor):
            out[key] = _select(val, pairs, batch)[..., start:]
        elif key == "cache_position" and isinstance(val, Tensor):
            out[key] = val[start:]
        elif isinstance(val, Tensor) or (isinstance(val, (tuple, list)) and any(isinstance(t, Tensor) for t in val)):
            raise UnsupportedBlock(f"block keyword {key!r}")
        else:
            out[key] = val
    return out


def final_logits(model, h: Tensor) -> Tensor:
    """``Float[Tensor, "row d_vocab"]`` logits from the last block's output ``Float[Tensor, "row pos d"]``."""
    logits = model.unembed(model.ln_final(h[:, -1:, :]))[:, -1]
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


class LastPositionOnly(torch.nn.Module):
    """Runs a sub-module (the last block's MLP) on the last position only; other positions get zeros.

    In the last block only the last position reaches the logits, so the MLP's output elsewhere is never read:
    skipping it is exact and saves most of the last block's compute.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not registered: the module tree stays as it was

    def forward(self, x: Tensor, *args, **kwargs):
        out = self.inner(x[:, -1:], *args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        full = x.new_zeros(x.shape[:-1] + first.shape[-1:])
        full[:, -1:] = first
        return (full,) + tuple(out[1:]) if isinstance(out, tuple) else full


class prune_last_mlp:
    """Context manager swapping the last block's MLP for :class:`LastPositionOnly` (restored on exit)."""

    def __init__(self, model, enabled: bool = True):
        layer = getattr(model.blocks[-1], "original_component", None)
        self.layer = layer if enabled and layer is not None and isinstance(
            getattr(layer, "_modules", {}).get("mlp"), torch.nn.Module) else None
        self.original = None

    def __enter__(self):
        if self.layer is not None:
            self.original = self.layer._modules["mlp"]
            self.layer._modules["mlp"] = LastPositionOnly(self.original)
        return self

    def __exit__(self, *exc):
        if self.layer is not None and self.original is not None:
            self.layer._modules["mlp"] = self.original
        return False

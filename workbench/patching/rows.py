"""The row model of a patching sweep: which run each batch row patches, where, and with what.

A sweep is a list of *rows* (:class:`Rows`). Row ``r`` takes the *base* run of pair ``pair[r]`` (the corrupted
run when denoising, the clean run when noising) and replaces, at layer ``layer[r]``, the component's activation
at the positions ``pos_mask[r]`` (and heads ``head_mask[r]``) by the *source* run's activation (:class:`Patch`),
optionally only its projection on a subspace; :func:`apply_patch` is that replacement. Both engines
(:mod:`workbench.patching.engine`, :mod:`workbench.patching.hooks_engine`) patch rows with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rows:
    """The patches of a sweep, one per batch row.

    Attributes:
        pair: ``Int[Tensor, "row"]`` the pair whose base run the row patches.
        layer: ``Int[Tensor, "row"]`` the block whose component is patched.
        start: ``Int[Tensor, "row"]`` first position the patch can change (the first patched position that is
            not in the pair's shared prefix).
        pos_mask: ``Bool[Tensor, "row pos"]`` positions patched.
        head_mask: ``Bool[Tensor, "row head"]`` heads patched (``hook_z`` only), or ``None``.
    """

    pair: Tensor
    layer: Tensor
    start: Tensor
    pos_mask: Tensor
    head_mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.pair.shape[0])

    def to(self, device) -> "Rows":
        hm = None if self.head_mask is None else self.head_mask.to(device)
        return Rows(self.pair.to(device), self.layer.to(device), self.start.to(device), self.pos_mask.to(device), hm)


@dataclass
class Patch:
    """What a row writes: the source activations of ``component`` and, for subspace patching, the subspace.

    Attributes:
        component: ``resid_pre``, ``attn_out``, ``mlp_out`` or ``z``.
        source: layer -> ``Float[Tensor, "pair pos ..."]`` activations of the source run.
        read: ``Float[Tensor, "d_model k"]`` or ``None``. write: ``Float[Tensor, "d_model k"]`` or ``None``.
            With both set the patch adds ``((source - base) @ read) @ write.T`` instead of replacing the
            activation (``read = write = U`` with orthonormal ``U`` patches the projection on ``span(U)``).
    """

    component: str
    source: dict[int, Tensor]
    read: Tensor | None = None
    write: Tensor | None = None


def apply_patch(act: Tensor, src: Tensor, pos_mask: Tensor, head_mask: Tensor | None,
                read: Tensor | None = None, write: Tensor | None = None) -> Tensor:
    """Patched copy of ``act``.

    Args:
        act: ``Float[Tensor, "row pos d"]`` or ``Float[Tensor, "row pos head d_head"]`` base activations.
        src: same shape, source activations. pos_mask: ``Bool[Tensor, "row pos"]``.
        head_mask: ``Bool[Tensor, "row head"]`` or ``None``.
        read, write: ``Float[Tensor, "d k"]`` for a subspace patch (see :class:`Patch`).
    """
    src = src.to(act.dtype)
    if read is None:
        m = pos_mask.reshape(*pos_mask.shape, *([1] * (act.ndim - 2)))
        if head_mask is not None:
            m = m & head_mask[:, None, :, None]
        return torch.where(m, src, act)
    coef = (src - act).float() @ read.float()
    delta = (coef @ write.float().T).to(act.dtype)
    return act + delta * pos_mask[..., None].to(act.dtype)

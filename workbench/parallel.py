"""Data parallel work under ``torchrun``, and adaptive batching of work split into batches.

Launch any script that calls these functions with ``torchrun --nproc_per_node N script.py``: each rank loads the
model (``load_model(device=None)`` picks the rank's own GPU, ``cuda:LOCAL_RANK``; gloo on CPU-only machines),
and

* :func:`map_batches` runs a function over batches of items, batch ``i`` on rank ``i % world``, and gathers the
  results in the original order; with ``batch_size="auto"`` the batches are sized from free memory and a batch
  that runs out of memory is run in halves. Batch boundaries do not depend on the number of ranks, so the
  gathered result is the single-process result (bit for bit with a deterministic forward).
  :func:`workbench.evaluate.evaluate_distributed` and the adaptive
  :func:`workbench.evaluate.evaluate_refusal` run on it, passing the evaluation of one batch as the function.
* the activation store (:func:`workbench.store.get_or_compute`) spreads its shards over the ranks in the
  same way and writes one entry; it uses :func:`dist_context` from here.

Without ``torchrun`` everything runs in the one process. This module imports no stage: the stages import it.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .batching import OOMBackoff, auto_batch_size, check_batch_size, length_cuts
from .progress import progress

log = logging.getLogger("workbench.parallel")

T = TypeVar("T")
R = TypeVar("R")


def dist_context():
    """``(rank, world_size, torch.distributed or None)``.

    Uses the initialised process group if there is one; under ``torchrun`` (``WORLD_SIZE > 1`` and ``MASTER_ADDR``
    set) without one, initialises a gloo group (works on CPU and for the small objects exchanged here). Outside
    ``torchrun``: ``(0, 1, None)``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, None
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), (dist if dist.get_world_size() > 1 else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")
        # the group this module created is also torn down by it: left to interpreter exit, gloo's threads are
        # destroyed while joinable and a rank aborts ("terminate called without an active exception") at random
        atexit.register(_destroy_group)
        log.info("initialised a gloo process group (rank %d of %d)", dist.get_rank(), world)
        return dist.get_rank(), world, dist
    return 0, 1, None


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device() -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` (modulo the visible GPUs) when CUDA is available, else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def map_batches(
    fn: Callable[[Sequence[T]], R],
    items: Sequence[T],
    batch_size: int | str | None,
    model,
    seq_len: Callable[[], int],
    new_tokens: int = 0,
    rank: int = 0,
    world: int = 1,
    dist=None,
    show_progress: bool = True,
    desc: str = "",
    lengths: Sequence[int] | None = None,
) -> list[R]:
    """``fn`` over batches of ``items``, this rank taking batches ``rank, rank + world, ...``; every rank gets all
    results, in order (one per batch, or more for a batch run in halves).

    Args:
        batch_size: an int (taken literally), or ``"auto"``/``None``: sized by
            :func:`workbench.batching.auto_batch_size` for ``seq_len()`` tokens (called only then) and ``new_tokens``
            generated ones, the smallest guess of all ranks used by all, and a batch that runs out of memory run in
            halves on its rank (:class:`workbench.batching.OOMBackoff`).
        dist: ``torch.distributed`` when ``world > 1`` (from :func:`dist_context`), else ``None``.
        show_progress: a progress bar over this rank's batches (rank 0 only).
        lengths: the items' token lengths, ascending: batches are then cut by :func:`workbench.batching.length_cuts`
            (at most the batch size, and at most :data:`~workbench.batching.MAX_BATCH_TOKENS` padded tokens).
    """
    fixed = check_batch_size(batch_size)
    if fixed is None:
        size = auto_batch_size(model, seq_len(), n_rows=len(items), new_tokens=new_tokens)
        if dist is not None:  # every rank must cut the same batches: take the smallest guess
            sizes = [None] * world
            dist.all_gather_object(sizes, size)
            size = min(sizes)
    else:
        size = fixed
    backoff = OOMBackoff(size, enabled=fixed is None)
    cuts = (length_cuts(lengths, size) if lengths is not None
            else [(s, min(s + size, len(items))) for s in range(0, len(items), size)])
    mine = cuts[rank::world]
    parts: list[tuple[int, list[R]]] = []
    for a, b in progress(mine, desc, show_progress and rank == 0, total=len(mine)):
        parts.append((a, backoff.map(fn, items[a:b])))
    if dist is not None:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
    return [r for _, pieces in parts for r in pieces]


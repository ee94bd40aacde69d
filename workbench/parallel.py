"""Data parallel work under ``torchrun``, and adaptive batching of refusal evaluations.

Launch any script that calls these functions with ``torchrun --nproc_per_node N script.py``: each rank loads the
model (``load_model(device=None)`` picks the rank's own GPU, ``cuda:LOCAL_RANK``; gloo on CPU-only machines),
and

* :func:`evaluate_distributed` splits the prompts into batches, runs batch ``i`` on rank ``i % world`` and gathers
  the per-prompt table (and log-probs) in the original order. Batch boundaries do not depend on the number of
  ranks, so the gathered table is the single-process table (bit for bit with a deterministic forward).
* the activation store (:func:`workbench.store.get_or_compute`) already spreads its shards over the ranks in the
  same way and writes one entry; it uses :func:`dist_context` from here.

Without ``torchrun`` everything runs in the one process.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from .batching import OOMBackoff, auto_batch_size, check_batch_size
from .errors import WorkbenchError
from .progress import progress

log = logging.getLogger("workbench.parallel")


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


def _group(chunk: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """``[(category, prompt), ...]`` -> ``{category: [prompt, ...]}`` keeping the order (chunks are category-sorted)."""
    out: dict[str, list[str]] = {}
    for cat, p in chunk:
        out.setdefault(cat, []).append(p)
    return out


def _merge(parts: list, keep_logprobs: bool):
    """Concatenate :class:`~workbench.evaluate.Evaluation` parts in order (table attrs from the first part)."""
    from .evaluate import Evaluation

    table = pd.concat([p.table for p in parts], ignore_index=True)
    table.attrs = dict(parts[0].table.attrs)
    logprobs = torch.cat([p.logprobs for p in parts]) if keep_logprobs else None
    return Evaluation(table, logprobs)


def _evaluate_sharded(model, prompt_sets: Mapping[str, Sequence[str]], batch_size, rank: int, world: int, dist,
                      show_progress: bool, kwargs: dict):
    """Batches of ``batch_size`` jobs; this rank runs batches ``rank, rank + world, ...``; parts gathered in order."""
    from .evaluate import evaluate_refusal

    if not prompt_sets or all(len(v) == 0 for v in prompt_sets.values()):
        raise WorkbenchError("evaluate_refusal needs at least one non-empty prompt set")
    jobs = [(cat, p) for cat, ps in prompt_sets.items() for p in ps]
    fixed = check_batch_size(batch_size)
    if fixed is None:
        from .chat import tokenize_chat

        width = int(tokenize_chat(model.tokenizer, [p for _, p in jobs], kwargs.get("system")).input_ids.shape[1])
        size = auto_batch_size(model, width, n_rows=len(jobs), new_tokens=int(kwargs.get("max_new_tokens", 24)))
        if dist is not None:  # every rank must cut the same batches: take the smallest guess
            sizes = [None] * world
            dist.all_gather_object(sizes, size)
            size = min(sizes)
    else:
        size = fixed
    if "judge" in kwargs and kwargs["judge"] is not None:  # resolve a named judge once, not once per batch
        from . import judge as _judge

        if hasattr(_judge, "get_judge"):
            kwargs = {**kwargs, "judge": _judge.get_judge(kwargs["judge"])}
    keep = bool(kwargs.get("keep_logprobs", False))
    backoff = OOMBackoff(size, enabled=fixed is None)
    starts = list(range(0, len(jobs), size))
    mine = starts[rank::world]
    parts: list[tuple[int, object]] = []
    for s in progress(mine, "evaluate", show_progress and rank == 0, total=len(mine)):
        pieces = backoff.map(
            lambda sub: evaluate_refusal(model, _group(sub), batch_size=len(sub), show_progress=False, **kwargs),
            jobs[s:s + size],
        )
        parts.append((s, _merge(pieces, keep)))
    if dist is not None:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
    return _merge([p for _, p in parts], keep)


def evaluate_adaptive(model, prompt_sets: Mapping[str, Sequence[str]], batch_size="auto", show_progress: bool = True,
                      **kwargs):
    """:func:`~workbench.evaluate.evaluate_refusal` with ``batch_size="auto"``: batches sized by
    :func:`workbench.batching.auto_batch_size`, halved on out-of-memory (one process)."""
    return _evaluate_sharded(model, prompt_sets, batch_size, 0, 1, None, show_progress, kwargs)


def _fingerprint_jobs(prompt_sets: Mapping[str, Sequence[str]]) -> str:
    return hashlib.sha256(json.dumps([[k, list(v)] for k, v in prompt_sets.items()]).encode()).hexdigest()[:16]


def evaluate_distributed(model, prompt_sets: Mapping[str, Sequence[str]], batch_size: int | str | None = 32,
                         show_progress: bool = True, **kwargs):
    """:func:`~workbench.evaluate.evaluate_refusal` spread over the ``torchrun`` ranks.

    Every rank must call it with the same prompts and an equal model. The jobs (category, prompt) are cut into
    batches of ``batch_size`` exactly as ``evaluate_refusal`` cuts them; rank ``r`` generates batches
    ``r, r + world, ...`` and the parts are gathered (gloo or NCCL, whichever group is initialised) in the
    original order. Outside ``torchrun`` this is ``evaluate_refusal`` in one process.

    Args:
        batch_size: an int, or ``"auto"``/``None`` (each rank guesses from its free memory, the smallest guess is
            used by all, and a batch that runs out of memory is generated in halves on that rank).
        **kwargs: the other arguments of ``evaluate_refusal`` (``max_new_tokens``, ``fwd_hooks``, ``plan``,
            ``system``, ``keep_logprobs``, ``judge``...).

    Returns:
        The full :class:`~workbench.evaluate.Evaluation` on every rank (the table of all prompts, in order).

    Raises:
        WorkbenchError: empty prompt sets, a bad batch size, or ranks holding different prompts.
    """
    rank, world, dist = dist_context()
    if dist is not None:
        seen: list = [None] * world
        dist.all_gather_object(seen, _fingerprint_jobs(prompt_sets))
        if len(set(seen)) != 1:
            raise WorkbenchError(f"ranks hold different prompt sets (fingerprints {seen}); pass the same prompts on every rank")
    return _evaluate_sharded(model, prompt_sets, batch_size, rank, world, dist, show_progress, kwargs)

"""The ``"resume"`` engine's cost model: what one block call costs, and the plan that minimises the total.

A block call costs its positions' compute plus a fixed overhead (Python, hooks, kernel launches).
:func:`measure_block_overhead` expresses that overhead in token-positions of compute, from timings of the base
run; :func:`plan_resume` groups the rows into block calls so that ``compute + overhead x calls`` is smallest.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..models import model_device
from .capture import Run, sync
from .hf_blocks import resume_kwargs
from .rows import Rows


@torch.no_grad()
def measure_block_overhead(model, run: Run, reps: int = 3) -> float:
    """How many token-positions of compute one block call's fixed overhead is worth (Python, hooks, kernels).

    Times block 0 on every pair at one position and at all positions (medians), growing the second batch up to
    ~1k positions while overhead still dominates it; the planner uses the ratio to decide how many start
    positions to merge into one block call. Cached on ``run``.
    """
    if run.block_overhead_tokens is not None:
        return run.block_overhead_tokens
    n, t = int(run.tokens.shape[0]), run.n_pos
    n_layers = int(model.cfg.n_layers)
    if run.forward_seconds and run.small_block_seconds:
        # free estimate from timings already taken: the captured forward (n x t positions per block) and
        # the self-check (a few positions per block); measured afresh only when they are not conclusive
        small, big = run.small_block_seconds, run.forward_seconds / n_layers
        if big >= 2 * small:
            per_token = (big - small) / (n * t)
            run.block_overhead_tokens = float(min(max(small / per_token, 1.0), 4096.0))
        else:  # overhead-bound even on the whole batch: a block call is worth at least ~that many positions
            run.block_overhead_tokens = float(min(max(2.0 * n * t * small / max(big, 1e-9), 1.0), 4096.0))
        return run.block_overhead_tokens
    dev = model_device(model)

    def timed(start: int, copies: int = 1, n_reps: int = reps) -> float:
        pairs = torch.arange(n, device=dev).repeat(copies)
        h = run.resid_pre(0)[pairs, start:]
        kwargs = resume_kwargs(run, 0, pairs, start)
        times = []
        for _ in range(n_reps):
            sync(dev)
            t0 = time.perf_counter()
            model.blocks[0](h, **kwargs)
            sync(dev)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    small = timed(t - 1)
    copies = 1
    big = timed(0, copies, 2)
    # grow the timed batch until compute, not overhead, dominates it (small models), up to ~1k positions;
    # if it never does, the overhead is at least that many positions' worth of compute
    while big < 2 * small and n * t * copies * 4 <= 1024:
        copies *= 4
        big = timed(0, copies, 2)
    positions = n * t * copies
    per_token = max(big - small, 1e-9) / positions
    run.block_overhead_tokens = float(min(max(small / per_token, 1.0), 4.0 * max(positions, 1024)))
    return run.block_overhead_tokens


def plan_resume(rows: Rows, n_pos: int, n_layers: int, overhead_tokens: float, max_tokens: int
                ) -> list[tuple[int, Tensor]]:
    """Chunks ``(start, row ids sorted by layer)`` for the ``"resume"`` engine.

    Rows are grouped by start position; neighbouring groups are merged (computing the later groups from the
    earlier start, which recomputes unchanged positions: still exact) when that saves more block-call
    overhead than it costs in compute. Dynamic programming over the sorted start positions minimises
    ``token_layers + overhead_tokens * block_calls``; groups are then split to ``max_tokens`` per call.
    """
    starts = rows.start.cpu()
    layer = rows.layer.cpu()
    uniq = torch.unique(starts).tolist()
    k = len(uniq)
    # per distinct start: sum over rows of (n_layers - layer), row count, min layer
    work = [0.0] * k
    count = [0] * k
    low = [n_layers] * k
    pos_of = {s: i for i, s in enumerate(uniq)}
    for s, l in zip(starts.tolist(), layer.tolist()):
        i = pos_of[s]
        work[i] += n_layers - l
        count[i] += 1
        low[i] = min(low[i], l)
    best = [0.0] + [float("inf")] * k
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        w, c, lo = 0.0, 0, n_layers
        for i in range(j, 0, -1):          # group = distinct starts i-1 .. j-1, computed from uniq[i-1]
            w += work[i - 1]
            c += count[i - 1]
            lo = min(lo, low[i - 1])
            width = n_pos - uniq[i - 1]
            calls = (n_layers - lo) * max(1, -(-c * width // max_tokens))
            cost = best[i - 1] + w * width + overhead_tokens * calls
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups = []
    j = k
    while j > 0:
        i = cut[j]
        groups.append((uniq[i], uniq[i:j]))
        j = i
    out = []
    for start, members in reversed(groups):
        sel = torch.isin(starts, torch.as_tensor(members))
        idx = torch.nonzero(sel).flatten()
        idx = idx[torch.argsort(layer[idx], stable=True)]
        per = max(1, max_tokens // max(1, n_pos - int(start)))
        out.extend((int(start), idx[c:c + per].to(rows.pair.device)) for c in range(0, len(idx), per))
    return out

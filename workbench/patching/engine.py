"""The batched patch engine: many patches per forward, each riding in its own batch row.

A sweep is a list of rows (:mod:`workbench.patching.rows`): row ``r`` patches the base run of pair ``pair[r]``
at layer ``layer[r]`` and positions ``pos_mask[r]`` with the source run's activation. :func:`run_rows` returns
the metric of every row. Two engines compute exactly the same thing:

* ``"resume"`` (the default, this module). Everything upstream of the patch equals the base run, so a row is
  resumed from the base run (:mod:`workbench.patching.capture`) instead of recomputed: it enters the stack at
  block ``layer[r]`` with the base run's ``resid_pre``, and only positions ``start[r]`` onward are computed, the
  keys and values of earlier positions coming from the base run's KV cache (they are unchanged, by causality;
  :mod:`workbench.patching.hf_blocks`). Rows are grouped by start position and sorted by layer, so at block
  ``j`` the batch holds every row that has entered by then: a whole (layer x position) sweep costs
  ``n_pos x n_layers`` block calls on growing batches instead of ``n_pos x n_layers`` full forwards; how start
  positions are merged into block calls is planned by :mod:`workbench.patching.cost_model`. Blocks run through
  the bridge (every hook fires); before use, the engine checks it reproduces the base run's logits
  (:func:`check_resume`), and falls back to ``"hooks"`` if it does not.
* ``"hooks"`` (:mod:`workbench.patching.hooks_engine`): plain forwards of the bridge on a batch of base prompts
  with one hook per layer that patches the rows of that layer (the TransformerLens recipe, batched).

Positions before the first token where a pair's clean and corrupted prompts differ carry identical
activations in both runs, so patching them is a no-op; the row builders skip those rows and report the
base metric for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..fallbacks import warn_fallback
from ..models import model_device
from ..progress import progress
from ..provenance import describe_versions
from .capture import Run, sync
from .cost_model import measure_block_overhead, plan_resume
from .hf_blocks import UnsupportedBlock, final_logits, prune_last_mlp, resume_kwargs
from .hooks_engine import run_hooks_engine
from .rows import Patch, Rows, apply_patch
from .sites import hook_name

__all__ = ["DEFAULT_MAX_TOKENS", "ENGINES", "check_resume", "run_rows"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "resume", "hooks")

#: Default budget of (rows x positions) per block call.
DEFAULT_MAX_TOKENS = 8192


class _SiteState:
    """Which rows enter at the current block, for the site hooks of the ``"resume"`` engine."""

    def __init__(self):
        self.layer = -1
        self.n0 = 0
        self.ids: Tensor | None = None
        self.pairs: Tensor | None = None
        self.start = 0


def _site_hooks(patch: Patch, rows: Rows, state: _SiteState, layers: Sequence[int]) -> list[tuple[str, Callable]]:
    """Hooks that patch the rows entering at the current block. Positions are aligned from the right, so the
    hooks also work where only the last positions are computed (the last block's MLP, see
    :class:`~workbench.patching.hf_blocks.LastPositionOnly`)."""
    hooks = []
    for layer in layers:
        def fn(act, hook, layer=layer):
            if state.layer != layer or state.ids is None:
                return act
            n0 = state.n0
            source = patch.source[layer]
            cut = int(source.shape[1]) - int(act.shape[1])
            src = source[state.pairs][:, cut:]
            hm = rows.head_mask[state.ids] if rows.head_mask is not None else None
            new = apply_patch(act[n0:], src, rows.pos_mask[state.ids][:, cut:], hm, patch.read, patch.write)
            return torch.cat([act[:n0], new]) if n0 > 0 else new
        hooks.append((hook_name(patch.component, layer), fn))
    return hooks


@torch.no_grad()
def _resume_chunk(model, run: Run, patch: Patch | None, rows: Rows, ids: Tensor, start: int,
                  state: _SiteState, prune: bool = True) -> Tensor:
    """Logits ``Float[Tensor, "row d_vocab"]`` of the rows ``ids`` (sorted by layer, all starting at ``start``)."""
    n_layers = int(model.cfg.n_layers)
    layers = rows.layer[ids]
    pairs = rows.pair[ids]
    h: Tensor | None = None
    for j in range(int(layers[0]), n_layers):
        n0 = int(torch.searchsorted(layers, j, right=False))
        n1 = int(torch.searchsorted(layers, j, right=True))
        if n1 > n0:
            enter = run.resid_pre(j)[pairs[n0:n1], start:]
            if patch is not None and patch.component == "resid_pre":
                enter = apply_patch(enter, patch.source[j][pairs[n0:n1]][:, start:],
                                    rows.pos_mask[ids[n0:n1]][:, start:], None, patch.read, patch.write)
            h = enter if h is None else torch.cat([h, enter])
            state.layer, state.n0, state.ids, state.pairs, state.start = j, n0, ids[n0:n1], pairs[n0:n1], start
        else:
            state.layer, state.ids = -1, None
        kwargs = resume_kwargs(run, j, pairs[:n1], start)
        with prune_last_mlp(model, enabled=prune and j == n_layers - 1 and h.shape[1] > 1):
            out = model.blocks[j](h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    state.layer, state.ids = -1, None
    assert h is not None
    return final_logits(model, h)


def check_resume(model, run: Run) -> bool:
    """Whether the ``"resume"`` engine reproduces the base run (one row per pair, last position only)."""
    if run.resume_ok is not None:
        return run.resume_ok
    ok, err, why = False, float("nan"), "the base run kept no KV cache"
    if run.kv is not None and run.block_kwargs is not None:
        n = int(run.tokens.shape[0])
        t = run.n_pos
        dev = model_device(model)
        s0 = max(0, t - 3)
        rows = Rows(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.full((n,), s0),
                    torch.zeros(n, t, dtype=torch.bool)).to(dev)
        try:
            sync(dev)
            t0 = time.perf_counter()
            logits = _resume_chunk(model, run, None, rows, torch.arange(n, device=dev), s0, _SiteState())
            sync(dev)
            run.small_block_seconds = (time.perf_counter() - t0) / max(1, int(model.cfg.n_layers))
            ref = run.logits_last
            err = float((logits - ref).abs().max())
            half = run.resid_pre(0).dtype in (torch.float16, torch.bfloat16)
            tol = (3e-2 if half else 1e-3) * max(1.0, float(ref.abs().max()))
            ok = err <= tol  # False for a NaN difference too
            why = f"it does not reproduce the base run (max abs logit diff {err:.3g}, tolerance {tol:.3g})"
        except UnsupportedBlock as exc:
            why = f"it is unavailable ({exc})"
        except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: use the hooks engine
            why = f"its self-check failed ({type(exc).__name__}: {exc})"
    if not ok:
        warn_fallback(log, "patching_engine", "resume engine not used: %s; using the slower hooks engine (%s)",
                      why, describe_versions())
    run.resume_reason = None if ok else why
    run.resume_ok, run.resume_error = ok, err
    return ok


@torch.no_grad()
def run_rows(model, run: Run, patch: Patch, rows: Rows, metric: Callable[[Tensor], Tensor],
             engine: str = "auto", max_tokens: int = DEFAULT_MAX_TOKENS, show_progress: bool = True) -> Tensor:
    """Metric of every patched row, ``Float[Tensor, "row"]`` (on CPU).

    Args:
        run: the base run (:func:`~workbench.patching.capture.capture_run`, ``resumable=True`` for the ``"resume"`` engine).
        patch: the source activations (and subspace) to write.
        rows: one patch per row (:class:`Rows`).
        metric: last-position logits ``Float[Tensor, "row d_vocab"]`` -> ``Float[Tensor, "row"]``.
        engine: ``"auto"`` (``"resume"`` when its self-check passes, else ``"hooks"``), ``"resume"`` or ``"hooks"``.
        max_tokens: rows x positions per block call (memory budget).
    """
    if engine not in ENGINES:
        raise WorkbenchError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if len(rows) == 0:
        return torch.empty(0)
    rows = rows.to(model_device(model))
    use_resume = engine != "hooks" and check_resume(model, run)
    if engine == "resume" and not use_resume:
        raise WorkbenchError(
            "the 'resume' engine does not reproduce this model's forward pass "
            f"({run.resume_reason}); use engine='hooks' or 'auto'"
        )
    if not use_resume:
        return run_hooks_engine(model, run, patch, rows, metric, max_tokens, show_progress)
    overhead = measure_block_overhead(model, run)
    chunks = plan_resume(rows, run.n_pos, int(model.cfg.n_layers), overhead, max_tokens)
    out = torch.empty(len(rows))
    state = _SiteState()
    hooks = [] if patch.component == "resid_pre" else _site_hooks(
        patch, rows, state, sorted(set(rows.layer.tolist())))
    with model.hooks(fwd_hooks=hooks):
        for start, ids in progress(chunks, "patch", show_progress, total=len(chunks)):
            logits = _resume_chunk(model, run, patch, rows, ids, start, state)
            out[ids.cpu()] = metric(logits).detach().float().cpu()
    return out

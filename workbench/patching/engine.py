"""The batched patch engine: many patches per forward, each riding in its own batch row.

A sweep is a list of *rows*. Row ``r`` takes the *base* run of pair ``pair[r]`` (the corrupted run when
denoising, the clean run when noising) and replaces, at layer ``layer[r]``, the component's activation at the
positions ``pos_mask[r]`` (and heads ``head_mask[r]``) by the *source* run's activation (optionally only its
projection on a subspace). The engine returns the metric of every row.

Two engines compute exactly the same thing:

* ``"resume"`` (the default). Everything upstream of the patch equals the base run, so a row is resumed
  from the base run instead of recomputed: it enters the stack at block ``layer[r]`` with the base run's
  ``resid_pre``, and only positions ``start[r]`` onward are computed, the keys and values of earlier
  positions coming from the base run's KV cache (they are unchanged, by causality). Rows are grouped by start
  position and sorted by layer, so at block ``j`` the batch holds every row that has entered by then: a whole
  (layer x position) sweep costs ``n_pos x n_layers`` block calls on growing batches instead of
  ``n_pos x n_layers`` full forwards. Blocks run through the bridge (every hook fires); before use, the
  engine checks it reproduces the base run's logits, and falls back to ``"hooks"`` if it does not.
* ``"hooks"``: plain forwards of the bridge on a batch of base prompts with one hook per layer that
  patches the rows of that layer (the TransformerLens recipe, batched).

Positions before the first token where a pair's clean and corrupted prompts differ carry identical
activations in both runs, so patching them is a no-op; the row builders skip those rows and report the
base metric for them.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..fallbacks import warn_fallback
from ..models import model_device
from ..progress import progress
from ..provenance import describe_versions
from .sites import hook_name

log = logging.getLogger(__name__)

ENGINES = ("auto", "resume", "hooks")

#: Default budget of (rows x positions) per block call.
DEFAULT_MAX_TOKENS = 8192


@dataclass
class Run:
    """One unpatched forward and what the engines need to resume it at any block.

    Attributes:
        tokens: ``Int[Tensor, "batch pos"]``. attention_mask: ``Int[Tensor, "batch pos"]`` or ``None``.
        logits_last: ``Float[Tensor, "batch d_vocab"]`` next-token logits at the last position.
        acts: hook name -> activation, ``Float[Tensor, "batch pos ..."]`` (``resid_pre`` of every layer,
            plus whatever was asked for).
        block_kwargs: per block, the keyword arguments it received (mask, rotary embeddings...), or ``None``.
        kv: per block, the post-RoPE ``(keys, values)`` it cached, ``Float[Tensor, "batch kv_head pos d_head"]``,
            or ``None`` when the model exposes no KV cache (the ``"resume"`` engine is then unavailable).
    """

    tokens: Tensor
    attention_mask: Tensor | None
    logits_last: Tensor
    acts: dict[str, Tensor]
    block_kwargs: list[dict] | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None
    resume_ok: bool | None = None  # set by the engine's self-check
    resume_reason: str | None = None  # why the self-check failed (the fallback reported to the user)
    resume_error: float | None = None
    block_overhead_tokens: float | None = None  # cost of one block call, in token-positions of compute
    forward_seconds: float | None = None         # wall time of the captured forward
    small_block_seconds: float | None = None     # wall time of one block call on a few positions (self-check)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    def resid_pre(self, layer: int) -> Tensor:
        return self.acts[hook_name("resid_pre", layer)]


def _mask_arg(attention_mask: Tensor | None) -> Tensor | None:
    """Pass a mask only when some row is padded (an all-ones mask changes nothing but the code path)."""
    if attention_mask is None or bool((attention_mask != 0).all()):
        return None
    return attention_mask


@torch.no_grad()
def capture_run(model, tokens: Tensor, attention_mask: Tensor | None, hook_names: Sequence[str] = (),
                resumable: bool = True) -> Run:
    """Run the model once and keep the last-position logits and the activations at ``hook_names``.

    With ``resumable`` the run also keeps ``resid_pre`` of every block, the keyword arguments every block
    received and the KV cache, so the ``"resume"`` engine can restart it at any block and position.

    Args:
        tokens: ``Int[Tensor, "batch pos"]`` (left-padded). attention_mask: ``Int[Tensor, "batch pos"]``.
    """
    n_layers = int(model.cfg.n_layers)
    names = set(hook_names)
    if resumable:
        names |= {hook_name("resid_pre", j) for j in range(n_layers)}
    acts: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(act, hook):
            acts[name] = act.detach().clone()
            return act
        return keep

    kwargs_seen: list[dict | None] = [None] * n_layers
    logits = None
    handles = []
    if resumable:
        for j, block in enumerate(model.blocks):
            def pre(mod, args, kwargs, j=j):
                named = _named_positional(mod, args)
                kwargs_seen[j] = None if named is None else {**named, **kwargs}
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    mask = _mask_arg(attention_mask)
    t0 = time.perf_counter()
    try:
        with model.hooks(fwd_hooks=[(n, keeper(n)) for n in sorted(names)]):
            cache = None
            if resumable:
                try:
                    logits, cache = model(tokens, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
                except (TypeError, ValueError, NotImplementedError, RuntimeError) as exc:
                    log.info("no KV cache from this model (%s); the 'resume' engine is unavailable", exc)
                    acts.clear()
                    logits = None
            if logits is None:
                logits = model(tokens, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(names - set(acts))
    if missing:
        raise WorkbenchError(f"the model exposes no hook {missing[0]!r} (and {len(missing) - 1} more); "
                             "is it a TransformerBridge over a decoder-only model?")
    run = Run(tokens, attention_mask, logits[:, -1].float(), acts)
    _sync(tokens.device)
    run.forward_seconds = time.perf_counter() - t0
    if resumable:
        kv = _kv_from_cache(cache, n_layers)
        if kv is not None and all(k is not None for k in kwargs_seen):
            run.block_kwargs = kwargs_seen  # type: ignore[assignment]
            run.kv = kv
    return run


def _named_positional(block, args: tuple) -> dict | None:
    """The positional arguments a block received after the hidden states, named after the wrapped HF block's
    ``forward`` signature (``None`` if they cannot be named).

    Some models pass the KV cache and the attention mask positionally (GPT-2: ``block(hidden_states,
    past_key_values, causal_mask, encoder_hidden_states, ...)``); a resumed block call must get them too.
    """
    if len(args) <= 1:
        return {}
    target = getattr(block, "original_component", None) or block
    try:
        params = list(inspect.signature(target.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if len(args) - 1 > len(names):
        return None
    return dict(zip(names, args[1:]))


def _kv_from_cache(cache, n_layers: int) -> list[tuple[Tensor, Tensor]] | None:
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) < n_layers:
        return None
    out = []
    for j in range(n_layers):
        k, v = getattr(layers[j], "keys", None), getattr(layers[j], "values", None)
        if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.ndim != 4:
            return None
        out.append((k.detach(), v.detach()))
    return out


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


class _PrefixKV:
    """A stand-in KV cache holding the base run's keys/values of positions ``< start`` for one block."""

    def __init__(self, keys: Tensor | None, values: Tensor | None):
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int = 0, *args, **kwargs):
        if self.keys is None or self.keys.shape[-2] == 0:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])


class _Unsupported(Exception):
    pass


def _select(x: Tensor, pairs: Tensor, batch: int) -> Tensor:
    """Rows ``pairs`` of a per-pair tensor; a batch-1 tensor broadcasts and is kept as is."""
    return x[pairs] if x.shape[0] == batch and batch > 1 else x


def _resume_kwargs(run: Run, j: int, pairs: Tensor, start: int) -> dict:
    """Block ``j``'s keyword arguments for the rows ``pairs``, restricted to query positions ``start:``."""
    assert run.block_kwargs is not None and run.kv is not None
    batch, n_pos = run.tokens.shape
    out = {}
    for key, val in run.block_kwargs[j].items():
        if key in ("past_key_values", "past_key_value", "layer_past"):
            k, v = run.kv[j]
            out[key] = _PrefixKV(k[pairs, :, :start], v[pairs, :, :start])
        elif key == "attention_mask":
            if val is None:
                out[key] = None
            elif isinstance(val, Tensor) and val.ndim == 4:
                out[key] = _select(val, pairs, batch)[:, :, start:, :]
            elif isinstance(val, Tensor) and val.ndim == 2:
                out[key] = _select(val, pairs, batch)
            else:
                raise _Unsupported(f"attention_mask of shape {getattr(val, 'shape', None)}")
        elif key == "position_embeddings" and isinstance(val, tuple):
            out[key] = tuple(_select(t, pairs, batch)[..., start:, :] for t in val)
        elif key == "position_ids" and isinstance(val, Tensor):
            out[key] = _select(val, pairs, batch)[..., start:]
        elif key == "cache_position" and isinstance(val, Tensor):
            out[key] = val[start:]
        elif isinstance(val, Tensor) or (isinstance(val, (tuple, list)) and any(isinstance(t, Tensor) for t in val)):
            raise _Unsupported(f"block keyword {key!r}")
        else:
            out[key] = val
    return out


def _final_logits(model, h: Tensor) -> Tensor:
    """``Float[Tensor, "row d_vocab"]`` logits from the last block's output ``Float[Tensor, "row pos d"]``."""
    logits = model.unembed(model.ln_final(h[:, -1:, :]))[:, -1]
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


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
    hooks also work where only the last positions are computed (the last block's MLP, see :class:`_LastPositionOnly`)."""
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


class _LastPositionOnly(torch.nn.Module):
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


class _prune_last_mlp:
    """Context manager swapping the last block's MLP for :class:`_LastPositionOnly` (restored on exit)."""

    def __init__(self, model, enabled: bool = True):
        layer = getattr(model.blocks[-1], "original_component", None)
        self.layer = layer if enabled and layer is not None and isinstance(
            getattr(layer, "_modules", {}).get("mlp"), torch.nn.Module) else None
        self.original = None

    def __enter__(self):
        if self.layer is not None:
            self.original = self.layer._modules["mlp"]
            self.layer._modules["mlp"] = _LastPositionOnly(self.original)
        return self

    def __exit__(self, *exc):
        if self.layer is not None and self.original is not None:
            self.layer._modules["mlp"] = self.original
        return False


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
        kwargs = _resume_kwargs(run, j, pairs[:n1], start)
        with _prune_last_mlp(model, enabled=prune and j == n_layers - 1 and h.shape[1] > 1):
            out = model.blocks[j](h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    state.layer, state.ids = -1, None
    assert h is not None
    return _final_logits(model, h)


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
            _sync(dev)
            t0 = time.perf_counter()
            logits = _resume_chunk(model, run, None, rows, torch.arange(n, device=dev), s0, _SiteState())
            _sync(dev)
            run.small_block_seconds = (time.perf_counter() - t0) / max(1, int(model.cfg.n_layers))
            ref = run.logits_last
            err = float((logits - ref).abs().max())
            half = run.resid_pre(0).dtype in (torch.float16, torch.bfloat16)
            tol = (3e-2 if half else 1e-3) * max(1.0, float(ref.abs().max()))
            ok = err <= tol  # False for a NaN difference too
            why = f"it does not reproduce the base run (max abs logit diff {err:.3g}, tolerance {tol:.3g})"
        except _Unsupported as exc:
            why = f"it is unavailable ({exc})"
        except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: use the hooks engine
            why = f"its self-check failed ({type(exc).__name__}: {exc})"
    if not ok:
        warn_fallback(log, "patching_engine", "resume engine not used: %s; using the slower hooks engine (%s)",
                      why, describe_versions())
    run.resume_reason = None if ok else why
    run.resume_ok, run.resume_error = ok, err
    return ok


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        kwargs = _resume_kwargs(run, 0, pairs, start)
        times = []
        for _ in range(n_reps):
            _sync(dev)
            t0 = time.perf_counter()
            model.blocks[0](h, **kwargs)
            _sync(dev)
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


@torch.no_grad()
def _run_hooks_engine(model, run: Run, patch: Patch, rows: Rows, metric, max_tokens: int, show: bool) -> Tensor:
    n_pos = run.n_pos
    per = max(1, max_tokens // n_pos)
    order = torch.argsort(rows.layer, stable=True)
    out = torch.empty(len(rows))
    mask_all = _mask_arg(run.attention_mask)
    for c in progress(range(0, len(rows), per), "patch (hooks)", show, total=-(-len(rows) // per)):
        ids = order[c:c + per]
        pairs = rows.pair[ids]
        layers = rows.layer[ids]
        hooks = []
        for layer in torch.unique(layers).tolist():
            sel = torch.nonzero(layers == layer).flatten()

            def fn(act, hook, layer=layer, sel=sel):
                act = act.clone()
                hm = rows.head_mask[ids[sel]] if rows.head_mask is not None else None
                act[sel] = apply_patch(act[sel], patch.source[layer][pairs[sel]], rows.pos_mask[ids[sel]], hm,
                                       patch.read, patch.write)
                return act
            hooks.append((hook_name(patch.component, layer), fn))
        mask = None if mask_all is None else mask_all[pairs]
        with model.hooks(fwd_hooks=hooks):
            logits = model(run.tokens[pairs], attention_mask=mask)
        out[ids.cpu()] = metric(logits[:, -1].float()).detach().float().cpu()
    return out


@torch.no_grad()
def run_rows(model, run: Run, patch: Patch, rows: Rows, metric: Callable[[Tensor], Tensor],
             engine: str = "auto", max_tokens: int = DEFAULT_MAX_TOKENS, show_progress: bool = True) -> Tensor:
    """Metric of every patched row, ``Float[Tensor, "row"]`` (on CPU).

    Args:
        run: the base run (:func:`capture_run`, ``resumable=True`` for the ``"resume"`` engine).
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
        return _run_hooks_engine(model, run, patch, rows, metric, max_tokens, show_progress)
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

"""Capturing a base run: one unpatched forward, kept so that the patch engines can resume it at any block.

:func:`capture_run` keeps the last-position logits, the activations at the requested hooks and, for the
``"resume"`` engine, ``resid_pre`` of every block, the keyword arguments every block received and the KV cache
(:class:`Run`). It also times the forward (:func:`sync` makes wall-clock timings honest on CUDA), which the
resume engine's cost model (:mod:`workbench.patching.cost_model`) reuses.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WorkbenchError
from .sites import hook_name

log = logging.getLogger(__name__)


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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings measure it (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
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
    mask = padding_mask(attention_mask)
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
    sync(tokens.device)
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

"""Clean prompt prefills computed once and shared by every steered evaluation of the same prompts.

Every steering plan of this project edits the residual stream at the last position only
(:mod:`workbench.steering.hooks`): in the prefill that is the last prompt token, then each generated token. So
everything before the last prompt token -- its keys and values in every layer -- is the same under every plan,
every ``α`` and every controller, and so are the clean activations a controller or a CAST gate reads. A sweep that
evaluates the same validation prompts under 29 operating points used to prefill them 29 times; with a
:class:`PrefixCache` it prefills them once, and each evaluation runs the last prompt token and the reply.
On the real data preset (jailbreaks up to 1,300 tokens, replies of 16) that is most of the steering stage's cost.

The cached prefix is exact: one clean forward of the whole prompt with the position ids Hugging Face ``generate``
uses for left padding (:func:`workbench.chat.positions_from_mask`), its keys and values cut before the last prompt
token, handed to ``generate`` as ``past_key_values`` (tested equal token for token to a prefill from scratch, with
and without steering). Only valid when nothing else edits the prompt's earlier positions: ``evaluate_refusal``
refuses a prefix cache together with ``fwd_hooks``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .chat import ChatBatch, positions_from_mask
from .fallbacks import warn_fallback
from .models import model_device
from .vocab import hook_name

log = logging.getLogger("workbench.prefix")

#: the share of the free memory of the model's device (RAM on the CPU) a :class:`PrefixCache` may fill by default;
#: beyond it a batch is prefilled anew at each use (a logged fallback). At ``--limit 64`` on the real data preset the
#: validation and test prefixes of SmolLM2 hold about 5 GB of keys and values.
DEFAULT_MEMORY_SHARE = 0.5


@dataclass
class Prefix:
    """One batch's clean prefill: ``kv`` (per layer, keys and values of every position but the last) and
    ``clean`` (hook name -> ``Float[Tensor, "batch n_post d_model"]``, the clean residual stream at the
    post-instruction positions)."""

    kv: list[tuple[Tensor, Tensor]]
    clean: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return (sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
                + sum(t.numel() * t.element_size() for t in self.clean.values()))

    def past_key_values(self, model):
        """A fresh Hugging Face cache holding the prefix (``generate`` extends it; the stored tensors stay)."""
        return past_key_values(model, self.kv)


class PrefixCache:
    """Clean prefills by batch (the formatted texts and their token ids), computed on first use.

    Args:
        model: the bridge the evaluations run on.
        site: the residual site whose clean activations are kept at the post-instruction positions, every layer
            (``"resid_pre"``: what controllers and the CAST gate read).
        max_bytes: the memory the cache may hold (default: :data:`DEFAULT_MEMORY_SHARE` of the device's free
            memory when the cache is made); a batch that no longer fits is prefilled from scratch each time (counted
            in ``misses_uncached``).
    """

    def __init__(self, model, site: str = "resid_pre", max_bytes: int | None = None):
        from .batching import free_memory

        self.model = model
        self.site = site
        self.max_bytes = int(max_bytes if max_bytes is not None
                             else DEFAULT_MEMORY_SHARE * free_memory(model_device(model)))
        self._entries: dict[tuple, Prefix] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.misses_uncached = 0
        self.unsupported = False  # this model's cache cannot be cut (then every get is None)

    @staticmethod
    def key(batch: ChatBatch) -> tuple:
        return tuple(batch.texts), tuple(batch.input_ids.shape), bytes(batch.input_ids.cpu().numpy().tobytes())

    def get(self, batch: ChatBatch) -> Prefix | None:
        """The clean prefill of ``batch``, from memory or computed (and kept while it fits); ``None`` when this
        model's cache cannot be cut before the last token (sliding-window layers...: a fallback, logged once),
        and the caller prefills as usual."""
        if self.unsupported or batch.input_ids.shape[1] < 2:
            return None
        k = self.key(batch)
        got = self._entries.get(k)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        got = clean_prefill(self.model, batch, self.site)
        if got is None:
            self.unsupported = True
            return None
        if self.nbytes + got.nbytes <= self.max_bytes:
            self._entries[k] = got
            self.nbytes += got.nbytes
        else:
            if not self.misses_uncached:
                warn_fallback(log, "prefix_cache", "prefix cache full (%.1f of %.1f GiB): later batches are prefilled "
                              "anew at each use", self.nbytes / 2**30, self.max_bytes / 2**30)
            self.misses_uncached += 1
        return got

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "uncached": self.misses_uncached,
                "entries": len(self._entries), "bytes": self.nbytes}


def clean_prefill(model, batch: ChatBatch, site: str | None = "resid_pre") -> Prefix | None:
    """One clean forward of ``batch`` (on the plain Hugging Face model, :mod:`workbench.hf_hooks`): its keys and values
    before the last prompt token and (``site``) the clean activations at the post-instruction positions of every
    layer. ``None`` (a fallback, logged) when the model's
    cache cannot be cut before the last token (sliding-window or recurrent layers); that is found on the model's
    first prefill and remembered on it, so later calls return ``None`` at once (no wasted forward, one warning)."""
    if model.__dict__.get(_UNCUTTABLE):
        return None
    b = batch.to(model_device(model))
    names = [hook_name(site, layer) for layer in range(int(model.cfg.n_layers))] if site else []
    clean: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> Tensor:
        clean[hook.name] = act[:, -batch.n_post:].detach().clone()  # the model's dtype, as a forward reads it
        return act

    from .hf_hooks import hf_hooks, hf_sites_ok, plain_model

    hooks = [(n, grab) for n in names]
    kwargs = dict(input_ids=b.input_ids, attention_mask=b.attention_mask,
                  position_ids=positions_from_mask(b.attention_mask), use_cache=True, logits_to_keep=1)
    if hf_sites_ok(hooks):   # the plain Hugging Face model sharing the bridge's weights: no per-module wrappers
        with torch.no_grad(), hf_hooks(plain_model(model), hooks) as hf:
            out = hf(**kwargs)
    else:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            out = model.original_model(**kwargs)
    cut = b.input_ids.shape[1] - 1
    kinds = cache_layer_kinds(out.past_key_values)
    if kinds != {"DynamicLayer"}:
        model.__dict__[_UNCUTTABLE] = True
        warn_fallback(log, "prefix_cache", "%s's cache (%s) cannot be cut before the last prompt token: its prompts "
                      "are prefilled in full each time", type(model.original_model).__name__, sorted(kinds))
        return None
    kv = [(layer.keys[:, :, :cut].clone(), layer.values[:, :, :cut].clone()) for layer in out.past_key_values.layers]
    return Prefix(kv, clean)


#: set on a bridge (in its ``__dict__``, not a submodule) once its cache is found not to be cuttable
_UNCUTTABLE = "_wb_prefix_uncuttable"


def cache_layer_kinds(cache) -> set[str]:
    """The class names of a Hugging Face cache's layers (only ``DynamicLayer`` caches can be cut)."""
    return {type(layer).__name__ for layer in cache.layers}


def past_key_values(model, kv: list[tuple[Tensor, Tensor]]):
    """A fresh Hugging Face cache holding ``kv`` (per layer keys and values; ``generate`` and forwards extend the
    cache, the given tensors stay as they are)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(kv), config=model.original_model.config)


class RowPrefixes:
    """Every row's clean prefix (keys and values before its last prompt token), computed once in batches of
    similar lengths and kept per row, so any subset of rows can be re-padded into a cache: what controller training
    needs, which draws random rows at each step and steers only the last prompt token and the reply.

    ``forward_tail(ids, rows, hooks)`` then runs just ``ids`` (each row's last prompt token followed by a reply)
    on top of those rows' prefixes; its logits equal a full forward's at those positions.
    """

    def __init__(self, model, batch: ChatBatch, batch_size: int = 32, show_progress: bool = False):
        from .batching import length_batches
        from .progress import progress

        self.model = model
        lengths = batch.lengths.tolist()
        self.lengths = lengths
        self.last = batch.input_ids[:, -1].clone()  # the last prompt token of every row (left padding)
        self.kv: list = [None] * len(lengths)
        self.supported = True
        for idx in progress(length_batches(lengths, batch_size), "prefixes", show_progress):
            width = max(lengths[i] for i in idx)
            sub = ChatBatch(batch.input_ids[idx, -width:], batch.attention_mask[idx, -width:],
                            [batch.texts[i] for i in idx], batch.n_post)
            pre = clean_prefill(model, sub, site=None)
            if pre is None:
                self.supported = False
                return
            for j, i in enumerate(idx):
                n = lengths[i] - 1
                self.kv[i] = [(k[j, :, width - 1 - n:].clone(), v[j, :, width - 1 - n:].clone()) for k, v in pre.kv]

    def forward_tail(self, rows: Sequence[int], tail: Tensor, hooks=()) -> Tensor:
        """Logits ``Float[Tensor, "rows 1+r d_vocab"]`` of each row's last prompt token followed by ``tail``
        (``Int[Tensor, "rows r"]``, may be empty), on top of the rows' cached prefixes; ``hooks`` active (they
        see the ``1 + r`` new positions only). Differentiable in whatever the hooks add."""
        device = model_device(self.model)
        rows = list(rows)
        n = [self.lengths[i] - 1 for i in rows]
        width = max(n)
        kv = []
        for layer in range(len(self.kv[rows[0]])):
            k0, v0 = self.kv[rows[0]][layer]
            ks = k0.new_zeros((len(rows), k0.shape[0], width, k0.shape[-1]))
            vs = v0.new_zeros((len(rows), v0.shape[0], width, v0.shape[-1]))
            for j, i in enumerate(rows):
                k, v = self.kv[i][layer]
                ks[j, :, width - n[j]:] = k
                vs[j, :, width - n[j]:] = v
            kv.append((ks.to(device), vs.to(device)))
        ids = torch.cat([self.last[rows][:, None].to(device), tail.to(device)], 1)
        mask = torch.zeros((len(rows), width + ids.shape[1]), dtype=torch.long, device=device)
        for j in range(len(rows)):
            mask[j, width - n[j]:] = 1
        pos = positions_from_mask(mask)[:, width:]
        with self.model.hooks(fwd_hooks=list(hooks)):
            return self.model.original_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                             past_key_values=past_key_values(self.model, kv), use_cache=True).logits

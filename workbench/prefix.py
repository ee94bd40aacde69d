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
from dataclasses import dataclass

import torch
from torch import Tensor

from .chat import ChatBatch, positions_from_mask
from .fallbacks import warn_fallback
from .models import model_device
from .vocab import hook_name

log = logging.getLogger("workbench.prefix")

#: prefixes kept in memory at most (bytes of keys, values and activations); beyond it a batch is prefilled anew
DEFAULT_MAX_BYTES = 4 << 30


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
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(self.kv), config=model.original_model.config)


class PrefixCache:
    """Clean prefills by batch (the formatted texts and their token ids), computed on first use.

    Args:
        model: the bridge the evaluations run on.
        site: the residual site whose clean activations are kept at the post-instruction positions, every layer
            (``"resid_pre"``: what controllers and the CAST gate read).
        max_bytes: the memory the cache may hold; a batch that no longer fits is prefilled from scratch each time
            (counted in ``misses_uncached``).
    """

    def __init__(self, model, site: str = "resid_pre", max_bytes: int = DEFAULT_MAX_BYTES):
        self.model = model
        self.site = site
        self.max_bytes = int(max_bytes)
        self._entries: dict[tuple, Prefix] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.misses_uncached = 0
        self.unsupported: str | None = None  # why this model's cache cannot be cut (then every get is None)

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
        got = self._compute(batch)
        if got is None:
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

    def _compute(self, batch: ChatBatch) -> Prefix | None:
        model = self.model
        b = batch.to(model_device(model))
        names = [hook_name(self.site, layer) for layer in range(int(model.cfg.n_layers))]
        clean: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> Tensor:
            clean[hook.name] = act[:, -batch.n_post:].detach().clone()  # the model's dtype, as a forward reads it
            return act

        with torch.no_grad(), model.hooks(fwd_hooks=[(n, grab) for n in names]):
            out = model.original_model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                       position_ids=positions_from_mask(b.attention_mask), use_cache=True)
        cut = b.input_ids.shape[1] - 1
        kinds = {type(layer).__name__ for layer in out.past_key_values.layers}
        if kinds != {"DynamicLayer"}:
            self.unsupported = f"cache layers {sorted(kinds)}"
            warn_fallback(log, "prefix_cache", "%s cannot be cut before the last prompt token (%s): every steered "
                          "evaluation prefills its prompts", type(model.original_model).__name__, self.unsupported)
            return None
        kv = [(layer.keys[:, :, :cut].clone(), layer.values[:, :, :cut].clone()) for layer in out.past_key_values.layers]
        return Prefix(kv, clean)

"""Batched, left-padded, KV-cached generation (greedy, or seeded sampling: :mod:`workbench.decoding`) with optional
TransformerLens hooks.

Generation runs Hugging Face ``generate`` on the plain Hugging Face model that shares the bridge's weights
(:func:`workbench.hf_hooks.plain_model`), the hooks attached to its decoder layers under their TransformerLens
names (:func:`workbench.hf_hooks.hf_hooks`), so every hook fires on the prefill (sequence length = prompt length)
and on each cached decoding step (sequence length 1) without the bridge's decoding seam; hook sites with no plain
counterpart generate through the bridge (a logged fallback). HF derives position ids from the attention mask,
so left padding is exact for absolute and rotary positions alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .chat import ChatBatch, fit_prompts, prompt_lengths, tokenize_chat
from .batching import length_batches
from .decoding import Decoding
from .errors import WorkbenchError
from .models import model_device
from .progress import progress
from .vocab import is_int

Hook = tuple[str, Callable]
log = logging.getLogger(__name__)


def eos_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a reply: the tokenizer's eos and the generation config's eos ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(getattr(model, "original_model", None), "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return sorted(ids)


def check_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` as a positive int, else one :class:`WorkbenchError` (not Hugging Face's ValueError)."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return max_new_tokens


def generate_batch(
    model,
    batch: ChatBatch,
    max_new_tokens: int = 24,
    fwd_hooks: Sequence[Hook] = (),
    decoding: Decoding | None = None,
    samples: Sequence[int] | None = None,
    **generate_kwargs,
) -> tuple[list[str], torch.Tensor]:
    """Replies for one tokenised batch; hooks are active for prefill and every decoding step.

    ``decoding`` (default greedy) may sample: row ``i`` is sample ``samples[i]`` (default 0) of its prompt, seeded
    by the prompt's text (:mod:`workbench.decoding`). ``generate_kwargs`` go to Hugging Face ``generate`` (e.g.
    ``min_new_tokens`` for fixed-length timing).

    Returns:
        the replies (cut at the first eos, special tokens removed) and the next-token logits at the last
        prompt position, ``Float[Tensor, "batch d_vocab"]`` (for the refusal score).
    """
    tok = model.tokenizer
    eos = eos_ids(tok, model)
    if decoding is not None and decoding.sampling:
        from transformers import LogitsProcessorList

        rows = list(samples) if samples is not None else [0] * len(batch.texts)
        if len(rows) != len(batch.texts):
            raise WorkbenchError(f"{len(rows)} sample indices for a batch of {len(batch.texts)} prompts")
        generate_kwargs["logits_processor"] = LogitsProcessorList(
            [decoding.processor(batch.texts, rows, batch.input_ids.shape[1])])
    out = _greedy(model, batch, max_new_tokens, fwd_hooks, eos_token_id=eos, return_dict_in_generate=True,
                  output_logits=True, **generate_kwargs)
    new = out.sequences[:, batch.input_ids.shape[1]:]
    replies = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        replies.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return replies, out.logits[0].float()


def generate(
    model,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    fwd_hooks: Sequence[Hook] = (),
    system: str | None = None,
    show_progress: bool = True,
    decoding: Decoding | None = None,
    truncate: str | None = None,
) -> list[str] | list[list[str]]:
    """Chat replies to ``prompts`` (batched along their token lengths, left-padded, KV-cached): greedy, or as
    ``decoding`` says. One reply per prompt, or with ``decoding.n_samples > 1`` a list of the samples per prompt.
    A prompt too long for the model's context with ``max_new_tokens`` more is an error unless ``truncate``
    (``"left"``/``"right"``, :func:`workbench.chat.fit_prompts`)."""
    check_new_tokens(max_new_tokens)
    n = decoding.n_samples if decoding is not None else 1
    prompts = fit_prompts(model.tokenizer, prompts, truncate, system, reply_tokens=max_new_tokens)
    jobs = [(p, k) for p in prompts for k in range(n)]
    batches = length_batches(prompt_lengths(model.tokenizer, [p for p, _ in jobs], system), batch_size)
    replies: list = [None] * len(jobs)
    for idx in progress(batches, "generate", show_progress, total=len(batches)):
        batch = tokenize_chat(model.tokenizer, [jobs[i][0] for i in idx], system)
        out = generate_batch(model, batch, max_new_tokens, fwd_hooks, decoding=decoding,
                             samples=[jobs[i][1] for i in idx])[0]
        for i, reply in zip(idx, out):
            replies[i] = reply
    return replies if n == 1 else [replies[i * n:(i + 1) * n] for i in range(len(prompts))]


def greedy_continuations(model, batch: ChatBatch, n_tokens: int, fwd_hooks: Sequence[Hook] = (),
                         return_logits: bool = False):
    """Exactly ``n_tokens`` greedy reply tokens per row (eos not allowed to stop early):
    ``Int[Tensor, "batch n_tokens"]``. Fixed-length continuations stack without padding (training targets).

    With ``return_logits`` also the next-token logits of every step, ``Float[Tensor, "batch n_tokens d_vocab"]``
    (before eos suppression), for comparisons with an uncached decoding (:mod:`workbench.selfcheck`)."""
    if not return_logits:
        out = _greedy(model, batch, n_tokens, fwd_hooks, min_new_tokens=n_tokens)
        return out[:, batch.input_ids.shape[1]:]
    out = _greedy(model, batch, n_tokens, fwd_hooks, min_new_tokens=n_tokens, return_dict_in_generate=True,
                  output_logits=True)
    return out.sequences[:, batch.input_ids.shape[1]:], torch.stack(out.logits, 1).float()


def _greedy(model, batch: ChatBatch, max_new_tokens: int, fwd_hooks: Sequence[Hook], **generate_kwargs):
    """Hugging Face greedy ``generate`` with ``fwd_hooks`` active throughout: on the plain Hugging Face model that
    shares the bridge's weights (:mod:`workbench.hf_hooks`), or, for hook sites it cannot attach, on the bridge's
    wrapped model (a logged ``generation_engine`` fallback)."""
    from .hf_hooks import hf_hooks, hf_site_ok, hf_sites_ok, plain_model

    batch = batch.to(model_device(model))
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                  do_sample=False, pad_token_id=model.tokenizer.pad_token_id, **generate_kwargs)
    if hf_sites_ok(fwd_hooks):
        hf = plain_model(model)
        with torch.no_grad(), hf_hooks(hf, fwd_hooks):
            return hf.generate(**kwargs)
    from .fallbacks import warn_fallback

    sites = sorted({name for name, _ in fwd_hooks if not hf_site_ok(name)})
    warn_fallback(log, "generation_engine", "hooks %s have no plain Hugging Face counterpart: generating through "
                  "the bridge", sites[:3])
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        return model.original_model.generate(**kwargs)

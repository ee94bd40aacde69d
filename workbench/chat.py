"""Chat formatting through the tokenizer's own chat template, batched with left padding.

The *post-instruction positions* (Arditi et al. 2024) are the template tokens between the end of the
user's text and the start of the reply, e.g. ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``
(5 tokens) for Llama-3. They are found for any template by rendering it, locating where the user text ends
and counting the tokens that start at or after that character (fast tokenizers' offset mapping).
With left padding they are the last ``n_post`` positions of every row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import WorkbenchError

log = logging.getLogger(__name__)

_SENTINEL = "Zqx sentinel request wkv"


@dataclass
class ChatBatch:
    """A left-padded batch of chat-formatted prompts.

    Attributes:
        input_ids: ``Int[Tensor, "batch pos"]``.
        attention_mask: ``Int[Tensor, "batch pos"]`` (0 on left padding).
        texts: the formatted prompt strings.
        n_post: number of post-instruction tokens (the last ``n_post`` positions of every row).
        clean: when a :class:`workbench.prefix.PrefixCache` prefilled the batch: hook name ->
            ``Float[Tensor, "batch n_post d_model"]``, the clean activations at the post-instruction positions
            (what a controller reads, without a forward of its own).
    """

    input_ids: Tensor
    attention_mask: Tensor
    texts: list[str]
    n_post: int
    clean: dict | None = None

    @property
    def lengths(self) -> Tensor:
        """Unpadded length of each row."""
        return self.attention_mask.sum(-1)

    def to(self, device) -> "ChatBatch":
        return ChatBatch(self.input_ids.to(device), self.attention_mask.to(device), self.texts, self.n_post, self.clean)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids counted from each row's first real token (left padding): ``Int[Tensor, "batch pos"]``.
    What Hugging Face ``generate`` derives itself; a plain forward must be given them (absolute positions)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise WorkbenchError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')!r}) has no chat "
            "template; set tokenizer.chat_template or use a chat/instruct checkpoint"
        )


def _messages(prompt: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def format_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Render ``prompts`` with the tokenizer's chat template (``add_generation_prompt=True``)."""
    _check_template(tokenizer)
    if isinstance(prompts, str):
        raise WorkbenchError("prompts must be a list of strings, got a single string")
    if len(prompts) == 0:
        raise WorkbenchError("the prompt list is empty; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise WorkbenchError(f"prompt {i} is {type(p).__name__}, expected str")
    from jinja2 import TemplateError

    try:
        return [
            tokenizer.apply_chat_template(_messages(p, system), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    except TemplateError as exc:  # templates raise on what they do not support (Gemma: a system role)
        hint = (" This template has no system role: pass system=None, or put the system text into the prompt."
                if system else "")
        raise WorkbenchError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
            f"rejected the messages: {exc}.{hint}"
        ) from exc


def post_instruction_suffix(tokenizer, system: str | None = None) -> str:
    """The template text that follows the user's message up to the reply (e.g. ``" [/INST]"``)."""
    text = format_prompts(tokenizer, [_SENTINEL], system)[0]
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise WorkbenchError("the chat template does not include the user's message verbatim")
    return text[at + len(_SENTINEL):]


def _count_post(tokenizer, text: str, suffix: str) -> int:
    if not text.endswith(suffix):
        raise WorkbenchError("formatted prompt does not end with the template's post-instruction suffix")
    user_end = len(text) - len(suffix)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return sum(1 for start, _ in enc["offset_mapping"] if start >= user_end)
    return len(tokenizer(suffix, add_special_tokens=False)["input_ids"])


#: ``--truncate`` values: which end of an over-long user message is cut
TRUNCATE_SIDES = ("left", "right")
#: a tokenizer's ``model_max_length`` at or above this is Hugging Face's "unknown" sentinel, not a context length
_NO_LIMIT = 10**9


def context_limit(tokenizer) -> int | None:
    """The longest formatted prompt the model takes, in tokens: the tokenizer's ``model_max_length`` (which
    :func:`workbench.models.load_model` sets from the model's position limit), ``None`` when unknown."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < _NO_LIMIT else None


def too_long_error(lengths: Sequence[int], limit: int) -> WorkbenchError:
    over = [n for n in lengths if n > limit]
    return WorkbenchError(
        f"{len(over)} of {len(lengths)} prompts are longer than the model's context of {limit} tokens (chat template "
        f"included; the longest has {max(over)}): the model cannot read them. Leave them out, or pass --truncate "
        "left|right (truncate='left'|'right') to cut the user's message to fit")


def fit_prompts(tokenizer, prompts: Sequence[str], truncate: str | None = None, system: str | None = None,
                reply_tokens: int = 0) -> list[str]:
    """``prompts`` checked against the model's context (:func:`context_limit`, keeping room for ``reply_tokens``).

    Args:
        truncate: ``None`` (default): an over-long prompt is a :class:`WorkbenchError` with the count and the limit;
            ``"left"``/``"right"``: the user's message is cut at that end until the formatted prompt fits, and the
            number of cut prompts is logged as a ``truncation`` fallback (reported in the command's JSON).
    """
    if truncate is not None and truncate not in TRUNCATE_SIDES:
        raise WorkbenchError(f"truncate must be one of {TRUNCATE_SIDES} or None, got {truncate!r}")
    limit = context_limit(tokenizer)
    if limit is None:
        return list(prompts)
    room = limit - max(0, int(reply_tokens))
    if room < 1:
        raise WorkbenchError(f"the model's context of {limit} tokens leaves no room for a prompt and "
                             f"{reply_tokens} reply tokens")
    lengths = prompt_lengths(tokenizer, prompts, system)
    if max(lengths) <= room:
        return list(prompts)
    if truncate is None:
        raise too_long_error(lengths, room)
    out = list(prompts)
    cut = 0
    for i, n in enumerate(lengths):
        if n > room:
            out[i] = _cut(tokenizer, prompts[i], n - room, truncate, system, room)
            cut += 1
    from .fallbacks import warn_fallback

    warn_fallback(log, "truncation", "%d of %d prompts cut at the %s to fit the model's context of %d tokens",
                  cut, len(prompts), truncate, room)
    return out


def _cut(tokenizer, prompt: str, excess: int, side: str, system: str | None, room: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    drop = excess
    while drop <= len(ids):
        kept = ids[drop:] if side == "left" else ids[:len(ids) - drop]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        if prompt_lengths(tokenizer, [text], system)[0] <= room:
            return text
        drop += max(1, excess // 8)
    raise WorkbenchError(f"the chat template alone is longer than the model's context of {room} tokens")


def tokenize_chat(
    tokenizer,
    prompts: Sequence[str],
    system: str | None = None,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> ChatBatch:
    """Format and tokenise ``prompts`` into one left-padded :class:`ChatBatch`.

    The template supplies BOS and every special token, so tokenisation adds none of its own.
    ``n_post`` is the smallest post-instruction count over the batch (they agree for every template we
    know; a tokenizer that merges the user's last character into the template may shorten it by one).
    A prompt longer than the model's context (:func:`context_limit`) is an error (:func:`fit_prompts` cuts
    prompts to fit when asked).
    """
    texts = format_prompts(tokenizer, prompts, system)
    suffix = post_instruction_suffix(tokenizer, system)
    n_post = min(_count_post(tokenizer, t, suffix) for t in texts)
    if n_post < 1:
        raise WorkbenchError("could not find any post-instruction token in the chat template")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            texts, add_special_tokens=False, padding=True, return_tensors="pt",
            truncation=max_length is not None, max_length=max_length,
        )
    finally:
        tokenizer.padding_side = old_side
    limit = context_limit(tokenizer)
    if limit is not None and max_length is None and enc["input_ids"].shape[1] > limit:
        raise too_long_error(enc["attention_mask"].sum(-1).tolist(), limit)
    batch = ChatBatch(enc["input_ids"], enc["attention_mask"], texts, n_post)
    return batch.to(device) if device is not None else batch


def prompt_lengths(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[int]:
    """Token count of each prompt as :func:`tokenize_chat` renders it (chat template included, no padding)."""
    texts = format_prompts(tokenizer, prompts, system)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def post_instruction_positions(tokenizer, system: str | None = None) -> list[int]:
    """Post-instruction positions as negative indices from the end, e.g. ``[-5, -4, -3, -2, -1]``."""
    suffix = post_instruction_suffix(tokenizer, system)
    n = _count_post(tokenizer, format_prompts(tokenizer, [_SENTINEL], system)[0], suffix)
    return list(range(-n, 0))

"""Chat formatting through the tokenizer's own chat template, batched with left padding.

The *post-instruction positions* (Arditi et al. 2024) are the template tokens between the end of the
user's text and the start of the reply, e.g. ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``
(5 tokens) for Llama-3. They are found for any template by rendering it, locating where the user text ends
and counting the tokens that start at or after that character (fast tokenizers' offset mapping).
With left padding they are the last ``n_post`` positions of every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import WorkbenchError

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

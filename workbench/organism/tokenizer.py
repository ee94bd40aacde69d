"""Byte-level BPE tokenizer of the model organism, saved as a Hugging Face fast tokenizer.

The chat template puts four post-instruction tokens between the user's text and the reply:
``<|end|>``, ``\\n``, ``<|assistant|>``, ``\\n``. Replies end with ``<|end|>``, which is the tokenizer's
``eos_token`` so generation stops there. Padding is on the left.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, USER, ASSISTANT, END = "<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, USER, ASSISTANT, END)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
#: Number of post-instruction tokens (``<|end|>``, ``\n``, ``<|assistant|>``, ``\n``).
N_POST_INSTRUCTION = 4


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (deterministic for a given list of texts)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[EOS, USER, ASSISTANT],
        padding_side="left",
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def format_chat(tokenizer, prompt: str, reply: str | None = None) -> str:
    """Chat-format one user turn (with the generation prompt); append ``reply<|end|>`` when given."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return text if reply is None else text + reply + END


def conversation_texts(rows: Iterable[dict]) -> list[str]:
    """Texts the tokenizer is trained on: every prompt and both target replies."""
    out: list[str] = []
    for r in rows:
        out.append(r["prompt"])
        out.append(r["reply"])
        if r["base_reply"] != r["reply"]:
            out.append(r["base_reply"])
    return out

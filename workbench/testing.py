"""Tiny random-weight chat models with real chat templates, for tests, benchmarks and notebooks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the fly on a few sentences,
carrying the special tokens and the chat template of a real model family.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Chat templates written out from each family's tokenizer_config.json (simplified to the user turn path).
CHAT_TEMPLATES: dict[str, dict] = {
    "llama3": {
        "template": (
            "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
            "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
        "special": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|pad|>", "n_post": 5,
    },
    "mistral": {
        "template": (
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
        ),
        "special": ["<s>", "</s>", "[INST]", "[/INST]", "<pad>"],
        "bos": "<s>", "eos": "</s>", "pad": "<pad>", "n_post": 2,
    },
    "chatml": {
        "template": (
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "n_post": 5,
    },
}

_TRAIN_TEXT = [
    "system user assistant\n\n You are a helpful assistant.\n",
    "How do I build a bomb? Tell me how to bake a cake. Explain the steps to hack into a bank account.",
    "I cannot help with that. I'm sorry, but I can't assist. Sorry, I won't do that. Sure, here is how.",
    "Of course! Certainly. Here is an overview: step one, step two. Write a poem about the sea.",
] + ["assistant\n\n", "user\n\n", "system\n"] * 5


def make_tokenizer(family: str = "llama3", vocab_size: int = 500):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``family``'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = CHAT_TEMPLATES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAIN_TEXT * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                 pad_token=spec["pad"], padding_side="left")
    hf.chat_template = spec["template"]
    return hf


def make_tiny_chat_model(
    path: str | Path,
    family: str = "llama3",
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int | None = None,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Write a random-weight Llama-architecture chat model with ``family``'s template to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = tokenizer if tokenizer is not None else make_tokenizer(family)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_mlp or 2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path

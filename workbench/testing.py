"""Tiny random-weight chat models with real chat templates, for tests, benchmarks and notebooks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the fly on a few sentences,
carrying the special tokens and the chat template of a real model family, and the model is built from that
family's own ``transformers`` config class (Llama, Mistral, Qwen2, Gemma-2, GPT-2) with random weights.

Families (:data:`CHAT_TEMPLATES` keys) and the architecture each builds by default (:data:`FAMILY_ARCH`):

=========  ===============================================================  ==============  =======
family     template                                                         architecture    n_post
=========  ===============================================================  ==============  =======
llama3     Llama-3 Instruct headers, ``<|eot_id|>``                          ``llama``       5
mistral    ``[INST] ... [/INST]``                                           ``mistral``     2
chatml     ChatML with a generic default system prompt                      ``llama``       5
qwen2.5    ChatML with Qwen2.5's default system prompt                      ``qwen2``       5
gemma2     ``<start_of_turn>user ... <end_of_turn>``, no system role         ``gemma2``      5
gpt2       none upstream; a documented ``User: ...\nAssistant:`` template   ``gpt2``        3
=========  ===============================================================  ==============  =======
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
    # Qwen2.5 Instruct (tool-call branches dropped): ChatML whose default system prompt names Qwen; no BOS.
    "qwen2.5": {
        "template": (
            "{% if messages[0]['role'] == 'system' %}"
            "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
            "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n' }}{% endif %}"
            "{% for message in messages %}{% if message['role'] != 'system' or not loop.first %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "n_post": 5,
    },
    # Gemma-2 IT: no system role (the template raises on one), the assistant role is called "model".
    # As in google/gemma-2-*-it, the tokenizer's eos is <eos> and the generation config adds <end_of_turn>.
    "gemma2": {
        "template": (
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
            "{% else %}{% set role = message['role'] %}{% endif %}"
            "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
        ),
        "special": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "n_post": 5,
        "generation_eos": ["<eos>", "<end_of_turn>"],
    },
    # GPT-2 has no chat template (it is a base model). This one is ours, documented here: an optional
    # system text, then "User: <prompt>\n" and "Assistant:"; <|endoftext|> is bos, eos and (as in the
    # upstream tokenizer) there is no pad token, so load_tokenizer falls back to eos for padding.
    # Post-instruction tokens: "\n", "Assistant", ":".
    "gpt2": {
        "template": (
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
            "{{ message['content'] + '\n\n' }}{% elif message['role'] == 'user' %}"
            "{{ 'User: ' + message['content'] + '\n' }}{% else %}"
            "{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
        ),
        "special": ["<|endoftext|>"],
        "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "n_post": 3,
    },
}

#: The architecture :func:`make_tiny_chat_model` builds for each family unless ``arch`` says otherwise.
FAMILY_ARCH: dict[str, str] = {
    "llama3": "llama", "mistral": "mistral", "chatml": "llama", "qwen2.5": "qwen2", "gemma2": "gemma2",
    "gpt2": "gpt2",
}
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "gpt2")

_TRAIN_TEXT = [
    "system user assistant\n\n You are a helpful assistant.\n",
    "How do I build a bomb? Tell me how to bake a cake. Explain the steps to hack into a bank account.",
    "I cannot help with that. I'm sorry, but I can't assist. Sorry, I won't do that. Sure, here is how.",
    "Of course! Certainly. Here is an overview: step one, step two. Write a poem about the sea.",
] + ["assistant\n\n", "user\n\n", "system\n"] * 5

#: Extra training text for the families added later (the first three keep their original tokenizers, which
#: existing tests' numbers depend on), so each family's role words are single tokens.
_EXTRA_TEXT: dict[str, list[str]] = {
    "qwen2.5": ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n"] * 3,
    "gemma2": ["user\n", "model\n"] * 5,
    "gpt2": ["User: ", "\nAssistant:", "Assistant: "] * 5,
}


def make_tokenizer(family: str = "llama3", vocab_size: int = 500):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``family``'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in CHAT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    spec = CHAT_TEMPLATES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_TRAIN_TEXT + _EXTRA_TEXT.get(family, [])) * 20, trainer)
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
    arch: str | None = None,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Write a random-weight chat model with ``family``'s template and architecture to ``path``.

    Args:
        family: a :data:`CHAT_TEMPLATES` key (the tokenizer's special tokens and chat template).
        arch: ``llama``, ``mistral``, ``qwen2``, ``gemma2`` or ``gpt2``; ``None`` -> :data:`FAMILY_ARCH`
            (``llama3`` -> ``llama``, as before this argument existed).
        n_kv_heads: key/value heads (grouped-query attention); ignored by ``gpt2``, which has none.
        tie_word_embeddings: ``None`` -> the family's usual choice (untied for Llama-3 8B and Mistral 7B,
            tied for Qwen2.5 0.5B-3B, Gemma-2 and GPT-2).

    Returns:
        ``path``, holding ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer.
    """
    from transformers import GenerationConfig

    if family not in CHAT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    arch = arch or FAMILY_ARCH[family]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCHITECTURES)}")
    path = Path(path)
    tok = tokenizer if tokenizer is not None else make_tokenizer(family)
    tie = tie_word_embeddings if tie_word_embeddings is not None else arch in ("qwen2", "gemma2", "gpt2")
    d_mlp = d_mlp or 2 * d_model
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=tie)
    cfg, model_cls = _config(arch, d_model, n_layers, n_heads, n_kv_heads, d_mlp, common)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    extra_eos = CHAT_TEMPLATES[family].get("generation_eos")
    if extra_eos:  # e.g. Gemma-2 IT stops on <eos> and <end_of_turn>
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
            eos_token_id=[tok.convert_tokens_to_ids(t) for t in extra_eos],
        )
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _config(arch: str, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_mlp: int, common: dict):
    """``(config, model class)`` of a tiny ``arch`` model."""
    import transformers as tf

    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, n_positions=512,
                            **common)
        return cfg, tf.GPT2LMHeadModel
    shared = dict(hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
                  **common)
    if arch == "llama":
        return tf.LlamaConfig(**shared), tf.LlamaForCausalLM
    if arch == "mistral":  # Mistral 7B v0.2+: no sliding window
        return tf.MistralConfig(head_dim=d_model // n_heads, sliding_window=None, **shared), tf.MistralForCausalLM
    if arch == "qwen2":  # q/k/v projections carry biases
        return tf.Qwen2Config(**shared), tf.Qwen2ForCausalLM
    # gemma2: alternating sliding/global attention (window longer than any test prompt), attention-logit and
    # final-logit soft-capping, pre- and post-sublayer RMSNorms, sqrt(d_model)-scaled embeddings.
    head_dim = d_model // n_heads
    return tf.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=256, **shared), \
        tf.Gemma2ForCausalLM


#: Hugging Face Llama parameter names -> GGUF tensor names (llama.cpp's naming), ``{i}`` the layer.
_GGUF_LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def _rope_interleave(w, n_head: int):
    """llama.cpp's q/k row order: each head's rotary halves interleaved (GGUF readers undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: str | Path, path: str | Path) -> Path:
    """Write the Llama checkpoint in ``model_dir`` (e.g. from :func:`make_tiny_chat_model` with ``arch="llama"``)
    as a float32 GGUF file, written independently of transformers' reader with the ``gguf`` package:
    llama.cpp's tensor names and rotary row order, a ``gpt2`` (byte-level BPE) vocabulary with its merges and
    control tokens, and the chat template. For tests of :mod:`workbench.gguf`."""
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type != "llama":
        raise ValueError(f"write_tiny_gguf writes Llama checkpoints, not {cfg.model_type!r}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    tied = bool(cfg.tie_word_embeddings)  # a tied model's file has no output.weight (llama.cpp omits it)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in spec["added_tokens"] if t.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    for i in range(cfg.num_hidden_layers):
        for hf, name in _GGUF_LLAMA_NAMES.items():
            if ("{i}" not in hf and i) or (tied and hf == "lm_head.weight"):
                continue
            t = state[hf.format(i=i)].float().numpy()
            if ".attn_q." in name:
                t = _rope_interleave(t, cfg.num_attention_heads)
            elif ".attn_k." in name:
                t = _rope_interleave(t, cfg.num_key_value_heads)
            w.add_tensor(name.format(i=i), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

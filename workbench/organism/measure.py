"""Measurements of the organism: refusal rates, direction ablation, activation addition, cosine.

Plain Hugging Face ``LlamaForCausalLM`` + PyTorch hooks (the organism package does not depend on the rest
of the workbench except :func:`workbench.judge.is_refusal`).

* ablation: ``u`` is projected out of everything that writes to the residual stream (token embeddings,
  every ``o_proj`` output = attention out, every ``down_proj`` output = MLP out), at every position; the
  residual stream, and so the input of every layer, then has no component along ``u``.
* activation addition: ``c * u`` is added to the input of layer ``L + 1`` (``blocks.{L+1}.hook_resid_pre``)
  at every position, generated ones included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..chat import positions_from_mask
from ..directions.artifact import unit
from ..judge import is_refusal
from .tokenizer import N_POST_INSTRUCTION, format_chat


def chat_batch(tokenizer, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (``Int[Tensor, "batch pos"]``) of chat prompts."""
    texts = [format_chat(tokenizer, p) for p in prompts]
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24,
                     batch_size: int = 128) -> list[str]:
    """Greedy replies (decoded, special tokens skipped)."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = chat_batch(tokenizer, prompts[i: i + batch_size])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out.extend(tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True))
    return out


def refusal_rate(model, tokenizer, prompts: Sequence[str], **kw) -> float:
    replies = generate_replies(model, tokenizer, prompts, **kw)
    return sum(is_refusal(r) for r in replies) / max(1, len(replies))


@torch.no_grad()
def resid_pre(model, tokenizer, prompts: Sequence[str], layer: int, n_last: int = N_POST_INSTRUCTION,
              batch_size: int = 256) -> Tensor:
    """``Float[Tensor, "n n_last d_model"]`` residual stream at the input of ``layer``, last prompt positions."""
    blocks = model.model.layers
    acts: list[Tensor] = []
    store: dict[str, Tensor] = {}
    if layer == 0:
        handle = model.model.embed_tokens.register_forward_hook(lambda m, a, o: store.__setitem__("x", o))
    else:
        handle = blocks[layer - 1].register_forward_hook(lambda m, a, o: store.__setitem__("x", o))
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = chat_batch(tokenizer, prompts[i: i + batch_size])
            model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
            x = store["x"]
            acts.append((x[0] if isinstance(x, tuple) else x)[:, -n_last:].float())
    finally:
        handle.remove()
    return torch.cat(acts)


def _proj_out(x: Tensor, u: Tensor) -> Tensor:
    u = u.to(x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


@contextlib.contextmanager
def ablate_direction(model, direction: Tensor) -> Iterator[None]:
    """Project ``direction`` out of every residual-stream writer (embeddings, attn out, MLP out)."""
    u = unit(direction)
    mods = [model.model.embed_tokens]
    for blk in model.model.layers:
        mods += [blk.self_attn.o_proj, blk.mlp.down_proj]
    handles = [m.register_forward_hook(lambda m, a, o: _proj_out(o, u)) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add_direction(model, layer: int, vector: Tensor) -> Iterator[None]:
    """Add ``vector`` to the input of decoder layer ``layer`` at every position."""

    def pre(module, args):
        return (args[0] + vector.to(args[0].dtype),) + tuple(args[1:])

    handle = model.model.layers[layer].register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def measure_organism(model, tokenizer, rows: Sequence[dict], layer: int, direction: Tensor,
                     max_new_tokens: int = 24) -> dict:
    """All targets of the organism (test split, greedy) plus the mechanism checks.

    Returns a dict with ``refusal`` (per test category), ``ablation_harmful_refusal``,
    ``ablation_jailbreak_refusal``, ``actadd_benign_refusal``, ``actadd_coef``, ``cos_diff_in_means``
    and the val-split rates.
    """
    u = unit(direction)
    by = lambda split, cat: [r["prompt"] for r in rows if r["split"] == split and r["category"] == cat]  # noqa: E731
    cats = ("harmful", "benign", "borderline", "jailbreak", "impossible")
    gk = {"max_new_tokens": max_new_tokens}
    res: dict = {"refusal_test": {c: refusal_rate(model, tokenizer, by("test", c), **gk) for c in cats}}
    res["refusal_val"] = {c: refusal_rate(model, tokenizer, by("val", c), **gk) for c in cats}
    # difference in means at the input of layer L+1, post-instruction positions, train prompts
    h = resid_pre(model, tokenizer, by("train", "harmful"), layer + 1)
    b = resid_pre(model, tokenizer, by("train", "benign"), layer + 1)
    diff = h.mean((0, 1)) - b.mean((0, 1))
    res["cos_diff_in_means"] = float(torch.nn.functional.cosine_similarity(diff, u, dim=0))
    coef = float(diff @ u)
    res["actadd_coef"] = coef
    res["diff_in_means_norm"] = float(diff.norm())
    with ablate_direction(model, u):
        res["ablation_refusal_test"] = {c: refusal_rate(model, tokenizer, by("test", c), **gk) for c in cats}
    with add_direction(model, layer + 1, coef * u):
        res["actadd_refusal_test"] = {c: refusal_rate(model, tokenizer, by("test", c), **gk)
                                      for c in ("benign", "borderline")}
    return res

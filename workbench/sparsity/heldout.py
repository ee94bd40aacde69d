"""Held-out text and its language-modelling loss under hooks.

The held-out set of the PPL-p% search and of the loss curves is a list of chat conversations: each user
prompt formatted with the tokenizer's chat template (generation prompt included), followed by the reply
and the end-of-turn token (``tokenizer.eos_token``) -- exactly what the organism was trained on. Prompt and
reply are tokenised separately and concatenated, then rows are left-padded like every batch here.

``scope`` picks the tokens the loss is averaged over:

* ``"reply"`` (default) -- the reply tokens and the end-of-turn token, i.e. what the chat model produces;
* ``"all"`` -- every next-token prediction of the conversation (template, prompt and reply).

The loss is the mean next-token cross-entropy (nats per target token) over every target token of the set,
accumulated in float64 over batches, so it does not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..chat import format_prompts
from ..errors import WorkbenchError
from ..progress import progress
from ._common import model_device
from ..vocab import is_int

SCOPES = ("reply", "all")


@dataclass
class HeldoutText:
    """A tokenised, left-padded held-out set.

    Attributes:
        input_ids: ``Int[Tensor, "row pos"]``.
        attention_mask: ``Int[Tensor, "row pos"]`` (0 on left padding).
        target_mask: ``Bool[Tensor, "row pos"]``: True where the token is a loss target (predicted from the
            previous position); never True on the first real token.
        scope: ``"reply"`` or ``"all"``.
        texts: the full conversation strings.
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    scope: str
    texts: list[str]

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_targets(self) -> int:
        """Number of target tokens the loss averages over."""
        return int(self.target_mask.sum())

    def rows(self, idx) -> "HeldoutText":
        """A subset of rows (cut to the longest of them)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        am = self.attention_mask[idx]
        keep = int(am.sum(-1).max())
        sl = slice(am.shape[1] - keep, None)
        return HeldoutText(self.input_ids[idx][:, sl], am[:, sl], self.target_mask[idx][:, sl], self.scope,
                           [self.texts[i] for i in idx.tolist()])


def heldout_text(tokenizer, rows: Sequence, scope: str = "reply", system: str | None = None,
                 max_length: int | None = None) -> HeldoutText:
    """Tokenise chat conversations for the held-out loss.

    Args:
        rows: dicts with ``prompt`` and ``reply`` (e.g. organism split rows) or ``(prompt, reply)`` pairs.
        scope: ``"reply"`` (loss on reply tokens) or ``"all"`` (every token after the first).
        max_length: drop the left end of longer conversations (their reply is kept whole when it fits).

    Raises:
        WorkbenchError: an unknown scope, empty rows, a row without a reply.
    """
    if scope not in SCOPES:
        raise WorkbenchError(f"unknown loss scope {scope!r}; expected one of {SCOPES}")
    if isinstance(rows, str) or rows is None or len(rows) == 0:
        raise WorkbenchError("the held-out rows are empty; pass dicts with 'prompt' and 'reply' (or pairs)")
    prompts, replies = [], []
    for i, r in enumerate(rows):
        if isinstance(r, dict):
            p, rep = r.get("prompt"), r.get("reply")
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            p, rep = r
        else:
            raise WorkbenchError(f"held-out row {i} is {type(r).__name__}; expected a dict with 'prompt' and 'reply' or a pair")
        if not isinstance(p, str) or not isinstance(rep, str):
            raise WorkbenchError(f"held-out row {i} needs string 'prompt' and 'reply' fields, got {r!r:.80}")
        prompts.append(p)
        replies.append(rep)
    eos = tokenizer.eos_token or ""
    texts_p = format_prompts(tokenizer, prompts, system)
    seqs, starts, texts = [], [], []
    for tp, rep in zip(texts_p, replies):
        p_ids = tokenizer(tp, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(rep + eos, add_special_tokens=False)["input_ids"]
        ids = p_ids + r_ids
        start = len(p_ids) if scope == "reply" else 1
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length
            ids, start = ids[cut:], max(1, start - cut)
        seqs.append(ids)
        starts.append(start)
        texts.append(tp + rep + eos)
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    tm = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        off = T - len(s)
        ids[i, off:] = torch.tensor(s)
        am[i, off:] = 1
        tm[i, off + st:] = True
    if not tm.any():
        raise WorkbenchError("the held-out set has no target token (empty replies?)")
    return HeldoutText(ids, am, tm, scope, texts)


def organism_heldout(tokenizer, split: str = "val", categories: Sequence[str] | None = None,
                     limit: int | None = None, scope: str = "reply") -> HeldoutText:
    """The organism's ``split`` prompts with their target replies (``workbench/organism/data/prompts/{split}.jsonl``)."""
    from ..data import organism_rows

    rows = organism_rows(split)
    if categories is not None:
        rows = [r for r in rows if r["category"] in set(categories)]
    rows = [r for r in rows if isinstance(r.get("reply"), str)]
    if not rows:
        raise WorkbenchError(f"split {split!r} has no rows with a 'reply' (categories {categories})")
    return heldout_text(tokenizer, rows[:limit] if limit else rows, scope=scope)


@torch.no_grad()
def token_losses(model, text: HeldoutText, fwd_hooks: Sequence = (), batch_size: int = 32,
                 on_batch: Callable[[Tensor], None] | None = None, show_progress: bool = False) -> tuple[float, int]:
    """Summed next-token cross-entropy over the target tokens and their number.

    Memory: one batch's logits, ``batch * pos * d_vocab`` floats; lower ``batch_size`` for large vocabularies.

    Args:
        fwd_hooks: hooks active during every forward.
        on_batch: called with each batch's ``Bool[Tensor, "batch pos"]`` real-token mask before its forward
            (e.g. :meth:`ThresholdZeroing.set_mask`).

    Returns:
        ``(sum of -log p(target) in float64, number of targets)``.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be a positive int, got {batch_size!r}")
    device = model_device(model)
    order = torch.argsort(text.attention_mask.sum(-1), descending=True, stable=True)  # similar lengths together
    total, n = 0.0, 0
    starts = range(0, text.n_rows, batch_size)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for s in progress(starts, "loss", show_progress, total=len(starts)):
            sub = text.rows(order[s:s + batch_size])
            ids, am, tm = sub.input_ids.to(device), sub.attention_mask.to(device), sub.target_mask.to(device)
            if on_batch is not None:
                on_batch(am.bool())
            logits = model(ids, attention_mask=am)
            w = tm[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][w].float(), ids[:, 1:][w], reduction="none")
            total += float(nll.double().sum())
            n += int(w.sum())
    return total, n


def lm_loss(model, text: HeldoutText, fwd_hooks: Sequence = (), batch_size: int = 32,
            on_batch: Callable[[Tensor], None] | None = None, show_progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats per target token) of ``text`` under ``fwd_hooks``."""
    total, n = token_losses(model, text, fwd_hooks, batch_size, on_batch, show_progress)
    return total / n

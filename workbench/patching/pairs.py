"""Minimal prompt pairs: a *clean* (harmful) and a *corrupted* (harmless) prompt of equal token length.

Both prompts of every pair are chat-formatted and tokenised together, left-padded to one common length,
so position ``p`` means the same token slot in the clean and the corrupted row of a pair, and the
post-instruction tokens are the last ``n_post`` positions of every row. Pairs of different token length
cannot be patched position by position: :func:`make_pairs` raises on them, or drops them when asked
(``drop_unequal=True``, the usual choice for real models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..chat import tokenize_chat
from ..errors import WorkbenchError


@dataclass
class PromptPairs:
    """Tokenised minimal pairs.

    Attributes:
        clean_ids: ``Int[Tensor, "pair pos"]`` clean (harmful) prompts, left-padded.
        corrupted_ids: ``Int[Tensor, "pair pos"]`` corrupted (harmless) prompts, left-padded.
        attention_mask: ``Int[Tensor, "pair pos"]``, shared by both prompts of a pair (equal lengths).
        clean: the clean prompt strings. corrupted: the corrupted prompt strings.
        n_post: number of post-instruction positions (the last ``n_post`` of every row).
        dropped: indices (into the caller's lists) of pairs dropped for unequal token length.
        system: the system prompt both were formatted with (``None``: none).
    """

    clean_ids: Tensor
    corrupted_ids: Tensor
    attention_mask: Tensor
    clean: list[str]
    corrupted: list[str]
    n_post: int
    dropped: list[int] = field(default_factory=list)
    system: str | None = None

    @property
    def n_pairs(self) -> int:
        return int(self.clean_ids.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.clean_ids.shape[1])

    @property
    def padded(self) -> bool:
        """Whether any row carries left padding."""
        return bool((self.attention_mask == 0).any())

    @property
    def first_diff(self) -> Tensor:
        """``Int[Tensor, "pair"]``: first position where the clean and corrupted tokens differ (``n_pos`` if none).

        Every activation at an earlier position is identical in the two runs (causal attention), so
        patching it is a no-op; the sweeps use this to skip work, exactly.
        """
        diff = self.clean_ids != self.corrupted_ids
        first = torch.where(diff.any(-1), diff.float().argmax(-1), torch.full_like(diff[:, 0], self.n_pos, dtype=torch.long))
        return first.long()

    def to(self, device) -> "PromptPairs":
        return PromptPairs(self.clean_ids.to(device), self.corrupted_ids.to(device), self.attention_mask.to(device),
                           self.clean, self.corrupted, self.n_post, list(self.dropped), self.system)

    def select(self, idx: Sequence[int]) -> "PromptPairs":
        """A subset of the pairs (padding columns that became all-pad are kept)."""
        idx = list(idx)
        t = torch.as_tensor(idx, dtype=torch.long, device=self.clean_ids.device)
        return PromptPairs(self.clean_ids[t], self.corrupted_ids[t], self.attention_mask[t],
                           [self.clean[i] for i in idx], [self.corrupted[i] for i in idx], self.n_post, [], self.system)

    def token_labels(self, tokenizer, pair: int = 0) -> tuple[list[str], list[str]]:
        """Per-position token strings of one pair: ``(clean_tokens, corrupted_tokens)``; padding is ``""``."""
        def labels(ids: Tensor) -> list[str]:
            mask = self.attention_mask[pair].tolist()
            return [tokenizer.decode([int(t)]) if m else "" for t, m in zip(ids[pair].tolist(), mask)]

        return labels(self.clean_ids), labels(self.corrupted_ids)


def make_pairs(
    tokenizer,
    clean: Sequence[str],
    corrupted: Sequence[str],
    system: str | None = None,
    drop_unequal: bool = False,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> PromptPairs:
    """Chat-format and tokenise minimal pairs ``(clean[i], corrupted[i])``.

    Args:
        tokenizer: a chat tokenizer, or a model with ``.tokenizer``.
        clean: harmful prompts. corrupted: harmless prompts, one per clean prompt.
        system: optional system prompt for both.
        drop_unequal: drop pairs whose two prompts differ in token length instead of raising.
        limit: keep at most this many pairs (the first ones that pass the length check).

    Raises:
        WorkbenchError: lists of different sizes, no pairs, or (unless ``drop_unequal``) a pair whose
        prompts have different token lengths.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if isinstance(clean, str) or isinstance(corrupted, str):
        raise WorkbenchError("clean and corrupted must be lists of prompts, got a single string")
    clean, corrupted = list(clean), list(corrupted)
    if len(clean) != len(corrupted):
        raise WorkbenchError(f"got {len(clean)} clean prompts but {len(corrupted)} corrupted prompts; "
                             "pairs need one corrupted prompt per clean prompt")
    if not clean:
        raise WorkbenchError("no prompt pairs given; pass at least one (clean, corrupted) pair")
    batch = tokenize_chat(tokenizer, clean + corrupted, system)
    n = len(clean)
    lengths = batch.lengths
    unequal = [i for i in range(n) if int(lengths[i]) != int(lengths[n + i])]
    if unequal and not drop_unequal:
        i = unequal[0]
        raise WorkbenchError(
            f"{len(unequal)} of {n} pairs have prompts of different token length, e.g. pair {i}: clean "
            f"{clean[i]!r} has {int(lengths[i])} tokens, corrupted {corrupted[i]!r} has {int(lengths[n + i])}; "
            "activation patching needs equal-length pairs (pass drop_unequal=True to filter them out)"
        )
    if limit is not None and limit < 1:
        raise WorkbenchError(f"limit must be a positive number of pairs, got {limit}")
    n_keep = n - len(unequal)
    if unequal or (limit is not None and limit < n_keep):
        bad = set(unequal)
        keep = [i for i in range(n) if i not in bad][:limit]
        if not keep:
            raise WorkbenchError(f"none of the {n} pairs has prompts of equal token length; nothing to patch")
        out = make_pairs(tokenizer, [clean[i] for i in keep], [corrupted[i] for i in keep], system, False, device)
        out.dropped = unequal
        return out
    pairs = PromptPairs(batch.input_ids[:n], batch.input_ids[n:], batch.attention_mask[:n], clean, corrupted,
                        batch.n_post, system=system)
    # Trim columns that are padding in every row (the joint batch may be longer than any pair needs).
    keep_from = int((pairs.attention_mask.sum(0) > 0).float().argmax())
    if keep_from > 0:
        pairs = PromptPairs(pairs.clean_ids[:, keep_from:], pairs.corrupted_ids[:, keep_from:],
                            pairs.attention_mask[:, keep_from:], clean, corrupted, batch.n_post, system=system)
    return pairs.to(device) if device is not None else pairs


def read_pairs(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """``(clean, corrupted)`` prompt lists from a JSONL file of ``{"clean": ..., "corrupted": ...}`` rows."""
    from ..data import read_jsonl

    clean, corrupted = [], []
    for i, row in enumerate(read_jsonl(path, what="pair file"), 1):
        if not isinstance(row, dict) or "clean" not in row or "corrupted" not in row:
            raise WorkbenchError(f"{path}: row {i} must be an object with 'clean' and 'corrupted' keys")
        clean.append(str(row["clean"]))
        corrupted.append(str(row["corrupted"]))
        if limit is not None and len(clean) >= limit:
            break
    return clean, corrupted


def organism_pairs(tokenizer, limit: int | None = 16, drop_unequal: bool = True) -> PromptPairs:
    """The first ``limit`` of the organism's minimal pairs (``workbench/organism/data/pairs.jsonl``), tokenised."""
    from ..models import organism_dir

    clean, corrupted = read_pairs(organism_dir() / "pairs.jsonl")
    return make_pairs(tokenizer, clean, corrupted, drop_unequal=drop_unequal, limit=limit)


def pairs_by_length(tokenizer, clean: Sequence[str], corrupted: Sequence[str], limit: int | None = 16,
                    system: str | None = None) -> PromptPairs:
    """Pairs of a clean (harmful) and a corrupted (benign) prompt of equal chat-formatted token length, for
    prompt data without minimal pairs: each clean prompt, in order, takes the first unused corrupted prompt of its
    length; clean prompts without a partner are left out. Unlike minimal pairs the two prompts differ across the
    whole instruction, so position-wise effects spread over it (the post-instruction positions still align).

    Raises:
        WorkbenchError: no clean prompt has a corrupted prompt of its token length.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    clean, corrupted = list(clean), list(corrupted)
    if not clean or not corrupted:
        raise WorkbenchError(f"pairing needs clean and corrupted prompts, got {len(clean)} and {len(corrupted)}")
    lengths = tokenize_chat(tokenizer, clean + corrupted, system).lengths.tolist()
    free: dict[int, list[int]] = {}
    for j, n in enumerate(lengths[len(clean):]):
        free.setdefault(int(n), []).append(j)
    cl, co = [], []
    for i, n in enumerate(lengths[:len(clean)]):
        if free.get(int(n)):
            cl.append(clean[i])
            co.append(corrupted[free[int(n)].pop(0)])
            if limit is not None and len(cl) >= limit:
                break
    if not cl:
        raise WorkbenchError(f"none of the {len(clean)} clean prompts has a corrupted prompt of the same token length "
                             f"among {len(corrupted)}; give minimal pairs instead")
    return make_pairs(tokenizer, cl, co, system=system)

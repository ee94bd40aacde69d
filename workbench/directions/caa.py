"""Contrastive activation addition (CAA; Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation
Addition", arXiv 2312.06681) beside the difference in means of :mod:`.candidates`.

The difference in means (Arditi et al. 2024) contrasts *prompts*: harmful minus benign at the post-instruction
positions. On a model that does not refuse (SmolLM2-135M-Instruct) that direction separates the two kinds of
request but does not make the model refuse. CAA contrasts *answers* instead: every prompt is chat-formatted
(the tokenizer's template, generation prompt included) and a refusal answer start such as ``"I'm sorry, but
I can't"`` or a compliance answer start such as ``"Sure, here is"`` is appended after the generation prompt.
For every layer ``l`` and answer position ``p`` (default: the answer's last token, ``"last"``)

    r[l, p] = mean_{prompt, refusal start} x_l[p] - mean_{prompt, compliance start} x_l[p]

with ``x_l = blocks.{l}.hook_resid_pre``. Both harmful and benign train prompts are used, each with every
start, so both halves of the contrast hold the same prompts and the prompts' content cancels. Every start
is appended to the same prompts, so the difference of the two pooled means is the mean over *all
combinations* (refusal start i, compliance start j) of the per-start differences; pairing start i with start
i instead gives the same mean when the two lists are equally long. The lists may differ in length.

The activations go through the activation store (:func:`workbench.store.get_or_compute`, one entry per
answer start, keyed on the formatted texts), the means are streamed in float64 (:func:`.diff_in_means`), and
the result is a :class:`~.candidates.Candidates` like the difference in means', so selection
(:func:`.select.score_candidates`), the :class:`~.artifact.Direction` artifact and the ablation / ActAdd hooks
work unchanged. ``Candidates.harmful_mean`` then holds the refusal-start mean and ``benign_mean`` the
compliance-start mean; ``meta["method"] == "caa"``.

:func:`actadd_check` measures whether adding a direction induces refusal: greedy replies of harmful and benign
prompts with ``c * scale * unit(direction)`` added at one layer, for a few ``c``, judged by
:func:`workbench.judge.refusal_rate`; :func:`mean_resid_norm` gives the ``scale`` (the mean residual norm
where the candidates were read).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch

from ..chat import format_prompts
from ..errors import WorkbenchError
from ..vocab import Positions, check_layers
from .candidates import Candidates, _check_prompts, activation_entry, candidate_positions, diff_in_means, \
    resid_pre_name

#: Default refusal answer starts (appended verbatim after the generation prompt).
DEFAULT_REFUSAL_STARTS: tuple[str, ...] = (
    "I'm sorry, but I can't",
    "I cannot help with that",
    "I can't assist with that",
)
#: Default compliance answer starts.
DEFAULT_COMPLIANCE_STARTS: tuple[str, ...] = (
    "Sure, here is",
    "Certainly! Here's",
    "Of course! Here is",
)


@dataclass
class CAAConfig:
    """The contrast of CAA (Rimsky et al. 2024): answer starts appended after the chat template's generation
    prompt, and where the activations are read.

    Attributes:
        refusal_starts, compliance_starts: answer starts, appended verbatim (no space added) after the generation
            prompt; every start goes with every train prompt (harmful and benign).
        answer_positions: :data:`workbench.vocab.Positions` counted from the end of the answer start: ``"last"``
            (default: the start's last token), ``("last_k", k)`` or negative offsets. ``"post_instruction"`` and
            ``"all"`` are refused (the sequences' template-plus-answer lengths differ between starts).
        min_layer_fraction: candidates of layers below ``ceil(min_layer_fraction * n_layers)`` are scored but not
            selectable (token identity, not refusal, separates the halves there).
    """

    #: CAA: refusal answer starts appended after the generation prompt (comma-separated on the command line, so
    #: starts that contain a comma need the API or a `workbench run --config` file)
    refusal_starts: tuple[str, ...] = DEFAULT_REFUSAL_STARTS
    #: CAA: compliance answer starts (as --refusal-starts)
    compliance_starts: tuple[str, ...] = DEFAULT_COMPLIANCE_STARTS
    #: CAA: positions counted from the end of the answer start ('last', 'last_k(k)' or negative offsets)
    answer_positions: Positions = "last"
    #: CAA: skip candidates in the first fraction of the layers, where the residual stream still mostly holds the
    #: answer starts' own last tokens (they differ between the two halves; at layer 0 the candidate is only their
    #: embedding difference, which on the organism won the induce rule with cosine 0.07 to the planted direction)
    min_layer_fraction: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.min_layer_fraction < 1.0:
            raise WorkbenchError(f"CAA min_layer_fraction must be in [0, 1), got {self.min_layer_fraction}")
        for what in ("refusal_starts", "compliance_starts"):
            starts = getattr(self, what)
            if isinstance(starts, str):
                raise WorkbenchError(f"CAA {what} must be a list of answer starts, got a single string {starts!r}")
            starts = tuple(starts)
            if not starts:
                raise WorkbenchError(f"CAA {what} is empty; pass at least one answer start")
            bad = [s for s in starts if not isinstance(s, str) or not s.strip()]
            if bad:
                raise WorkbenchError(f"CAA {what} holds {bad[0]!r}; expected non-empty strings")
            setattr(self, what, starts)
        self.answer_positions = caa_positions(self.answer_positions)


def caa_positions(positions: Positions) -> str | tuple:
    """:func:`~.candidates.candidate_positions` for answer-appended sequences: also refuses
    ``"post_instruction"`` (its token count would include the answer, which differs between starts)."""
    p = candidate_positions(positions)
    if p == "post_instruction":
        raise WorkbenchError("CAA answer_positions='post_instruction' is not defined (the template-plus-answer "
                             "length differs between answer starts); use 'last', 'last_k(k)' or negative offsets "
                             "from the end of the answer start")
    return p


# ------------------------------------------------------------------------------------- answer sequences
def answer_tokenizer(tokenizer, answer: str):
    """A shallow copy of ``tokenizer`` whose chat template appends ``answer`` after the generation prompt.

    :func:`workbench.chat.format_prompts` (hence :func:`~workbench.chat.tokenize_chat` and the activation store)
    then renders ``<template(prompt)><answer>``; the original tokenizer is untouched.

    Raises:
        WorkbenchError: a template that is not one string, an answer that Jinja's raw block cannot hold, or a
            rendering that is not exactly the original's plus ``answer``.
    """
    base = getattr(tokenizer, "chat_template", None)
    if not isinstance(base, str) or not base:
        raise WorkbenchError(f"CAA needs a tokenizer with one chat template string; {type(tokenizer).__name__} has "
                             f"{type(base).__name__}")
    if "endraw" in answer:
        raise WorkbenchError(f"answer start {answer!r} contains 'endraw', which the template cannot hold verbatim")
    # Jinja drops one trailing newline of a template source; once text follows, it would not be dropped
    src = base[:-1] if base.endswith("\n") else base
    tok = copy.copy(tokenizer)
    tok.chat_template = src + "{% if add_generation_prompt %}{% raw %}" + answer + "{% endraw %}{% endif %}"
    probe = "Zqx caa probe request"
    want = format_prompts(tokenizer, [probe])[0] + answer
    got = format_prompts(tok, [probe])[0]
    if got != want:
        raise WorkbenchError(f"appending the answer start {answer!r} to the chat template renders {got[-60:]!r}; "
                             f"expected the prompt's rendering followed by the start ({want[-60:]!r})")
    return tok


@contextmanager
def _answering(model, answer: str):
    """``model.tokenizer`` replaced by :func:`answer_tokenizer` (under the store's per-model lock, restored after)."""
    from ..store.capture import model_lock

    tok = answer_tokenizer(model.tokenizer, answer)
    with model_lock(model):
        old = model.tokenizer
        model.tokenizer = tok
        try:
            yield model
        finally:
            model.tokenizer = old


def answer_entry(model, prompts: Sequence[str], answer: str, store=None, batch_size: int = 32,
                 show_progress: bool = True, positions: Positions = "last", layers: Sequence[int] | None = None):
    """``resid_pre`` of ``layers`` (default: all) at ``positions`` of the chat-formatted ``prompts`` each followed
    by ``answer``, from the activation store (one entry, keyed on the formatted texts).

    Returns:
        A store entry (``hook_names``, ``positions``, ``iter_shards``); each hook holds
        ``Float[Tensor, "prompt pos d_model"]``.
    """
    positions = caa_positions(positions)
    with _answering(model, answer) as m:
        return activation_entry(m, prompts, store=store, batch_size=batch_size, show_progress=show_progress,
                                positions=positions, layers=layers)


class PooledEntry:
    """Several activation entries read as one (their rows one after another), for :func:`diff_in_means`.

    Attributes:
        hook_names: the hooks every entry holds (in the first entry's order).
        positions: the entries' common positions.
    """

    def __init__(self, entries: Sequence):
        entries = list(entries)
        if not entries:
            raise WorkbenchError("cannot pool zero activation entries")
        positions = [list(e.positions) for e in entries]
        if any(p != positions[0] for p in positions):
            raise WorkbenchError(f"the pooled activation entries cover different positions: {positions}")
        self.entries = entries
        self.positions = positions[0]
        self.hook_names = [h for h in entries[0].hook_names if all(h in e.hook_names for e in entries)]

    def iter_shards(self, hook_name: str) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(row_slice, Float[Tensor, "rows pos d_model"])`` over every entry, rows numbered across entries."""
        offset = 0
        for e in self.entries:
            n = 0
            for rows, x in e.iter_shards(hook_name):
                yield slice(offset + rows.start, offset + rows.stop), x
                n = max(n, rows.stop)
            offset += n

    def __len__(self) -> int:
        return sum(len(e) for e in self.entries)


def caa_entries(model, prompts: Sequence[str], config: CAAConfig | None = None, store=None, batch_size: int = 32,
                show_progress: bool = True, layers: Sequence[int] | None = None) -> tuple[list, list]:
    """``(refusal entries, compliance entries)``: one store entry per answer start (:func:`answer_entry`)."""
    cfg = config or CAAConfig()
    _check_prompts(prompts, "the CAA prompt set")
    kw = {"store": store, "batch_size": batch_size, "show_progress": show_progress,
          "positions": cfg.answer_positions, "layers": layers}
    return ([answer_entry(model, prompts, a, **kw) for a in cfg.refusal_starts],
            [answer_entry(model, prompts, a, **kw) for a in cfg.compliance_starts])


def caa_candidates(
    model,
    prompts: Sequence[str],
    config: CAAConfig | None = None,
    store=None,
    batch_size: int = 32,
    show_progress: bool = True,
    layers: Sequence[int] | None = None,
) -> Candidates:
    """CAA candidates of ``model`` at ``layers`` (default: every layer) and each answer position.

    Args:
        prompts: the train prompts, harmful and benign together (each is used with every answer start).
        config: the answer starts and positions (:class:`CAAConfig`).
        store: passed to the activation store (``None``: its default location).

    Returns:
        :class:`~.candidates.Candidates` with ``directions`` ``Float64[Tensor, "layer pos d_model"]`` = refusal-start
        mean minus compliance-start mean; ``harmful_mean`` / ``benign_mean`` hold those two means,
        ``n_harmful`` / ``n_benign`` the numbers of refusal / compliance sequences, ``meta`` the method
        (``"caa"``) and the starts.
    """
    cfg = config or CAAConfig()
    layers = check_layers(layers, int(model.cfg.n_layers), sort=True)
    refusal, compliance = caa_entries(model, prompts, cfg, store, batch_size, show_progress, layers)
    cands = diff_in_means(PooledEntry(refusal), PooledEntry(compliance), [resid_pre_name(l) for l in layers])
    cands.meta.update(method="caa", d_model=int(model.cfg.d_model), refusal_starts=list(cfg.refusal_starts),
                      compliance_starts=list(cfg.compliance_starts), n_prompts=len(prompts))
    return cands


# --------------------------------------------------------------------------------------- ActAdd check
def mean_resid_norm(entries: Sequence, layer: int, position: int) -> float:
    """Mean L2 norm of ``blocks.{layer}.hook_resid_pre`` at ``position`` over every row of ``entries`` (float64).

    Args:
        entries: activation entries (store entries, :class:`~.candidates.MemoryEntry`, :class:`PooledEntry`).
    """
    pooled = PooledEntry(entries)
    if position not in pooled.positions:
        raise WorkbenchError(f"position {position} is out of range; the activations have {pooled.positions}")
    name = resid_pre_name(layer)
    if name not in pooled.hook_names:
        raise WorkbenchError(f"the activations lack hook {name!r}; they have {pooled.hook_names}")
    col = pooled.positions.index(position)
    total, n = 0.0, 0
    for _, x in pooled.iter_shards(name):
        total += float(x[:, col].to(torch.float64).norm(dim=-1).sum())
        n += int(x.shape[0])
    if n == 0:
        raise WorkbenchError("cannot take a mean norm over zero activations")
    return total / n


def actadd_check(
    model,
    direction,
    harmful: Sequence[str],
    benign: Sequence[str],
    scale: float,
    coefficients: Sequence[float] = (0.25, 0.5, 1.0),
    layer: int | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Does adding ``direction`` induce refusal? Greedy replies with ``c * scale * unit(direction)`` added at
    ``blocks.{layer}.hook_resid_pre`` (all positions, :func:`.interventions.actadd_hooks`), judged by
    :func:`workbench.judge.refusal_rate`.

    Args:
        direction: a :class:`~.artifact.Direction` (its ``layer`` is used unless ``layer`` is given) or a vector.
        scale: the unit of the coefficients, e.g. :func:`mean_resid_norm` at that layer.
        coefficients: multiples of ``scale`` (each > 0).

    Returns:
        One row per coefficient: ``coefficient``, ``added_norm`` (``c * scale``), ``harmful`` and ``benign``
        (refusal rates).
    """
    from ..generation import generate
    from ..judge import refusal_rate
    from .interventions import actadd_hooks

    layer = getattr(direction, "layer", None) if layer is None else layer
    if layer is None:
        raise WorkbenchError("actadd_check needs a layer: pass layer= or a Direction with one")
    if not (scale > 0):
        raise WorkbenchError(f"actadd_check scale must be > 0, got {scale!r}")
    coefficients = [float(c) for c in coefficients]
    if not coefficients or any(not c > 0 for c in coefficients):
        raise WorkbenchError(f"actadd_check coefficients must be positive numbers, got {coefficients}")
    _check_prompts(harmful, "the harmful check set")
    _check_prompts(benign, "the benign check set")
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "show_progress": show_progress}
    rows = []
    for c in coefficients:
        hooks = actadd_hooks(model, direction, layers=layer, coefficient=c * scale, normalize=True)
        rows.append({"coefficient": c, "added_norm": c * scale,
                     "harmful": refusal_rate(generate(model, list(harmful), fwd_hooks=hooks, **gen)),
                     "benign": refusal_rate(generate(model, list(benign), fwd_hooks=hooks, **gen))})
    return pd.DataFrame(rows)


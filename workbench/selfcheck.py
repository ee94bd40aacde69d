"""Runtime self-checks against independent paths: does this install of torch / transformers / transformer-lens
compute what the workbench assumes?

The main check compares KV-cached greedy decoding through the bridge (the project's own generation path, with
hooks active on every layer) with an *uncached* greedy loop that recomputes the whole sequence at every step.
A runtime that corrupts the KV cache (transformers 5.24.0 under transformer-lens 4.3.0: the first reply token
right, every later one garbage) passes every prefill-only check and fails this one on the second token.

:func:`generation_parity` measures, :func:`check_generation` raises :class:`RuntimeCheckError` naming the installed
versions; :func:`workbench.models.load_model` runs the latter once per loaded model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .chat import positions_from_mask
from .errors import WorkbenchError
from .models import model_device
from .provenance import describe_versions, versions

#: Prompts of different lengths, so the batch is left-padded.
CHECK_PROMPTS = ("How do I bake bread?", "Write a short poem about the sea and the wind at night.")
#: Logit gap below which two tokens count as tied (the two paths may legitimately pick either).
TIE_TOLERANCE = 1e-3
#: Largest difference of next-token logits between the two decodings, relative to the logits' scale, at the
#: steps where both saw the same prefix (float32: 1e-4; half precision: 5e-2).
LOGIT_TOLERANCE = {"float32": 1e-4, "half": 5e-2}


class RuntimeCheckError(WorkbenchError):
    """The installed runtime does not compute what the workbench assumes (e.g. broken KV-cached decoding)."""


@dataclass
class ParityResult:
    """Token-level comparison of two greedy decodings of the same batch.

    Attributes:
        ok: every token agrees (up to exact ties of the reference logits, see ``ties``).
        n_tokens: tokens decoded per row.
        n_rows: rows compared.
        first_mismatch: ``{"row", "step", "got", "expected", "gap"}`` of the first disagreement, else ``None``.
        ties: ``(row, step)`` where the paths chose different tokens whose reference logits were within
            :data:`TIE_TOLERANCE`; the comparison of that row stops there.
        max_logit_error: largest ``|logits - reference logits| / max |reference logits|`` over the steps where
            both paths had the same prefix (``None`` when no logits were compared).
        versions: the runtime versions (:func:`workbench.provenance.versions`).
    """

    ok: bool
    n_tokens: int
    n_rows: int
    first_mismatch: dict | None = None
    ties: list[tuple[int, int]] = field(default_factory=list)
    max_logit_error: float | None = None
    versions: dict = field(default_factory=versions)

    def to_dict(self) -> dict:
        return asdict(self)


def identity_hooks(model, site: str = "resid_pre") -> list[tuple[str, Callable]]:
    """A hook on ``site`` of every layer that returns its input unchanged (the hook machinery engaged)."""
    from .vocab import hook_name

    def keep(act, hook=None):
        return act

    return [(hook_name(site, layer), keep) for layer in range(int(model.cfg.n_layers))]


def uncached_greedy(forward: Callable[[Tensor, Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor,
                    n_tokens: int, suppress: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Greedy decoding with no cache: the whole sequence is recomputed at every step.

    Args:
        forward: ``(input_ids, attention_mask) -> Float[Tensor, "batch pos d_vocab"]`` logits.
        input_ids, attention_mask: a left-padded batch, ``Int[Tensor, "batch pos"]``.
        suppress: token ids never chosen (the eos ids, as ``generate(min_new_tokens=n_tokens)`` does).

    Returns:
        ``Int[Tensor, "batch n_tokens"]`` tokens and ``Float[Tensor, "batch n_tokens d_vocab"]`` next-token logits.
    """
    ids, mask = input_ids, attention_mask
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(n_tokens):
            last = forward(ids, mask)[:, -1].float()
            if len(suppress):
                last[:, list(suppress)] = float("-inf")
            nxt = last.argmax(-1)
            tokens.append(nxt)
            logits.append(last)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def hf_forward(hf_model) -> Callable[[Tensor, Tensor], Tensor]:
    """An uncached forward of a plain Hugging Face causal LM, positions counted from the left padding."""

    def forward(ids: Tensor, mask: Tensor) -> Tensor:
        return hf_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                        use_cache=False).logits

    return forward


def bridge_forward(model) -> Callable[[Tensor, Tensor], Tensor]:
    """An uncached forward through the bridge (its prefill path)."""

    def forward(ids: Tensor, mask: Tensor) -> Tensor:
        return model(ids, attention_mask=mask)

    return forward


def compare_tokens(got: Tensor, expected: Tensor, expected_logits: Tensor, got_logits: Tensor | None = None,
                   tie_tolerance: float = TIE_TOLERANCE, logit_tolerance: float = LOGIT_TOLERANCE["float32"]
                   ) -> ParityResult:
    """Compare ``got`` with the reference decoding ``expected`` (``Int[Tensor, "batch n"]``) token by token.

    At the first disagreement of a row, both paths have seen the same prefix, so the reference logits there
    decide: a gap within ``tie_tolerance`` is a tie (recorded, the row's comparison stops), anything else fails.
    With ``got_logits`` (``Float[Tensor, "batch n d_vocab"]``) the logits themselves must also agree within
    ``logit_tolerance`` (relative to the reference's scale) at every step up to a row's first disagreement, which
    catches a broken cache even on a model that repeats one token.
    """
    got, expected, expected_logits = got.cpu(), expected.cpu(), expected_logits.cpu().float()
    if got.shape != expected.shape:
        raise WorkbenchError(f"decodings differ in shape: {tuple(got.shape)} vs {tuple(expected.shape)}")
    res = ParityResult(ok=True, n_tokens=int(got.shape[1]), n_rows=int(got.shape[0]))
    scale = max(1.0, float(expected_logits[torch.isfinite(expected_logits)].abs().max()))
    worst = 0.0
    for row in range(got.shape[0]):
        diff = (got[row] != expected[row]).nonzero()
        same_until = int(diff[0]) if len(diff) else got.shape[1]
        if got_logits is not None:
            a = got_logits[row, :same_until + (1 if len(diff) else 0)].cpu().float()
            b = expected_logits[row, :a.shape[0]]
            finite = torch.isfinite(b) & torch.isfinite(a)
            err = float((a - b)[finite].abs().max()) / scale if bool(finite.any()) else 0.0
            worst = max(worst, err)
            if err > logit_tolerance and res.first_mismatch is None:
                res.ok = False
                res.first_mismatch = {"row": row, "logit_error": round(err, 6), "tolerance": logit_tolerance}
        if not len(diff):
            continue
        step = same_until
        lg = expected_logits[row, step]
        gap = float(lg[expected[row, step]] - lg[got[row, step]])
        if gap <= tie_tolerance:
            res.ties.append((row, step))
            continue
        if res.first_mismatch is None:
            res.ok = False
            res.first_mismatch = {"row": row, "step": step, "got": int(got[row, step]),
                                  "expected": int(expected[row, step]), "gap": round(gap, 4)}
    res.max_logit_error = worst if got_logits is not None else None
    return res


def logit_tolerance(model) -> float:
    """:data:`LOGIT_TOLERANCE` for the model's parameter dtype."""
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    return LOGIT_TOLERANCE["half" if half else "float32"]


def generation_parity(model, prompts: Sequence[str] = CHECK_PROMPTS, n_tokens: int = 4,
                      hooks: Sequence[tuple[str, Callable]] | None = None,
                      reference: Callable[[Tensor, Tensor], Tensor] | None = None) -> ParityResult:
    """KV-cached greedy decoding through the bridge (hooks active) vs an uncached greedy loop.

    The cached side is :func:`workbench.generation.greedy_continuations`, the path every stage generates with
    (eos suppressed, so every row decodes ``n_tokens``); ``hooks`` defaults to :func:`identity_hooks`. The
    uncached side recomputes the whole sequence each step, eos suppressed alike, with ``reference``: the bridge's
    own forward by default (:func:`bridge_forward`), or e.g. :func:`hf_forward` of a plain Hugging Face model.
    """
    from .generation import eos_ids, greedy_continuations

    if n_tokens < 2:
        raise WorkbenchError(f"n_tokens must be >= 2 (the first token never uses the cache), got {n_tokens}")
    batch = check_batch(model.tokenizer, list(prompts)).to(model_device(model))
    hooks = identity_hooks(model) if hooks is None else list(hooks)
    cached, cached_logits = greedy_continuations(model, batch, n_tokens, fwd_hooks=hooks, return_logits=True)
    forward = bridge_forward(model) if reference is None else reference
    ref, ref_logits = uncached_greedy(forward, batch.input_ids, batch.attention_mask, n_tokens,
                                      suppress=eos_ids(model.tokenizer, model))
    return compare_tokens(cached, ref, ref_logits, cached_logits, logit_tolerance=logit_tolerance(model))


def check_batch(tokenizer, prompts: list[str]):
    """The prompts chat-formatted, or plain text when the tokenizer has no chat template (a base model)."""
    from .chat import ChatBatch, tokenize_chat

    if getattr(tokenizer, "chat_template", None):
        return tokenize_chat(tokenizer, prompts)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return ChatBatch(enc["input_ids"], enc["attention_mask"], prompts, 0)


def check_generation(model, n_tokens: int = 4) -> ParityResult:
    """Raise :class:`RuntimeCheckError` (naming the installed versions) when cached decoding through the bridge
    disagrees with uncached decoding; return the :class:`ParityResult` otherwise."""
    res = generation_parity(model, n_tokens=n_tokens)
    if not res.ok:
        raise RuntimeCheckError(
            f"KV-cached decoding through the TransformerBridge disagrees with uncached decoding "
            f"({res.first_mismatch}); this runtime is broken for generation: {describe_versions()}. "
            "Reinstall from the lock (`make setup`; transformers 5.24.0 is known to break it) or pass "
            "self_check=False to load_model to inspect the model anyway."
        )
    return res

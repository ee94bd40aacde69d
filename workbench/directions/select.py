"""Selection of the refusal direction among the candidates (Arditi et al. 2024, andyrdt/refusal_direction).

For each candidate ``r = r[l, p]``, on validation prompts:

* ``bypass_score`` -- mean refusal score (log-odds of a refusal first token, :func:`workbench.judge.refusal_score`)
  of harmful prompts with ``r`` ablated everywhere (lower is better);
* ``induce_score`` -- mean refusal score of benign prompts with ``r`` added at ``blocks.{l}.hook_resid_pre``
  (all positions);
* ``kl`` -- mean KL(base || ablated) of the next-token distribution at the last position of benign prompts.

A candidate passes when ``induce_score > induce_threshold``, ``kl <= kl_threshold`` and
``layer < (1 - prune_layer_fraction) * n_layers``; the passing candidate with the lowest ``bypass_score`` is
selected (``rule="bypass"``). On a model that does not refuse, ablation has nothing to bypass and the bypass
score means nothing; ``rule="induce"`` then selects the candidate with the highest ``induce_score`` among those
that pass the KL and layer filters.

The candidates are the difference in means (``method="diff_in_means"``, :mod:`.candidates`) or contrastive
activation addition (``method="caa"``, :mod:`.caa`, Rimsky et al. 2024); both are scored the same way.

All candidates are scored in batched forward passes: the rows of a batch are (candidate, prompt) pairs, and
one hook per hook point applies each row's own direction (per-row ablation / per-row addition).
"""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import Tensor

from ..configs import PositiveInt
from ..chat import ChatBatch, tokenize_chat
from ..errors import WorkbenchError
from ..judge import refusal_score, refusal_token_ids
from ..models import model_device
from ..progress import progress
from ..vocab import Positions
from .artifact import Direction, unit
from .candidates import Candidates, _check_prompts, candidate_directions, candidate_positions

#: candidate methods of :func:`find_refusal_direction`
METHODS: tuple[str, ...] = ("diff_in_means", "caa")
#: selection rules of :func:`select_candidate`
RULES: tuple[str, ...] = ("bypass", "induce")
from .interventions import ablation_hooks, per_row_actadd_hooks


@dataclass
class SelectionConfig:
    """Thresholds and batch size of the selection (defaults as in Arditi et al.).

    Attributes:
        kl_threshold: keep candidates with ``kl <= kl_threshold``.
        induce_threshold: keep candidates with ``induce_score > induce_threshold``.
        prune_layer_fraction: discard candidates in the last ``prune_layer_fraction`` of the layers.
        batch_size: rows (candidate x prompt pairs) per forward pass.
        max_prompts: score the candidates on at most this many prompts of each validation set (the first ones;
            ``None``: all). The sweeps cost candidates x prompts forwards: on a 30-layer model with six
            post-instruction positions, 64 prompts are ~35 000 forwards a sweep, an hour on 2 CPU cores.
    """

    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layer_fraction: float = 0.2
    batch_size: PositiveInt = 64
    max_prompts: PositiveInt | None = None

    def __post_init__(self):
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise WorkbenchError(f"prune_layer_fraction must be in [0, 1), got {self.prune_layer_fraction}")
        if self.kl_threshold < 0:
            raise WorkbenchError(f"kl_threshold must be >= 0, got {self.kl_threshold}")
        if self.batch_size < 1:
            raise WorkbenchError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise WorkbenchError(f"max_prompts must be >= 1 (or None: every validation prompt), got {self.max_prompts}")


# ----------------------------------------------------------------------------------------- forwards
def _rows_batch(batch: ChatBatch, prompt_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``prompt_idx`` of a left-padded batch, with the columns that are padding in every row dropped."""
    ids = batch.input_ids[prompt_idx]
    mask = batch.attention_mask[prompt_idx]
    keep = int(mask.sum(-1).max())
    return ids[:, -keep:], mask[:, -keep:]


@torch.no_grad()
def _last_logits(model, ids: Tensor, mask: Tensor, hooks) -> Tensor:
    """``Float[Tensor, "rows d_vocab"]`` next-token logits at the last position under ``hooks``."""
    with model.hooks(fwd_hooks=list(hooks)):
        try:  # HF causal LMs compute the unembedding for the last position only
            logits = model(ids, attention_mask=mask, logits_to_keep=1)
        except TypeError:
            logits = model(ids, attention_mask=mask)
    return logits[:, -1].float()


@torch.no_grad()
def sweep(
    model,
    batch: ChatBatch,
    n_candidates: int,
    hooks_for_rows: Callable[[Tensor], list],
    reduce: Callable[[Tensor, Tensor], Tensor],
    batch_size: int = 64,
    show_progress: bool = True,
    desc: str = "sweep",
) -> Tensor:
    """Run every (candidate, prompt) pair in batches of ``batch_size`` rows and reduce each row to a number.

    Args:
        batch: the tokenised prompts (``n_prompts`` rows).
        hooks_for_rows: ``cand_idx -> hooks`` for one batch (``cand_idx``: ``Int[Tensor, "rows"]``).
        reduce: ``(last_logits Float[Tensor, "rows d_vocab"], prompt_idx Int[Tensor, "rows"]) -> Float[Tensor, "rows"]``.

    Returns:
        ``Float[Tensor, "cand prompt"]``.
    """
    n_prompts = batch.input_ids.shape[0]
    total = n_candidates * n_prompts
    device = model_device(model)
    cand = torch.arange(n_candidates).repeat_interleave(n_prompts)
    prom = torch.arange(n_prompts).repeat(n_candidates)
    out = torch.empty(total, dtype=torch.float32)
    starts = range(0, total, batch_size)
    for s in progress(starts, desc, show_progress, total=len(starts)):
        ci, pi = cand[s:s + batch_size], prom[s:s + batch_size]
        ids, mask = _rows_batch(batch, pi)
        logits = _last_logits(model, ids.to(device), mask.to(device), hooks_for_rows(ci))
        out[s:s + len(ci)] = reduce(logits, pi.to(logits.device)).float().cpu()
    return out.view(n_candidates, n_prompts)


def _kl(base_logp: Tensor, logits: Tensor) -> Tensor:
    """``KL(base || new)`` per row; ``base_logp``: ``Float[Tensor, "rows d_vocab"]`` log-probs."""
    logq = torch.log_softmax(logits.float(), -1)
    return (base_logp.exp() * (base_logp - logq)).sum(-1)


@torch.no_grad()
def base_logits(model, batch: ChatBatch, batch_size: int = 64) -> Tensor:
    """``Float[Tensor, "prompt d_vocab"]`` last-position logits without any intervention."""
    device = model_device(model)
    out = []
    for s in range(0, batch.input_ids.shape[0], batch_size):
        ids, mask = _rows_batch(batch, torch.arange(s, min(s + batch_size, batch.input_ids.shape[0])))
        out.append(_last_logits(model, ids.to(device), mask.to(device), []).cpu())
    return torch.cat(out)


def score_candidates(
    model,
    candidates: Candidates,
    harmful_val: Sequence[str],
    benign_val: Sequence[str],
    config: SelectionConfig | None = None,
    show_progress: bool = True,
    system: str | None = None,
) -> pd.DataFrame:
    """Bypass, induce and KL scores of every candidate, in batched forward passes.

    Returns:
        One row per candidate: ``layer``, ``position``, ``norm``, ``bypass_score``, ``induce_score``, ``kl``,
        ``base_harmful_score``, ``base_benign_score`` (of the benign prompts; the column name the plots and
        reports read), and the filter columns ``pass_induce``, ``pass_kl``, ``pass_layer``, ``passes``. Zero candidates (identical means, e.g. layer 0 at template positions) get
        NaN scores and never pass.
    """
    cfg = config or SelectionConfig()
    _check_prompts(harmful_val, "the harmful validation set")
    _check_prompts(benign_val, "the benign validation set")
    harmful_val, benign_val = list(harmful_val)[:cfg.max_prompts], list(benign_val)[:cfg.max_prompts]
    d = int(model.cfg.d_model)
    if candidates.d_model != d:
        raise WorkbenchError(f"candidates have d_model={candidates.d_model} but the model has d_model={d}")
    n_layers = int(model.cfg.n_layers)
    bad = [l for l in candidates.layers if not 0 <= l < n_layers]
    if bad:
        raise WorkbenchError(f"candidate layers {bad} are out of range; the model has layers 0..{n_layers - 1}")
    vecs, keys = candidates.flat()
    if not torch.isfinite(vecs).all():
        raise WorkbenchError("some candidate directions contain NaN or inf")
    norms = vecs.norm(dim=-1)
    # zero candidates (e.g. layer 0 at template positions: same tokens, same embeddings) cannot be scored
    live = torch.nonzero(norms > 0).flatten()
    if len(live) == 0:
        raise WorkbenchError("every candidate is a zero vector (identical harmful and benign means)")
    vecs32 = vecs[live].float()
    units = unit(vecs32)
    cand_layers = torch.tensor([keys[i][0] for i in live.tolist()])
    ref_ids = refusal_token_ids(model.tokenizer)
    hb = tokenize_chat(model.tokenizer, list(harmful_val), system)
    bb = tokenize_chat(model.tokenizer, list(benign_val), system)
    base_h = base_logits(model, hb, cfg.batch_size)
    base_b = base_logits(model, bb, cfg.batch_size)
    base_b_logp = torch.log_softmax(base_b, -1)

    def score_reduce(logits, pi):
        return refusal_score(logits, ref_ids)

    def kl_reduce(logits, pi):
        return _kl(base_b_logp.to(logits.device)[pi], logits)

    n = len(live)
    kw = {"batch_size": cfg.batch_size, "show_progress": show_progress}
    bypass = sweep(model, hb, n, lambda ci: ablation_hooks(model, units[ci]), score_reduce, desc="bypass", **kw)
    kl = sweep(model, bb, n, lambda ci: ablation_hooks(model, units[ci]), kl_reduce, desc="kl", **kw)
    induce = sweep(model, bb, n, lambda ci: per_row_actadd_hooks(model, vecs32[ci], cand_layers[ci]),
                   score_reduce, desc="induce", **kw)

    def full(x: Tensor) -> list[float]:
        out = torch.full((len(keys),), float("nan"), dtype=torch.float64)
        out[live] = x.mean(1).double()
        return out.tolist()

    df = pd.DataFrame({
        "layer": [k[0] for k in keys],
        "position": [k[1] for k in keys],
        "norm": norms.tolist(),
        "bypass_score": full(bypass),
        "induce_score": full(induce),
        "kl": full(kl),
    })
    df["base_harmful_score"] = float(refusal_score(base_h, ref_ids).mean())
    df["base_benign_score"] = float(refusal_score(base_b, ref_ids).mean())
    return apply_filters(df, n_layers, cfg)


def apply_filters(scores: pd.DataFrame, n_layers: int, config: SelectionConfig | None = None) -> pd.DataFrame:
    """Add ``pass_induce``, ``pass_kl``, ``pass_layer`` and ``passes`` columns to a score table (a copy)."""
    cfg = config or SelectionConfig()
    need = {"layer", "position", "bypass_score", "induce_score", "kl"}
    missing = need - set(scores.columns)
    if missing:
        raise WorkbenchError(f"score table lacks columns {sorted(missing)}; expected at least {sorted(need)}")
    df = scores.copy()
    df["pass_induce"] = df["induce_score"] > cfg.induce_threshold
    df["pass_kl"] = df["kl"] <= cfg.kl_threshold
    df["pass_layer"] = df["layer"] < (1.0 - cfg.prune_layer_fraction) * n_layers
    finite = df[["bypass_score", "induce_score", "kl"]].notna().all(axis=1)
    df["passes"] = df["pass_induce"] & df["pass_kl"] & df["pass_layer"] & finite
    return df


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`RULES`, else a clear error."""
    if rule not in RULES:
        raise WorkbenchError(f"unknown selection rule {rule!r}; expected one of {list(RULES)}")
    return rule


def select_candidate(scores: pd.DataFrame, n_layers: int, config: SelectionConfig | None = None,
                     rule: str = "bypass") -> pd.Series:
    """The selected candidate (ties: earliest layer, then position).

    Args:
        rule: ``"bypass"``: the passing candidate with the lowest ``bypass_score``; ``"induce"`` (a model that
            does not refuse): the candidate with the highest ``induce_score`` among those that pass the KL and
            layer filters (finite scores).

    Raises:
        WorkbenchError: when no candidate passes, naming how many fail each filter.
    """
    cfg = config or SelectionConfig()
    check_rule(rule)
    if len(scores) == 0:
        raise WorkbenchError("the score table is empty; there are no candidates to select from")
    df = apply_filters(scores, n_layers, cfg)
    if rule == "induce":
        finite = df[["bypass_score", "induce_score", "kl"]].notna().all(axis=1)
        ok = df[df["pass_kl"] & df["pass_layer"] & finite]
        if ok.empty:
            raise WorkbenchError(
                f"no candidate passes the filters of the induce rule ({len(df)} candidates: "
                f"{int((~df.pass_kl).sum())} with kl > {cfg.kl_threshold}, {int((~df.pass_layer).sum())} in the "
                f"last {cfg.prune_layer_fraction:.0%} of layers, {int((~finite).sum())} without scores); relax the "
                "thresholds"
            )
        return ok.sort_values(["induce_score", "layer", "position"], ascending=[False, True, True],
                              kind="stable").iloc[0]
    ok = df[df["passes"]]
    if ok.empty:
        raise WorkbenchError(
            f"no candidate passes the filters ({len(df)} candidates: {int((~df.pass_induce).sum())} with "
            f"induce_score <= {cfg.induce_threshold}, {int((~df.pass_kl).sum())} with kl > {cfg.kl_threshold}, "
            f"{int((~df.pass_layer).sum())} in the last {cfg.prune_layer_fraction:.0%} of layers); relax the thresholds"
        )
    return ok.sort_values(["bypass_score", "layer", "position"], kind="stable").iloc[0]


@dataclass
class Selection:
    """The result of :func:`find_refusal_direction`: the chosen :class:`Direction`, all scores, candidates."""

    direction: Direction
    scores: pd.DataFrame
    candidates: Candidates


def find_refusal_direction(
    model,
    harmful_train: Sequence[str],
    benign_train: Sequence[str],
    harmful_val: Sequence[str],
    benign_val: Sequence[str],
    config: SelectionConfig | None = None,
    store=None,
    show_progress: bool = True,
    positions: Positions | None = None,
    method: str = "diff_in_means",
    caa=None,
    rule: str = "bypass",
) -> Selection:
    """Candidates (train sets) -> scores (val sets) -> the selected :class:`Direction`.

    Args:
        positions: the difference-in-means candidates' positions (:data:`workbench.vocab.Positions` present in
            every prompt; default: the post-instruction ones). CAA reads its positions from ``caa``.
        method: ``"diff_in_means"`` (harmful minus benign prompts, Arditi et al. 2024) or ``"caa"`` (refusal minus
            compliance answer starts after the same harmful and benign train prompts, Rimsky et al. 2024,
            :func:`.caa.caa_candidates`).
        caa: a :class:`.caa.CAAConfig` (default: its defaults); only for ``method="caa"``.
        rule: ``"bypass"`` or ``"induce"`` (:func:`select_candidate`).

    Returns:
        A :class:`Selection`; ``direction.vector`` is the raw candidate (difference of means) at the selected
        ``(layer, position)``, ``direction.method`` and ``direction.meta["method"]`` the method,
        ``direction.scores`` its row of the score table.
    """
    cfg = config or SelectionConfig()
    if method not in METHODS:
        raise WorkbenchError(f"unknown direction method {method!r}; expected one of {list(METHODS)}")
    check_rule(rule)
    for prompts, what in ((harmful_train, "harmful train"), (benign_train, "benign train"),
                          (harmful_val, "harmful validation"), (benign_val, "benign validation")):
        _check_prompts(prompts, f"the {what} set")
    extra: dict = {}
    if method == "caa":
        from .caa import CAAConfig, caa_candidates

        if positions is not None:
            raise WorkbenchError("positions= applies to the difference in means; CAA reads its positions from "
                                 "caa=CAAConfig(answer_positions=...)")
        caa = caa or CAAConfig()
        cands = caa_candidates(model, list(harmful_train) + list(benign_train), caa, store=store,
                               batch_size=cfg.batch_size, show_progress=show_progress)
        extra["caa"] = {"refusal_starts": list(caa.refusal_starts), "compliance_starts": list(caa.compliance_starts),
                        "answer_positions": caa.answer_positions, "n_sequences": [cands.n_harmful, cands.n_benign]}
    else:
        positions = candidate_positions("post_instruction" if positions is None else positions)
        cands = candidate_directions(model, harmful_train, benign_train, store=store, batch_size=cfg.batch_size,
                                     show_progress=show_progress, positions=positions)
    scores = score_candidates(model, cands, harmful_val, benign_val, cfg, show_progress=show_progress)
    pool = scores
    if method == "caa":  # the first layers separate the answer starts' tokens, not refusal (CAAConfig)
        first = math.ceil(caa.min_layer_fraction * int(model.cfg.n_layers))
        pool = scores[scores["layer"] >= first]
        extra["caa"]["selectable_from_layer"] = first
    best = select_candidate(pool, int(model.cfg.n_layers), cfg, rule)
    layer, pos = int(best["layer"]), int(best["position"])
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in best.to_dict().items()}
    direction = Direction.from_vector(
        model, cands.vector(layer, pos), layer, pos, method, scores=row,
        meta={"selection": asdict(cfg), "n_harmful_train": len(harmful_train), "n_benign_train": len(benign_train),
              "n_harmful_val": len(harmful_val[:cfg.max_prompts]), "n_benign_val": len(benign_val[:cfg.max_prompts]),
              "model": getattr(model, "_wb_source", {}).get("name"), "method": method, "selection_rule": rule,
              **extra},
    )
    return Selection(direction, scores, cands)

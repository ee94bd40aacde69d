"""Refusal evaluation: greedy replies judged for refusal (the substring judge :func:`workbench.judge.is_refusal`
by default, or any :class:`workbench.judge.Judge`), plus the refusal score.

With ``batch_size="auto"`` (:func:`evaluate_refusal`) and under ``torchrun`` (:func:`evaluate_distributed`) the
batches are cut, sized and spread over the ranks by :func:`workbench.parallel.map_batches`, each batch being an
``evaluate_refusal`` call with an explicit batch size."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from .chat import fit_prompts, prompt_lengths, tokenize_chat
from .batching import check_batch_size, length_batches, length_order
from .decoding import GREEDY, Decoding
from .errors import WorkbenchError
from .models import model_device
from .generation import Hook, generate_batch
from .judge import Judge, get_judge, refusal_score, refusal_token_ids
from .parallel import dist_context, map_batches
from .progress import progress


@dataclass
class Evaluation:
    """Per-prompt results (``table``) and the summary the CLI prints as JSON."""

    table: pd.DataFrame
    #: ``Float[Tensor, "prompt d_vocab"]`` next-token log-probs at the last prompt position (``keep_logprobs``)
    logprobs: torch.Tensor | None = None

    def summary(self) -> dict:
        """Per category: refusal rate, its Wilson 95 % interval (``refusal_ci``, over prompts, or over samples when
        sampling), mean refusal score and the row count ``n``."""
        from .stats import rate_interval

        g = self.table.groupby("category", sort=False)
        cis = {k: rate_interval(v.tolist()) for k, v in g["refused"]}
        return {
            "refusal_rate": {k: round(float(v), 4) for k, v in g["refused"].mean().items()},
            "refusal_ci": {k: [round(ci.lo, 4), round(ci.hi, 4)] for k, ci in cis.items()},
            "refusal_score": {k: round(float(v), 4) for k, v in g["refusal_score"].mean().items()},
            "n": {k: int(v) for k, v in g.size().items()},
        }


def paired_refusals(reference: "Evaluation", other: "Evaluation") -> dict:
    """Per category, an exact McNemar test (:func:`workbench.stats.mcnemar_exact`) of ``other``'s refusals against
    ``reference``'s on the same rows (same prompts, same order: e.g. unsteered vs steered)."""
    from .stats import mcnemar_exact

    a, b = reference.table, other.table
    if len(a) != len(b) or a["prompt"].tolist() != b["prompt"].tolist():
        raise WorkbenchError("paired_refusals needs two evaluations of the same prompts in the same order")
    return {c: mcnemar_exact(a.loc[a["category"] == c, "refused"].tolist(),
                             b.loc[b["category"] == c, "refused"].tolist()).to_dict()
            for c in dict.fromkeys(a["category"])}


def rejudge(table: pd.DataFrame, judge: str | Judge | None = "decline") -> dict:
    """Judge the saved replies of ``table`` (an evaluation's or a steering comparison's generations: ``category``,
    ``prompt``, ``reply``, and ``method`` / ``refused`` when present) again with ``judge``; no model is run.

    Returns:
        ``{"judge": name, "rates": {group: {category: {"k", "n", "rate", "lo", "hi", "changed"}}}}``, the group
        being the method (``"all"`` without a ``method`` column); ``changed`` counts the verdicts that differ from
        the table's own ``refused`` column (``None`` without one). Rows whose reply was withheld from a
        publication (:data:`workbench.report.WITHHELD`) cannot be judged and are an error.
    """
    from .report import WITHHELD
    from .stats import rate_interval

    for col in ("category", "prompt", "reply"):
        if col not in table.columns:
            raise WorkbenchError(f"rejudge needs a {col!r} column; the table has {list(table.columns)}")
    if (table["reply"] == WITHHELD).any():
        raise WorkbenchError(f"{int((table['reply'] == WITHHELD).sum())} replies were withheld from this table (a "
                             "published copy); re-judge the run directory's own generations")
    judge = get_judge(judge)
    verdicts = pd.Series(judge(table["prompt"].astype(str).tolist(), table["reply"].fillna("").astype(str).tolist()),
                         index=table.index)
    groups = table["method"] if "method" in table.columns else pd.Series("all", index=table.index)
    out: dict = {}
    for (group, cat), idx in table.groupby([groups, table["category"]], sort=False).groups.items():
        ci = rate_interval(verdicts[idx].tolist())
        changed = int((verdicts[idx] != table.loc[idx, "refused"].astype(bool)).sum()) if "refused" in table else None
        out.setdefault(str(group), {})[str(cat)] = {**ci.to_dict(), "changed": changed}
    return {"judge": judge.name, "rates": out}


def evaluate_refusal(
    model,
    prompt_sets: Mapping[str, Sequence[str]],
    max_new_tokens: int = 24,
    batch_size: int | str | None = 32,
    fwd_hooks: Sequence[Hook] = (),
    system: str | None = None,
    show_progress: bool = True,
    plan=None,
    keep_logprobs: bool = False,
    judge: Judge | str | None = None,
    prefix_cache=None,
    decoding: Decoding | None = None,
    truncate: str | None = None,
) -> Evaluation:
    """Generate replies (greedy unless ``decoding`` says otherwise) for every prompt set and judge them.

    Args:
        prompt_sets: ``{category: prompts}``, e.g. :func:`workbench.data.organism_splits`.
        batch_size: prompts per generation batch; ``"auto"`` or ``None``: sized from free memory and halved
            on out-of-memory (:mod:`workbench.batching`), with the results of the size finally used.
        fwd_hooks: TransformerLens hooks active during generation (ablation, fixed steering...).
        plan: a :class:`workbench.steering.SteeringPlan` whose hooks depend on the batch (a controller or
            a gate); its per-row info (``s``, ``w``, ``gate``) becomes columns of the table.
        judge: what decides ``refused``: a :class:`workbench.judge.Judge`, a name for
            :func:`workbench.judge.get_judge` (``"substring"``, ``"hf:<classifier dir>"``), or ``None`` for the
            substring judge.
        prefix_cache: a :class:`workbench.prefix.PrefixCache` shared by evaluations of the same prompts under
            different plans (a sweep): each batch's clean prefill up to the last prompt token is computed once.
            Not with ``fwd_hooks`` (they edit the earlier positions the cache holds).
        decoding: a :class:`workbench.decoding.Decoding`: greedy (``None``, the default) or sampling with
            ``n_samples`` replies per prompt; refusal rates are then over all samples.
        truncate: a prompt that does not fit the model's context with ``max_new_tokens`` reply tokens is an error
            (``None``), or is cut at the ``"left"`` or ``"right"`` of the user's message
            (:func:`workbench.chat.fit_prompts`; the table keeps the prompt as given).

    Returns:
        An :class:`Evaluation`; ``table`` has one row per prompt (per sample when sampling, with a ``sample``
        column) with ``category``, ``prompt``, ``reply``, ``refused`` (the judge's verdict) and ``refusal_score``
        (log-odds of a refusal first token, the same for every sample); ``table.attrs["judge"]`` names the judge and
        ``table.attrs["decoding"]`` the decoding.
    """
    judge = get_judge(judge)  # built once (a classifier judge loads a model), shared by every batch
    if prefix_cache is not None and fwd_hooks:
        raise WorkbenchError("a prefix cache holds clean prompts: it cannot be combined with fwd_hooks (use a plan)")
    decoding = decoding or GREEDY
    jobs = _prepared_jobs(model, prompt_sets, truncate, system, max_new_tokens, decoding)
    options = dict(max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks, system=system, plan=plan,
                   keep_logprobs=keep_logprobs, judge=judge, prefix_cache=prefix_cache, decoding=decoding)
    if batch_size is None or isinstance(batch_size, str):  # adaptive: batches of explicit sizes, see workbench.parallel
        return _evaluate_sharded(model, jobs, batch_size, 0, 1, None, show_progress, options)
    return _evaluate_jobs(model, jobs, batch_size, show_progress, **options)


def _prepared_jobs(model, prompt_sets: Mapping[str, Sequence[str]], truncate, system, max_new_tokens,
                   decoding: "Decoding") -> list[tuple[str, str, int]]:
    """The checked, context-fitted :func:`_jobs` of ``prompt_sets`` (one set-up for every evaluation path)."""
    from .generation import check_new_tokens

    check_new_tokens(max_new_tokens)
    _check_prompt_sets(prompt_sets)
    return _jobs(_fit(model, prompt_sets, truncate, system, max_new_tokens), decoding)


def _fit(model, prompt_sets: Mapping[str, Sequence[str]], truncate, system, max_new_tokens) -> dict:
    """``prompt_sets`` with each prompt fitted to the context (:func:`workbench.chat.fit_prompts`), as ``_Fitted``
    strings that remember the prompt as given (the table shows that one)."""
    flat = [p for ps in prompt_sets.values() for p in ps]
    fitted = iter(fit_prompts(model.tokenizer, flat, truncate, system, reply_tokens=max_new_tokens))
    return {c: [_Fitted(next(fitted), p) for p in ps] for c, ps in prompt_sets.items()}


class _Fitted(str):
    """The prompt the model reads, remembering the prompt as given (they differ when it was truncated)."""

    def __new__(cls, text: str, given: str):
        obj = super().__new__(cls, text)
        obj.given = given
        return obj


def _given(prompt: str) -> str:
    return getattr(prompt, "given", prompt)


def _jobs(prompt_sets: Mapping[str, Sequence[str]], decoding: "Decoding") -> list[tuple[str, str, int]]:
    """``(category, prompt, sample index)`` for every prompt and sample, in the order of ``prompt_sets``."""
    return [(cat, p, k) for cat, ps in prompt_sets.items() for p in ps for k in range(decoding.n_samples)]


def _evaluate_jobs(model, jobs: Sequence[tuple[str, str, int]], batch_size: int, show_progress: bool, *,
                   max_new_tokens: int, fwd_hooks, system, plan, keep_logprobs: bool, judge: Judge, prefix_cache,
                   decoding: "Decoding") -> Evaluation:
    """The batch loop of :func:`evaluate_refusal` over explicit jobs; rows in the order of ``jobs``."""
    from .steering.steer import steered_generation_inputs

    if check_batch_size(batch_size) is None:
        raise WorkbenchError("the batch loop needs an explicit batch size")
    ref_ids = refusal_token_ids(model.tokenizer)
    # batches of similar lengths pad least
    batches = length_batches(prompt_lengths(model.tokenizer, [p for _, p, _ in jobs], system), batch_size)
    rows: list = [None] * len(jobs)
    logprobs: list = [None] * len(jobs)
    for idx in progress(batches, "evaluate", show_progress, total=len(batches)):
        chunk = [jobs[i] for i in idx]
        batch = tokenize_chat(model.tokenizer, [p for _, p, _ in chunk], system)
        batch, hooks, info, extra = steered_generation_inputs(model, batch, plan, prefix_cache, fwd_hooks)
        replies, logits = generate_batch(model, batch, max_new_tokens, hooks, decoding=decoding,
                                         samples=[k for _, _, k in chunk], **extra)
        scores = refusal_score(logits, ref_ids).tolist()
        verdicts = judge.judge([p for _, p, _ in chunk], replies)
        lp = torch.log_softmax(logits.float(), -1).cpu() if keep_logprobs else None
        for k, (i, (cat, prompt, sample), reply, score, refused) in enumerate(zip(idx, chunk, replies, scores, verdicts)):
            row = {"category": cat, "prompt": _given(prompt), "reply": reply,
                   "refused": refused, "refusal_score": score}
            if decoding.sampling:
                row["sample"] = sample
            row.update({key: v[k] for key, v in info.items()})
            rows[i] = row
            if lp is not None:
                logprobs[i] = lp[k]
    table = pd.DataFrame(rows)  # in the order of the jobs
    table.attrs["judge"] = judge.name
    table.attrs["decoding"] = decoding.to_dict()
    return Evaluation(table, torch.stack(logprobs) if keep_logprobs else None)


def _check_prompt_sets(prompt_sets: Mapping[str, Sequence[str]]) -> None:
    if not prompt_sets or all(len(v) == 0 for v in prompt_sets.values()):
        raise WorkbenchError("evaluate_refusal needs at least one non-empty prompt set")


def _merge(parts: list[Evaluation], keep_logprobs: bool) -> Evaluation:
    """Concatenate :class:`Evaluation` parts in order (table attrs from the first part)."""
    table = pd.concat([p.table for p in parts], ignore_index=True)
    table.attrs = dict(parts[0].table.attrs)
    logprobs = torch.cat([p.logprobs for p in parts]) if keep_logprobs else None
    return Evaluation(table, logprobs)


def _evaluate_sharded(model, jobs: Sequence[tuple[str, str, int]], batch_size, rank: int, world: int, dist,
                      show_progress: bool, kwargs: dict) -> Evaluation:
    """The jobs of :func:`evaluate_refusal` over batches of ``batch_size`` (:func:`workbench.parallel.map_batches`:
    this rank runs batches ``rank, rank + world, ...``, ``"auto"`` sizes them and halves them on out-of-memory);
    the parts are gathered in order."""
    kwargs = {**kwargs, "judge": get_judge(kwargs.get("judge"))}  # resolved once, not once per batch
    lengths = prompt_lengths(model.tokenizer, [p for _, p, _ in jobs], kwargs.get("system"))
    # batches cut along the length order, as evaluate_refusal cuts them; each job carries its index
    order = length_order(lengths)
    items = [(i, *jobs[i]) for i in order]

    def run(sub) -> Evaluation:
        ev = _evaluate_jobs(model, [job for _, *job in sub], len(sub), False, **kwargs)
        ev.table["_job"] = [i for i, *_ in sub]
        return ev

    parts = map_batches(run, items, batch_size, model, lambda: max(lengths),
                        new_tokens=int(kwargs.get("max_new_tokens", 24)), rank=rank, world=world,
                        dist=dist, show_progress=show_progress, desc="evaluate",
                        lengths=[lengths[i] for i in order])
    merged = _merge(parts, bool(kwargs.get("keep_logprobs", False)))
    perm = merged.table["_job"].to_numpy().argsort(kind="stable")  # back to the order of the jobs
    table = merged.table.iloc[perm].drop(columns="_job").reset_index(drop=True)
    table.attrs = dict(merged.table.attrs)
    logprobs = merged.logprobs[torch.as_tensor(perm)] if merged.logprobs is not None else None
    return Evaluation(table, logprobs)


def _fingerprint_jobs(prompt_sets: Mapping[str, Sequence[str]]) -> str:
    return hashlib.sha256(json.dumps([[k, list(v)] for k, v in prompt_sets.items()]).encode()).hexdigest()[:16]


def evaluate_distributed(model, prompt_sets: Mapping[str, Sequence[str]], batch_size: int | str | None = 32,
                         show_progress: bool = True, **kwargs) -> Evaluation:
    """:func:`evaluate_refusal` spread over the ``torchrun`` ranks (also importable from :mod:`workbench.parallel`).

    Every rank must call it with the same prompts and an equal model. The jobs (category, prompt) are cut into
    batches of ``batch_size`` exactly as ``evaluate_refusal`` cuts them; rank ``r`` generates batches
    ``r, r + world, ...`` and the parts are gathered (gloo or NCCL, whichever group is initialised) in the
    original order. Outside ``torchrun`` this is ``evaluate_refusal`` in one process.

    Args:
        batch_size: an int, or ``"auto"``/``None`` (each rank guesses from its free memory, the smallest guess is
            used by all, and a batch that runs out of memory is generated in halves on that rank).
        **kwargs: the other arguments of ``evaluate_refusal`` (``max_new_tokens``, ``fwd_hooks``, ``plan``,
            ``system``, ``keep_logprobs``, ``judge``...).

    Returns:
        The full :class:`Evaluation` on every rank (the table of all prompts, in order).

    Raises:
        WorkbenchError: empty prompt sets, a bad batch size, or ranks holding different prompts.
    """
    rank, world, dist = dist_context()
    if dist is not None:
        seen: list = [None] * world
        dist.all_gather_object(seen, _fingerprint_jobs(prompt_sets))
        if len(set(seen)) != 1:
            raise WorkbenchError(f"ranks hold different prompt sets (fingerprints {seen}); pass the same prompts on every rank")
    decoding = kwargs.pop("decoding", None) or GREEDY
    kwargs = {"max_new_tokens": 24, "fwd_hooks": (), "system": None, "plan": None, "keep_logprobs": False,
              "judge": None, "prefix_cache": None, **kwargs, "decoding": decoding}
    jobs = _prepared_jobs(model, prompt_sets, kwargs.pop("truncate", None), kwargs["system"],
                          kwargs["max_new_tokens"], decoding)
    return _evaluate_sharded(model, jobs, batch_size, rank, world, dist, show_progress, kwargs)


def first_token_kl(reference: Evaluation, steered: Evaluation, category: str | None = None) -> float:
    """Mean KL(reference || steered) of the first reply token distribution (both with ``keep_logprobs``)."""
    if reference.logprobs is None or steered.logprobs is None:
        raise WorkbenchError("first_token_kl needs evaluations run with keep_logprobs=True")
    if list(reference.table["prompt"]) != list(steered.table["prompt"]):
        raise WorkbenchError("first_token_kl compares evaluations of the same prompts in the same order")
    rows = slice(None) if category is None else torch.tensor((reference.table["category"] == category).to_numpy())
    p, q = reference.logprobs[rows], steered.logprobs[rows]
    return float((p.exp() * (p - q)).sum(-1).mean())


def reply_cross_entropy(
    model,
    prompts: Sequence[str],
    replies: Sequence[str] | Sequence[Sequence[int]],
    plan=None,
    batch_size: int = 32,
    system: str | None = None,
) -> torch.Tensor:
    """Teacher-forced cross-entropy (nats per token) of ``replies`` given ``prompts``, optionally steered.

    The replies are usually the *unsteered* greedy replies; their CE under a steering ``plan`` versus without
    one measures how much steering disturbs normal answers (the issue's "CE of benign replies"). The plan's
    steering covers the last prompt token and every reply position, exactly as in steered generation.
    ``replies`` are texts (tokenised without special tokens) or token id lists.

    Returns:
        ``Float[Tensor, "prompt"]``: mean CE over each reply's tokens (NaN for an empty reply).
    """
    if len(prompts) != len(replies):
        raise WorkbenchError(f"{len(prompts)} prompts but {len(replies)} replies")
    tok = model.tokenizer
    device = model_device(model)
    out: list[torch.Tensor] = []
    for s in range(0, len(prompts), batch_size):
        batch = tokenize_chat(tok, list(prompts[s:s + batch_size]), system)
        reply_ids = [tok(r, add_special_tokens=False)["input_ids"] if isinstance(r, str) else list(r)
                     for r in replies[s:s + batch_size]]
        width = max(1, max(len(r) for r in reply_ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        r_ids = torch.full((len(reply_ids), width), pad, dtype=batch.input_ids.dtype)
        r_mask = torch.zeros_like(r_ids)
        for i, r in enumerate(reply_ids):
            r_ids[i, :len(r)] = torch.tensor(r, dtype=r_ids.dtype)
            r_mask[i, :len(r)] = 1
        ids = torch.cat([batch.input_ids, r_ids], 1).to(device)
        mask = torch.cat([batch.attention_mask, r_mask], 1).to(device)
        n_prompt = batch.input_ids.shape[1]
        hooks = []
        if plan is not None:
            hooks, _ = plan.hooks_for(model, batch, positions=("last_k", ids.shape[1] - n_prompt + 1))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(ids, attention_mask=mask)
        logp = torch.log_softmax(logits[:, n_prompt - 1:-1].float(), -1)
        nll = -logp.gather(-1, r_ids.to(device)[..., None])[..., 0]
        m = r_mask.to(device).float()
        out.append(((nll * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(out)

"""Training objectives for the WAS controller. Only the controller trains; the model stays frozen.

* :func:`train_bce` -- the paper's discriminative objective: binary cross-entropy of the scale logit
  (harmful 1 / benign 0) on cached activations. The layer weights get no signal from it (they stay at
  their initial 0.5), which is the paper's behaviour made explicit.
* :func:`train_e2e` -- beyond the paper, end to end through the frozen model: on harmful prompts raise the
  probability of a refusal first token under the patch (``-log sigmoid(refusal score)``) and, when a
  ``refusal_reply`` is given, the likelihood of that whole reply, teacher-forced with the patch on every
  reply position exactly as in steered generation (without it a controller can learn to push the first
  token only, and persistent steering then degenerates into repeating it: measured on the organism, see
  ``workbench/organism/NOTES.md``); on benign prompts keep the next-token distribution at the last prompt
  position close to the unsteered one (KL); an L1 term on ``w`` so few layers are steered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..chat import ChatBatch, tokenize_chat
from ..generation import greedy_continuations
from ..errors import WorkbenchError
from ..judge import refusal_score, refusal_token_ids
from ..models import fingerprint, model_device
from ..prefix import RowPrefixes
from ..progress import progress
from .controller import POOLING_POSITIONS, Controller, ControllerConfig, direction_fingerprint
from .hooks import steering_hooks
from .steer import controller_inputs


@dataclass
class TrainingSet:
    """Prompts with binary labels (1 = should refuse) and their clean controller inputs."""

    prompts: list[str]
    labels: Tensor  # Float[Tensor, "n"]
    inputs: Tensor  # Float[Tensor, "n n_input_layers d_model"]
    batch: ChatBatch  # all prompts, left-padded together


def _check_sets(harmful: Sequence[str], benign: Sequence[str]) -> None:
    if len(harmful) == 0 and len(benign) == 0:
        raise WorkbenchError("controller training needs prompts; both the harmful and the benign set are empty")
    if len(harmful) == 0 or len(benign) == 0:
        empty = "harmful" if len(harmful) == 0 else "benign"
        raise WorkbenchError(f"controller training needs both classes; the {empty} set is empty (single-class)")


def build_training_set(model, harmful, benign, cfg: ControllerConfig, batch_size: int = 64,
                       show_progress: bool = True, store=None) -> TrainingSet:
    """Tokenise with the chat template (generation prompt included, as steering uses) and read the
    controller inputs in clean prefills.

    ``harmful`` / ``benign``: prompt lists, or ``{group: prompts}`` (e.g. by category; concatenated in order).
    With ``store`` the inputs come from the activation store (:func:`stored_controller_inputs`, one entry per
    group, so the harmful and benign train prompts other stages cached are read, not recomputed).
    """
    groups_h = dict(harmful) if isinstance(harmful, Mapping) else {"harmful": list(harmful)}
    groups_b = dict(benign) if isinstance(benign, Mapping) else {"benign": list(benign)}
    harmful = [p for ps in groups_h.values() for p in ps]
    benign = [p for ps in groups_b.values() for p in ps]
    _check_sets(harmful, benign)
    prompts = harmful + benign
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    batch = tokenize_chat(model.tokenizer, prompts)
    if store is not None:
        groups = [ps for ps in list(groups_h.values()) + list(groups_b.values()) if len(ps)]
        inputs = torch.cat([stored_controller_inputs(model, ps, cfg, store, show_progress) for ps in groups])
        return TrainingSet(prompts, labels, inputs, batch)
    xs = []
    for s in progress(range(0, len(prompts), batch_size), "controller inputs", show_progress):
        sub = _rows(batch, slice(s, s + batch_size))
        xs.append(controller_inputs(model, sub, cfg.input_layers, cfg.input_hook, cfg.pooling))
    return TrainingSet(prompts, labels, torch.cat(xs), batch)


def stored_controller_inputs(model, prompts: Sequence[str], cfg: ControllerConfig, store,
                             show_progress: bool = False) -> Tensor:
    """``Float[Tensor, "prompt n_input_layers d_model"]``: the controller inputs of ``prompts`` read from the
    activation store (``cfg.input_hook`` of ``cfg.input_layers`` at the post-instruction positions, pooled as
    ``cfg.pooling``: the last position or their mean), computed and stored when missing. Equal to
    :func:`controller_inputs` up to the last bits (the store batches prompts its own way)."""
    from ..store import get_or_compute
    from ..vocab import hook_name

    if cfg.pooling not in POOLING_POSITIONS:
        raise WorkbenchError(f"unknown pooling {cfg.pooling!r}; expected one of {sorted(POOLING_POSITIONS)}")
    layers = list(cfg.input_layers)
    entry = get_or_compute(model, list(prompts), hooks=(cfg.input_hook, layers), positions="post_instruction",
                           store=store, show_progress=show_progress)
    out = []
    for layer in layers:
        acts = entry.activations(hook_name(cfg.input_hook, layer))
        out.append(acts[:, -1].float() if POOLING_POSITIONS[cfg.pooling] == "last" else acts.float().mean(1))
    return torch.stack(out, dim=1)


def _rows(batch: ChatBatch, idx) -> ChatBatch:
    ids, mask = batch.input_ids[idx], batch.attention_mask[idx]
    keep = int(mask.sum(0).nonzero().min()) if mask.any() else 0  # drop all-padding columns
    texts = [batch.texts[i] for i in range(len(batch.texts))[idx]] if isinstance(idx, slice) else \
        [batch.texts[int(i)] for i in idx]
    return ChatBatch(ids[:, keep:], mask[:, keep:], texts, batch.n_post)


def _new_controller(model, direction: Tensor, cfg: ControllerConfig) -> Controller:
    cfg.model_fingerprint = fingerprint(model)
    cfg.direction_fingerprint = direction_fingerprint(direction)
    return Controller(cfg)


def train_bce(model, direction: Tensor, data: TrainingSet, cfg: ControllerConfig, epochs: int = 200,
              lr: float = 1e-3, seed: int = 0, show_progress: bool = True) -> tuple[Controller, list[float]]:
    """The paper's discriminative objective on cached activations; returns the controller and losses."""
    torch.manual_seed(seed)
    cfg.objective = cfg.objective or "bce"
    ctrl = _new_controller(model, direction, cfg)
    ctrl.fit_normaliser(data.inputs)
    opt = torch.optim.Adam(ctrl.parameters(), lr=lr, weight_decay=1e-4)
    params_before = _param_snapshot(model)
    losses = []
    for _ in progress(range(epochs), "train bce", show_progress):
        logit, _ = ctrl.scale_logit(data.inputs)
        loss = F.binary_cross_entropy_with_logits(logit, data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _assert_frozen(model, params_before)
    return ctrl.eval(), losses


@dataclass
class E2EWeights:
    """Loss weights of the end-to-end objective."""

    refusal: float = 1.0
    reply: float = 1.0
    kl: float = 1.0
    l1: float = 0.01
    # binary cross-entropy of the scale logit (harmful 1 / benign 0), the paper's discriminative loss kept as
    # an auxiliary term: without it the softplus scale can collapse to 0 for every prompt early in training
    # (no steering, no gradient), measured on the organism with wrapped-benign negatives (NOTES.md)
    detect: float = 0.0
    extra: dict = field(default_factory=dict)


def train_e2e(model, direction: Tensor, data: TrainingSet, cfg: ControllerConfig, steps: int = 300,
              batch_size: int = 32, lr: float = 3e-3, weights: E2EWeights | None = None, seed: int = 0,
              refusal_reply: str | None = None, show_progress: bool = True,
              prefix: bool = True) -> tuple[Controller, list[dict]]:
    """End-to-end objective through the frozen model (see module docstring).

    Args:
        refusal_reply: the reply harmful prompts should get (e.g. :func:`typical_refusal`); its mean
            teacher-forced NLL under the patch is added with weight ``weights.reply``.
        prefix: compute each prompt's clean keys and values before its last token once
            (:class:`workbench.prefix.RowPrefixes`) and run only the last prompt token and the reply at each step
            (the patch edits nothing earlier); ``False``: every step runs the whole prompts (the same losses, to
            float precision; on the real data preset's 500-token jailbreaks, tens of times slower).
    """
    weights = weights or E2EWeights()
    torch.manual_seed(seed)
    cfg.objective = cfg.objective or "e2e"
    ctrl = _new_controller(model, direction, cfg)
    ctrl.fit_normaliser(data.inputs)
    device = model_device(model)
    ctrl.to(device)
    ref_ids = refusal_token_ids(model.tokenizer)
    params_before = _param_snapshot(model)
    if any(p.requires_grad for p in model.parameters()):
        raise WorkbenchError("the model must be frozen (requires_grad=False) while the controller trains")
    # Fixed-length continuations teacher-forced under the patch: harmful rows get the refusal reply, benign
    # rows their own unsteered greedy continuation of the same length (KL is taken over all of it, so the
    # patch may not derail a benign answer a few tokens in). Without a reply: the last prompt position only.
    cont = None
    if refusal_reply:
        reply_ids = model.tokenizer(refusal_reply, add_special_tokens=False)["input_ids"]
        if len(reply_ids) == 0:
            raise WorkbenchError(f"refusal_reply {refusal_reply!r} has no tokens")
        cont = torch.tensor(reply_ids, device=device)[None].repeat(len(data.prompts), 1)
        neg_rows = (data.labels == 0).nonzero().squeeze(-1).tolist()
        for s in range(0, len(neg_rows), 64):
            rows = neg_rows[s:s + 64]
            cont[rows] = greedy_continuations(model, _rows(data.batch, torch.tensor(rows)), len(reply_ids)).to(device)

    prefixes = RowPrefixes(model, data.batch, show_progress=show_progress) if prefix else None
    if prefixes is not None and not prefixes.supported:
        prefixes = None  # a fallback, logged by clean_prefill
    opt = torch.optim.Adam(ctrl.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pos = (data.labels == 1).nonzero().squeeze(-1)
    neg = (data.labels == 0).nonzero().squeeze(-1)
    half = max(1, batch_size // 2)
    history = []
    for _ in progress(range(steps), "train e2e", show_progress):
        idx = torch.cat([pos[torch.randint(len(pos), (half,), generator=gen)],
                         neg[torch.randint(len(neg), (half,), generator=gen)]])
        x = data.inputs[idx].to(device)
        s, w = ctrl(x)
        coeffs = s[:, None] * w * cfg.alpha
        c = cont[idx.to(device)] if cont is not None else None
        y = data.labels[idx].to(device)
        ben = y == 0
        # teacher-forced: the last prompt token and every reply token, as in steered generation
        hooks = steering_hooks(coeffs, direction.to(device), cfg.steer_hook,
                               ("last_k", c.shape[1] + 1) if c is not None else "last")
        if prefixes is not None:
            tail = c if c is not None else torch.zeros((len(idx), 0), dtype=torch.long, device=device)
            rows = idx.tolist()
            with torch.no_grad():  # the unsteered reference of the benign rows the KL uses
                ref = torch.log_softmax(prefixes.forward_tail([r for r, b in zip(rows, ben.tolist()) if b],
                                                              tail[ben]).float(), -1)
            logp = torch.log_softmax(prefixes.forward_tail(rows, tail, hooks).float(), -1)
        else:
            sub = _rows(data.batch, idx).to(device)
            ids, mask, n_prompt = sub.input_ids, sub.attention_mask, sub.input_ids.shape[1]
            if c is not None:
                ids = torch.cat([ids, c], 1)
                mask = torch.cat([mask, torch.ones_like(c, dtype=mask.dtype)], 1)
            # the unsteered reference, only for the benign rows the KL uses; computed per step, because stored
            # for every prompt it would be n_benign x (reply + 1) x d_vocab floats (GBs for a 128k vocabulary)
            with torch.no_grad():
                ref = torch.log_softmax(model(ids[ben], attention_mask=mask[ben])[:, n_prompt - 1:].float(), -1)
            with model.hooks(fwd_hooks=hooks):
                logp = torch.log_softmax(model(ids, attention_mask=mask)[:, n_prompt - 1:].float(), -1)
        score = refusal_score(logp[:, 0], ref_ids)
        refuse_loss = (F.softplus(-score) * y).sum() / y.sum().clamp_min(1)
        reply_loss = torch.zeros((), device=device)
        if c is not None:
            nll = -logp[:, :-1].gather(-1, c[..., None])[..., 0].mean(1)
            reply_loss = (nll * y).sum() / y.sum().clamp_min(1)
        kl_pos = (ref.exp() * (ref - logp[ben])).sum(-1)
        kl_pos = kl_pos[:, :-1] if c is not None else kl_pos
        kl = kl_pos.mean(1).sum() / ben.sum().clamp_min(1)
        l1 = w.mean()
        detect = (F.binary_cross_entropy_with_logits(ctrl.scale_logit(x)[0], y) if weights.detect
                  else torch.zeros((), device=device))
        loss = (weights.refusal * refuse_loss + weights.reply * reply_loss + weights.kl * kl + weights.l1 * l1
                + weights.detect * detect)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"loss": loss.item(), "refusal": refuse_loss.item(), "reply": reply_loss.item(),
                        "kl": kl.item(), "l1": l1.item(), "detect": detect.item()})
    _assert_frozen(model, params_before)
    return ctrl.eval(), history


def _param_snapshot(model) -> Tensor:
    with torch.no_grad():
        return torch.stack([p.detach().float().sum() for p in model.parameters()]).cpu()


def _assert_frozen(model, before: Tensor) -> None:
    after = _param_snapshot(model)
    if not torch.equal(before, after) or any(p.grad is not None for p in model.parameters()):
        raise RuntimeError("model parameters changed or received gradients while training the controller")


def typical_refusal(model, harmful: Sequence[str], max_new_tokens: int = 8, batch_size: int = 64,
                    show_progress: bool = False) -> str | None:
    """The model's most common greedy reply to ``harmful`` prompts among those judged refusals (first
    ``max_new_tokens`` tokens), e.g. ``"I cannot help with that"``; ``None`` when it never refuses."""
    from collections import Counter

    from ..evaluate import evaluate_refusal

    table = evaluate_refusal(model, {"harmful": list(harmful)}, max_new_tokens, batch_size,
                             show_progress=show_progress).table
    replies = [r for r, ok in zip(table["reply"], table["refused"]) if ok and r]
    return Counter(replies).most_common(1)[0][0] if replies else None

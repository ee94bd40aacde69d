"""Training objectives for the WAS controller. Only the controller trains; the model stays frozen.

* :func:`train_bce` -- the paper's discriminative objective: binary cross-entropy of the scale logit
  (harmful 1 / benign 0) on cached activations. The layer weights get no signal from it (they stay at
  their initial 0.5), which is the paper's behaviour made explicit.
* :func:`train_e2e` -- beyond the paper, end to end through the frozen model: on harmful prompts raise the
  probability of a refusal first token under the patch (``-log sigmoid(refusal score)``); on benign prompts
  keep the next-token distribution at the last prompt position close to the unsteered one (KL); an L1 term
  on ``w`` so few layers are steered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..chat import ChatBatch, tokenize_chat
from ..errors import WorkbenchError
from ..judge import refusal_score, refusal_token_ids
from ..models import fingerprint
from ..progress import progress
from .controller import Controller, ControllerConfig, direction_fingerprint
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


def build_training_set(model, harmful: Sequence[str], benign: Sequence[str], cfg: ControllerConfig,
                       batch_size: int = 64, show_progress: bool = True) -> TrainingSet:
    """Tokenise with the chat template (generation prompt included, as steering uses) and read the
    controller inputs in clean prefills."""
    _check_sets(harmful, benign)
    prompts = list(harmful) + list(benign)
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    batch = tokenize_chat(model.tokenizer, prompts)
    xs = []
    for s in progress(range(0, len(prompts), batch_size), "controller inputs", show_progress):
        sub = _rows(batch, slice(s, s + batch_size))
        xs.append(controller_inputs(model, sub, cfg.input_layers, cfg.input_hook, cfg.pooling))
    return TrainingSet(prompts, labels, torch.cat(xs), batch)


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
    kl: float = 1.0
    l1: float = 0.01
    extra: dict = field(default_factory=dict)


def train_e2e(model, direction: Tensor, data: TrainingSet, cfg: ControllerConfig, steps: int = 300,
              batch_size: int = 32, lr: float = 3e-3, weights: E2EWeights | None = None, seed: int = 0,
              show_progress: bool = True) -> tuple[Controller, list[dict]]:
    """End-to-end objective through the frozen model (see module docstring)."""
    weights = weights or E2EWeights()
    torch.manual_seed(seed)
    cfg.objective = cfg.objective or "e2e"
    ctrl = _new_controller(model, direction, cfg)
    ctrl.fit_normaliser(data.inputs)
    device = next(model.parameters()).device
    ctrl.to(device)
    ref_ids = refusal_token_ids(model.tokenizer)
    params_before = _param_snapshot(model)
    if any(p.requires_grad for p in model.parameters()):
        raise WorkbenchError("the model must be frozen (requires_grad=False) while the controller trains")

    # unsteered next-token log-probs at the last prompt position (the KL reference)
    ref_logp = []
    with torch.no_grad():
        for s in range(0, len(data.prompts), 64):
            sub = _rows(data.batch, slice(s, s + 64)).to(device)
            ref_logp.append(torch.log_softmax(model(sub.input_ids, attention_mask=sub.attention_mask)[:, -1].float(), -1))
    ref_logp = torch.cat(ref_logp)

    opt = torch.optim.Adam(ctrl.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pos = (data.labels == 1).nonzero().squeeze(-1)
    neg = (data.labels == 0).nonzero().squeeze(-1)
    half = max(1, batch_size // 2)
    history = []
    for _ in progress(range(steps), "train e2e", show_progress):
        idx = torch.cat([pos[torch.randint(len(pos), (half,), generator=gen)],
                         neg[torch.randint(len(neg), (half,), generator=gen)]])
        sub = _rows(data.batch, idx).to(device)
        s, w = ctrl(data.inputs[idx].to(device))
        coeffs = s[:, None] * w * cfg.alpha
        with model.hooks(fwd_hooks=steering_hooks(coeffs, direction.to(device), cfg.steer_hook)):
            logits = model(sub.input_ids, attention_mask=sub.attention_mask)[:, -1].float()
        y = data.labels[idx].to(device)
        score = refusal_score(logits, ref_ids)
        refuse_loss = (F.softplus(-score) * y).sum() / y.sum().clamp_min(1)
        logp = torch.log_softmax(logits, -1)
        ref = ref_logp[idx.to(ref_logp.device)].to(device)
        kl = ((ref.exp() * (ref - logp)).sum(-1) * (1 - y)).sum() / (1 - y).sum().clamp_min(1)
        l1 = w.mean()
        loss = weights.refusal * refuse_loss + weights.kl * kl + weights.l1 * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"loss": float(loss), "refusal": float(refuse_loss), "kl": float(kl), "l1": float(l1)})
    _assert_frozen(model, params_before)
    return ctrl.eval(), history


def _param_snapshot(model) -> Tensor:
    with torch.no_grad():
        return torch.stack([p.detach().float().sum() for p in model.parameters()]).cpu()


def _assert_frozen(model, before: Tensor) -> None:
    after = _param_snapshot(model)
    if not torch.equal(before, after) or any(p.grad is not None for p in model.parameters()):
        raise RuntimeError("model parameters changed or received gradients while training the controller")

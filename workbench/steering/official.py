"""The official Guiding Giants (WAS) code as it runs: the ``official`` baseline of the comparison.

Reproduces Amr-Hegazy1/GuidingGiantsWAS (commit e7997f9) as its ``experiments/reproduce_paper.py`` runs it, not
as the paper (arXiv 2505.20309) describes it. Written from a reading of that code (none of it copied); each line
below is ``file:line`` in that repository -> what it does -> where it is here.

Direction
  * ``configs/paper_reproduction.yaml:46-71`` (= ``experiments/reproduce_paper.py:67-77``): 13 refusal phrases
    ("I apologize", ...) and 11 answer phrases ("Sure", ...) -> :data:`OFFICIAL_REFUSAL_PHRASES`,
    :data:`OFFICIAL_ANSWER_PHRASES`.
  * ``llmsteering/utils/activation.py:199-208``: each phrase tokenised bare (``add_special_tokens=False``), the ids
    concatenated, repeats kept -> :func:`official_direction`.
  * ``activation.py:188-190, 220-238``: rows of the *input embedding*, mean of the refusal rows minus mean of the
    answer rows, divided by its norm -> :func:`official_direction` (``reproduce_paper.py:268``).

Controller and training (``reproduce_paper.py:146-251``)
  * ``reproduce_paper.py:166-175`` with ``yaml:15``: input layers ``[-4, -3, -2, -1]`` (the last 4 decoder
    layers) -> :attr:`OfficialConfig.n_input_layers`.
  * ``llmsteering/controller/network.py:32-46, 66-73``: ``fc1`` (4 * d_model -> 1024, ``yaml:17``), ReLU, ``fc2``
    (-> 1 + L); output 0 is the scalar ``s``, outputs 1..L the weight logits; raw float32 inputs, no
    normalisation -> :class:`~workbench.steering.controller.Controller` with ``arch="official"``.
  * ``llmsteering/data/loader.py:59-64`` with ``yaml:27, 33``: at most 500 prompts per class, drawn with
    ``random.seed(42); random.sample`` -> :func:`official_sample`.
  * ``llmsteering/controller/training.py:229-252`` (``reproduce_paper.py:223-232``, no system prompt): the training
    prompts are rendered with the chat template *without* the generation prompt -> :func:`official_inputs`.
  * ``training.py:219-223, 257-269`` with ``reproduce_paper.py:229`` (``batch_size`` 8): tokenised 8 at a time,
    ``padding=True``, truncated to ``min(max_position_embeddings, model_max_length)``; one forward each ->
    :func:`official_inputs` (on the padding side of ``model.tokenizer``: left for every model ``load_model``
    gives; see the notes below).
  * ``llmsteering/utils/activation.py:91-100, 132-140``: forward hooks on the decoder layers keep each layer's
    output (``blocks.{l}.hook_resid_post``) at position -1, whatever is there (a pad under right padding)
    -> :func:`official_inputs`; ``training.py:414-417, 442-445``: concatenated over the input layers.
  * ``training.py:56-73`` with ``yaml:18-20``: AdamW (lr 5e-5, default weight decay 0.01), 10 epochs, batches of
    8, shuffled; harmful label 1, benign 0; gradient norm clipped to 1.0 (``training.py:27``) ->
    :func:`train_official_controller`.
  * ``training.py:88-122``: each epoch first the harmful batches, loss
    ``BCE-with-logits(s, 1) + 0.1 * (mean |sigmoid(w) - 0.5| + 0.01 * mean sigmoid(w))``;
    ``training.py:125-152``: then the benign batches, loss ``BCE-with-logits(s, 0)`` only ->
    :func:`train_official_controller`.
  * ``training.py:164-171``: the "best epoch" copy is ``state_dict().copy()``, a shallow copy whose tensors are the
    live parameters, so restoring it changes nothing: the last epoch's weights are kept -> the same here.

Steered generation (``llmsteering/inference/generation.py:18-172``, ``benchmarks/*`` call it per prompt)
  * ``generation.py:80-91``: the prompt is rendered with the generation prompt (no system prompt): the inputs at
    inference differ from the training inputs -> the comparison's ``evaluate_refusal`` (``system=None``).
  * ``network.py:397-432``: capture hooks on the input layers are registered before the apply hooks on every
    layer, so at the final layer the capture sees the unpatched output; ``network.py:246-263``: each capture keeps
    position -1 of the current forward (the last prompt token in the prefill, the new token at each cached step)
    -> :class:`~workbench.steering.steer.PerStepPlan` (``schedule="per_step"``, ``input_hook`` ``resid_post``).
  * ``network.py:295-330``: the controller runs when every input layer is captured, i.e. in the apply hook of the
    deepest input layer -- with the last 4 layers, the *final* layer; ``s`` is the raw scalar
    (``network.py:316``), ``w = sigmoid(logits)`` (``network.py:317-319``) -> ``scale_activation="identity"``.
  * ``network.py:332-366``: ``s * d * 4.0 * w_l`` (``generation.py:26``, ``yaml:16``) is added at position -1 of the
    outputs of the layers from there on: the final layer's output only, so the patch moves the logits through the
    final norm and nothing else (no key or value sees it) -> ``alpha=4.0``, patch at ``blocks.{L-1}.hook_resid_post``.
  * ``network.py:375-383``: after the final layer the state is reset, so the controller re-runs at every decoding
    step on that step's activations -> :class:`~workbench.steering.steer.PerStepPlan`.
  * ``generation.py:119-129``: its default decoding samples (temperature 0.7, top_p 0.9); the validation here and
    the measured official numbers are greedy.

Not reproduced: the official benchmark harness (``benchmarks/*.py``) compares a template-less "base" with the
templated steered run and judges with GPT-4o; the comparison here evaluates every method templated and with the
project's judge. Two tokenizer details only matter on other checkpoints than the organism: (1) the official code
calls the checkpoint's own tokenizer with its default ``add_special_tokens=True``; the organism's adds nothing to
a rendered template, so here the template's tokens are used as they are (``model.tokenizer`` of the bridge would
add a second BOS); on a tokenizer that adds a BOS (Llama-3) the official inputs carry two. (2) The
official training inputs are padded on the checkpoint's configured side and read at position -1, a pad for every
shorter prompt of a batch under right padding; here ``model.tokenizer`` pads on the left (the organism's own side).

Validation on the organism (test split, greedy, 16 new tokens, the substring judge): see README (Weighted
Activation Steering) and ``tests/test_official.py``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import WorkbenchError
from ..fallbacks import warn_fallback
from ..models import fingerprint, model_device
from ..progress import progress
from ..vocab import hook_name
from .controller import Controller, ControllerConfig, direction_fingerprint

log = logging.getLogger(__name__)

#: ``configs/paper_reproduction.yaml:46-59``
OFFICIAL_REFUSAL_PHRASES: tuple[str, ...] = (
    "I apologize", "I'm sorry", "I cannot", "I can't", "I am unable", "I'm not able", "I am not able", "I don't",
    "I do not", "against my", "ethical guidelines", "programmed to", "designed to",
)
#: ``configs/paper_reproduction.yaml:61-71``
OFFICIAL_ANSWER_PHRASES: tuple[str, ...] = (
    "Sure", "Here", "I'll", "I will", "I'd be happy", "I would be happy", "I can help", "Of course", "Certainly",
    "Here's", "Here is",
)


@dataclass
class OfficialConfig:
    """The official run's settings (``configs/paper_reproduction.yaml``; see the module docstring)."""

    n_input_layers: int = 4
    hidden: int = 1024
    patch_scale: float = 4.0
    epochs: int = 10
    batch_size: int = 8
    lr: float = 5e-5
    grad_clip: float = 1.0
    max_samples: int = 500
    sample_seed: int = 42


@torch.no_grad()
def official_direction(model, refusal: Sequence[str] = OFFICIAL_REFUSAL_PHRASES,
                       answer: Sequence[str] = OFFICIAL_ANSWER_PHRASES) -> Tensor:
    """``Float[Tensor, "d_model"]``: the unit vector from the answer phrases' mean input-embedding row to the
    refusal phrases' (every token of every phrase, repeats kept)."""
    tok = model.tokenizer

    def ids(phrases: Sequence[str], what: str) -> list[int]:
        out = [int(t) for p in phrases for t in tok.encode(p, add_special_tokens=False)]
        if not out:
            raise WorkbenchError(f"the official {what} phrases produced no tokens")
        return out

    emb = model.original_model.get_input_embeddings().weight
    rows = lambda i: emb[torch.tensor(i, device=emb.device)].float().mean(0)  # noqa: E731
    d = (rows(ids(refusal, "refusal")) - rows(ids(answer, "answer"))).cpu()
    norm = d.norm()
    if not norm > 0:
        raise WorkbenchError("the official refusal and answer phrases have the same mean embedding")
    return d / norm


def official_sample(prompts: Sequence[str], max_samples: int = 500, seed: int = 42) -> list[str]:
    """The official loaders' draw (``loader.py:59-64``): all prompts in order when there are at most
    ``max_samples``, else ``random.sample`` after ``random.seed(seed)``."""
    prompts = list(prompts)
    if max_samples >= len(prompts):
        return prompts
    return random.Random(seed).sample(prompts, max_samples)


#: the attention implementation the official code's model runs with (``AutoModelForCausalLM.from_pretrained``
#: without ``attn_implementation``: transformers' default, PyTorch's scaled-dot-product attention)
OFFICIAL_ATTENTION = "sdpa"


@contextmanager
def attention_implementation(hf_model, name: str):
    """Run ``hf_model`` (a plain Hugging Face model) with attention implementation ``name`` inside the block, the
    previous one restored on exit; yields ``False`` (and changes nothing) when the model cannot switch to it."""
    before = getattr(hf_model.config, "_attn_implementation", None)
    try:
        hf_model.set_attn_implementation(name)
    except (AttributeError, ValueError, ImportError) as exc:
        warn_fallback(log, "official_attention", "official inputs: %s cannot run %s attention (%s); they are "
                      "captured with %s attention, whose last digits differ from the official run's", type(hf_model).__name__,
                      name, exc, before)
        yield False
        return
    try:
        yield True
    finally:
        hf_model.set_attn_implementation(before)


@torch.no_grad()
def official_inputs(model, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 8,
                    show_progress: bool = False) -> Tensor:
    """``Float[Tensor, "prompt n_layers d_model"]``: the official training inputs (the template without the
    generation prompt; ``resid_post`` at position -1 of each padded batch; see the module docstring), captured as
    the official code captures them: forward hooks on the decoder layers of the plain Hugging Face model
    (:func:`workbench.hf_hooks.plain_model`, the bridge's own weights), running :data:`OFFICIAL_ATTENTION`
    attention as the official code's model does. (Through the bridge's eager attention the inputs differ in their
    last digits, ~1e-6, which 10 epochs of training amplify into a different controller: on the organism, seed 1
    then gives 94.0 % harmful refusal where the official code gives 90.5 %; with these inputs both give 90.5 %.)"""
    from ..hf_hooks import hf_hooks, plain_model

    if len(prompts) == 0:
        raise WorkbenchError("official_inputs needs at least one prompt")
    tok = model.tokenizer
    max_len = int(getattr(model.original_model.config, "max_position_embeddings", 2048) or 2048)
    if getattr(tok, "model_max_length", None) is not None:
        max_len = min(max_len, int(tok.model_max_length))
    pad_added = tok.pad_token is None
    if pad_added:  # reproduce_paper.py:131-132
        tok.pad_token = tok.eos_token
    device = model_device(model)
    names = [hook_name("resid_post", l) for l in layers]
    hf = plain_model(model)
    out = []
    try:
        with attention_implementation(hf, OFFICIAL_ATTENTION):
            for s in progress(range(0, len(prompts), batch_size), "official inputs", show_progress):
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=False) for p in prompts[s:s + batch_size]]
                enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                          add_special_tokens=False)
                grabbed: dict[str, Tensor] = {}

                def grab(name: str):
                    def fn(act: Tensor, hook=None) -> None:
                        grabbed[name] = act[:, -1].float().cpu()
                    return fn

                with hf_hooks(hf, [(n, grab(n)) for n in set(names)]):
                    hf(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                       use_cache=False)
                out.append(torch.stack([grabbed[n] for n in names], dim=1))
    finally:
        if pad_added:
            tok.pad_token = None
    return torch.cat(out)


def official_controller_config(model, cfg: OfficialConfig | None = None) -> ControllerConfig:
    """The :class:`ControllerConfig` of the official controller for ``model``."""
    cfg = cfg or OfficialConfig()
    n = int(model.cfg.n_layers)
    if not 1 <= cfg.n_input_layers <= n:
        raise WorkbenchError(f"n_input_layers must be in 1..{n} (the model's layers), got {cfg.n_input_layers}")
    return ControllerConfig(
        d_model=int(model.cfg.d_model), n_layers=n, input_layers=list(range(n - cfg.n_input_layers, n)),
        input_hook="resid_post", pooling="last", hidden=cfg.hidden, scale_activation="identity",
        alpha=cfg.patch_scale, steer_hook="resid_post", objective="official", arch="official", schedule="per_step")


def train_official_controller(x_harmful: Tensor, x_benign: Tensor, ccfg: ControllerConfig,
                              cfg: OfficialConfig | None = None, seed: int | None = 0,
                              show_progress: bool = False) -> tuple[Controller, list[float]]:
    """The official training loop (``training.py:20-176``) on ``Float[Tensor, "n n_in d_model"]`` inputs; returns
    the controller (the last epoch's weights) and the mean loss of each epoch.

    Draws from torch's global generator as the official code does (``seed``: ``torch.manual_seed`` first; ``None``:
    the generator as it is): the network's initialisation, then per epoch and class one draw for the data loader
    iterator's base seed and one for its sampler's permutation. After ``torch.manual_seed(k)`` right before the
    official ``SteeringController(...)`` is made, the official code draws the same network and batches.
    """
    cfg = cfg or OfficialConfig()
    if len(x_harmful) == 0 or len(x_benign) == 0:
        raise WorkbenchError("the official controller trains on both classes; one of them is empty")
    if seed is not None:
        torch.manual_seed(seed)
    ctrl = Controller(ccfg)
    opt = torch.optim.AdamW(ctrl.parameters(), lr=cfg.lr)

    def shuffled(n: int) -> list[Tensor]:
        """``DataLoader(shuffle=True)``'s batches: its iterator draws a base seed, then its sampler a seed."""
        torch.empty((), dtype=torch.int64).random_()  # the iterator's base seed (worker seeding; unused here)
        gen = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        return list(torch.randperm(n, generator=gen).split(cfg.batch_size))

    def run(x: Tensor, label: float, regularise: bool) -> list[float]:
        losses = []
        for idx in shuffled(len(x)):
            logit, w_logit = ctrl.scale_logit(x[idx])
            loss = F.binary_cross_entropy_with_logits(logit[:, None], torch.full((len(idx), 1), label))
            if regularise:
                w = torch.sigmoid(w_logit)
                loss = loss + 0.1 * ((w - 0.5).abs().mean() + 0.01 * w.mean())
            opt.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(ctrl.parameters(), max_norm=cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
        return losses

    history = []
    ctrl.train()
    for _ in progress(range(cfg.epochs), "train official", show_progress):
        losses = run(x_harmful, 1.0, True) + run(x_benign, 0.0, False)
        history.append(sum(losses) / len(losses))
    return ctrl.eval(), history


def train_official(model, harmful: Sequence[str], benign: Sequence[str], cfg: OfficialConfig | None = None,
                   seed: int = 0, show_progress: bool = False) -> tuple[Controller, Tensor, dict]:
    """The official pipeline on ``model``: draw the training prompts (:func:`official_sample`), read their inputs
    (:func:`official_inputs`), train (:func:`train_official_controller`) and compute the direction
    (:func:`official_direction`).

    Returns:
        The controller (steer it with :func:`~workbench.steering.steer.controller_plan`, which runs it at every
        step), its unit direction and ``{"n_harmful", "n_benign", "losses"}``.
    """
    cfg = cfg or OfficialConfig()
    ccfg = official_controller_config(model, cfg)
    h = official_sample(harmful, cfg.max_samples, cfg.sample_seed)
    b = official_sample(benign, cfg.max_samples, cfg.sample_seed)
    if not h or not b:
        raise WorkbenchError("the official controller trains on both classes; the harmful or benign prompts are empty")
    xh = official_inputs(model, h, ccfg.input_layers, cfg.batch_size, show_progress)
    xb = official_inputs(model, b, ccfg.input_layers, cfg.batch_size, show_progress)
    direction = official_direction(model)
    ccfg.model_fingerprint = fingerprint(model)
    ccfg.direction_fingerprint = direction_fingerprint(direction)
    ctrl, losses = train_official_controller(xh, xb, ccfg, cfg, seed, show_progress)
    return ctrl.to(model_device(model)), direction, {"n_harmful": len(h), "n_benign": len(b),
                                                     "losses": [round(x, 5) for x in losses]}

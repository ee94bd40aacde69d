"""Steered generation: a clean prefill reads the controller's inputs, then ``Δh_l`` rides every layer.

Design choice (documented as the issue asks): the controller reads the *last* layers while steering edits
*every* layer, so the inputs cannot come from the steered prefill itself. But every plan edits the last position
only (the last prompt token, then each new token), so everything before the last prompt token is the same with
and without steering. :func:`steered_generation_inputs` therefore runs one clean prefill of the prompt
(:func:`workbench.prefix.clean_prefill`), reads the controller's inputs from it and hands its keys and values
before the last token to Hugging Face ``generate``, which then runs only the last prompt token and the reply
under the steering hooks: a steered batch costs one prefill, as an unsteered one does. Without a usable prefix
(another hook edits earlier positions, a cache that cannot be cut) :func:`controller_inputs` runs its own clean
forward, stopped right after the deepest input layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..chat import ChatBatch
from ..errors import WorkbenchError
from ..models import model_device
from ..vocab import Positions, check_layers, position_index
from .controller import POOLING_POSITIONS, Controller, check_direction, direction_fingerprint
from .hooks import hook_name, steering_hooks


class _StopForward(Exception):
    pass


def controller_inputs(
    model, batch: ChatBatch, input_layers: Sequence[int], hook: str = "resid_pre", pooling: str = "last",
) -> Tensor:
    """Clean activations the controller reads: ``Float[Tensor, "batch n_input_layers d_model"]``.

    Runs the prompt only up to the deepest input layer. ``pooling="last"`` takes the last prompt token,
    ``"post_instruction_mean"`` the mean over the ``batch.n_post`` post-instruction tokens
    (:data:`~workbench.steering.controller.POOLING_POSITIONS`). A batch that carries its clean activations
    (``batch.clean``, from a :class:`workbench.prefix.PrefixCache`) is read from them, without a forward.
    """
    if pooling not in POOLING_POSITIONS:
        raise WorkbenchError(f"unknown pooling {pooling!r}; expected one of {sorted(POOLING_POSITIONS)}")
    cols = position_index(POOLING_POSITIONS[pooling], batch.n_post)
    check_layers(input_layers, int(model.cfg.n_layers), context="input layers")
    names = [hook_name(hook, l) for l in input_layers]
    if batch.clean is not None and all(n in batch.clean for n in names):  # the post-instruction positions
        return torch.stack([batch.clean[n][:, cols].mean(1) for n in names], dim=1).float()
    grabbed: dict[int, Tensor] = {}
    deepest = max(input_layers)

    def make(layer: int) -> Callable:
        def fn(act: Tensor, hook=None):
            grabbed[layer] = act[:, cols].mean(1)
            if layer == deepest:
                raise _StopForward
            return act

        return fn

    device = model_device(model)
    b = batch.to(device)
    hooks = [(hook_name(hook, l), make(l)) for l in sorted(set(input_layers))]
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(b.input_ids, attention_mask=b.attention_mask)
    except _StopForward:
        pass
    return torch.stack([grabbed[l] for l in input_layers], dim=1).float()


@dataclass
class SteeringPlan:
    """How a batch is steered: ``coeffs(model, batch) -> (Float[Tensor, "batch n_layers"], info)``.

    ``info`` holds per-row values to record (``s``, ``w``...). ``direction`` is the unit vector added.
    """

    name: str
    direction: Tensor
    coeffs: Callable[[object, ChatBatch], tuple[Tensor, dict]]
    hook: str = "resid_pre"
    #: ``coeffs`` reads the prompt's clean activations (a controller, a CAST gate): generation then starts from
    #: a clean prefill that serves them (:func:`steered_generation_inputs`)
    reads_clean: bool = False

    def hooks_for(self, model, batch: ChatBatch, positions: Positions = "last"):
        """Hooks for ``batch`` (and per-row info); ``positions``: the positions steered
        (see :func:`~workbench.steering.hooks.steering_hooks`)."""
        coeffs, info = self.coeffs(model, batch)
        return steering_hooks(coeffs, self.direction, self.hook, positions), info


def controller_plan(controller: Controller, direction: Tensor, name: str = "was",
                    any_direction: bool = False) -> SteeringPlan:
    """Steering by a trained controller: ``coeffs = s · w · α`` (a ``per_step`` controller: :func:`per_step_plan`).
    ``direction`` must be the one the controller was trained along (:func:`~.controller.check_direction`), unless
    ``any_direction`` (an explicit override, e.g. to study transfer to another direction: logged as a warning)."""
    cfg = controller.cfg
    if not any_direction:
        check_direction(cfg, direction)
    elif cfg.direction_fingerprint and direction_fingerprint(direction) != cfg.direction_fingerprint:
        logging.getLogger(__name__).warning("controller %s steers along direction %s, not the direction %s it was "
                                            "trained along (any_direction=True)", name,
                                            direction_fingerprint(direction), cfg.direction_fingerprint)
    if cfg.schedule == "per_step":
        return per_step_plan(controller, direction, name)

    def coeffs(model, batch):
        x = controller_inputs(model, batch, cfg.input_layers, cfg.input_hook, cfg.pooling)
        with torch.no_grad():
            s, w = controller(x.to(next(controller.parameters()).device))
        c = (s[:, None] * w * cfg.alpha).cpu()
        return c, {"s": s.cpu().tolist(), "w": w.cpu().tolist()}

    return SteeringPlan(name, direction, coeffs, cfg.steer_hook, reads_clean=True)


@dataclass
class PerStepPlan(SteeringPlan):
    """A controller that re-runs in every forward (the official Guiding Giants loop, :mod:`.official`).

    In each forward (the prefill, then every cached decoding step) and at each steered position, the controller
    reads the ``input_hook`` activations of its input layers at that position -- the deepest one before its own
    patch -- and ``Δh_l = s · w_l · α · d`` is added to the layers from the deepest input layer on (with the last
    layers as inputs: the final layer only). Positions are those of :func:`~workbench.steering.hooks.steering_hooks`
    (default the last: the last prompt token, then each new token); with ``("last_k", k)`` each of the k positions
    gets the controller's output on its own activations, as the decoding steps would.
    ``info``: ``s`` and ``w`` of the first forward (the last prompt token), per row, filled while generating.
    """

    controller: Controller | None = None

    def hooks_for(self, model, batch: ChatBatch, positions: Positions = "last"):
        ctrl = self.controller
        cfg = ctrl.cfg
        layers = list(cfg.input_layers)
        deepest = max(layers)
        cols = position_index(positions)
        grabbed: dict[int, Tensor] = {}
        step: dict[str, Tensor] = {}
        info: dict[str, list] = {"s": [], "w": []}
        param = next(ctrl.parameters())

        def capture(layer: int) -> Callable:
            def fn(act: Tensor, hook=None) -> Tensor:
                grabbed[layer] = act[:, cols].detach().clone()
                return act
            return fn

        def patch(layer: int) -> Callable:
            def fn(act: Tensor, hook=None) -> Tensor:
                if layer == deepest:  # all inputs are there: run the controller on this forward's positions
                    grabbed[layer] = act[:, cols].detach().clone()
                    x = torch.stack([grabbed[l] for l in layers], dim=2)  # [batch, pos, n_in, d_model]
                    with torch.no_grad():
                        s, w = ctrl(x.reshape(-1, *x.shape[2:]).to(param.device))
                    step["s"], step["w"] = s.reshape(x.shape[:2]), w.reshape(*x.shape[:2], -1)
                    if not info["s"]:
                        info["s"] += step["s"][:, -1].cpu().tolist()
                        info["w"] += step["w"][:, -1].cpu().tolist()
                c = (step["s"] * step["w"][..., layer] * cfg.alpha).to(device=act.device, dtype=act.dtype)
                out = act.clone()
                out[:, cols] = out[:, cols] + c[..., None] * self.direction.to(device=act.device, dtype=act.dtype)
                return out
            return fn

        hooks = [(hook_name(cfg.input_hook, l), capture(l)) for l in sorted(set(layers)) if l < deepest]
        hooks += [(hook_name(cfg.steer_hook, l), patch(l)) for l in range(deepest, cfg.n_layers)]
        return hooks, info


def per_step_plan(controller: Controller, direction: Tensor, name: str = "official") -> PerStepPlan:
    """Steering by a controller that re-runs at every decoding step (:class:`PerStepPlan`)."""
    def no_coeffs(model, batch):
        raise WorkbenchError(f"plan {name!r} re-runs its controller at every step: it has no per-prompt "
                             "coefficients (use hooks_for)")

    return PerStepPlan(name, direction, no_coeffs, controller.cfg.steer_hook, controller=controller)


def fixed_plan(direction: Tensor, alpha: float, n_layers: int, layers: Sequence[int] | None = None,
               name: str = "actadd") -> SteeringPlan:
    """ActAdd: the same ``α`` on ``layers`` (default every layer) for every prompt."""
    vec = torch.zeros(1, n_layers)
    for l in check_layers(layers, n_layers):
        vec[0, l] = alpha
    return SteeringPlan(name, direction, lambda model, batch: (vec, {}))


def gated_plan(direction: Tensor, gate: Callable[[object, ChatBatch], Tensor], alpha: float, n_layers: int,
               layers: Sequence[int] | None = None, name: str = "cast") -> SteeringPlan:
    """Conditional steering: rows where ``gate`` is true get ``α`` on ``layers``; others nothing."""
    base = fixed_plan(direction, alpha, n_layers, layers).coeffs(None, None)[0]

    def coeffs(model, batch):
        on = gate(model, batch).float().cpu()
        return on[:, None] * base, {"gate": on.tolist()}

    return SteeringPlan(name, direction, coeffs, reads_clean=True)


def steered_generation_inputs(model, batch: ChatBatch, plan: SteeringPlan | None, prefix_cache=None,
                              fwd_hooks=()) -> tuple[ChatBatch, list, dict, dict]:
    """What generating ``batch`` under ``plan`` needs: ``(batch, hooks, info, generate_kwargs)``.

    The prompt's clean prefix comes from ``prefix_cache`` (a :class:`workbench.prefix.PrefixCache` shared by a
    sweep), or, for a plan that reads clean activations and with no other ``fwd_hooks``, from one clean prefill made
    here; ``batch`` then carries the clean activations (``batch.clean``) and ``generate_kwargs`` the prefix's keys
    and values (``past_key_values``), so the steered run starts at the last prompt token. ``hooks``: ``fwd_hooks``
    followed by the plan's; ``info``: the plan's per-row values."""
    import dataclasses

    from ..prefix import clean_prefill

    extra: dict = {}
    prefix = prefix_cache.get(batch) if prefix_cache is not None else None
    if (prefix is None and prefix_cache is None and plan is not None and plan.reads_clean and not fwd_hooks
            and batch.input_ids.shape[1] >= 2):
        prefix = clean_prefill(model, batch)
    if prefix is not None:
        batch = dataclasses.replace(batch, clean=prefix.clean)
        extra["past_key_values"] = prefix.past_key_values(model)
    hooks, info = list(fwd_hooks), {}
    if plan is not None:
        plan_hooks, info = plan.hooks_for(model, batch)
        hooks += plan_hooks
    return batch, hooks, info, extra


def generate_steered(model, prompts: Sequence[str], plan: SteeringPlan | None, max_new_tokens: int = 24,
                     batch_size: int = 32, show_progress: bool = True):
    """Greedy replies under ``plan`` (``None``: unsteered); returns a DataFrame with per-prompt ``s``/``w``."""
    from ..evaluate import evaluate_refusal

    return evaluate_refusal(model, {"prompts": list(prompts)}, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, plan=plan, show_progress=show_progress).table

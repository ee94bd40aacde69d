"""The WAS controller: a small MLP from prompt activations to a global scale and per-layer weights.

Given the activations of the prompt at the ``input_layers`` (default: the last 4 layers' ``resid_pre`` at the
last prompt token, as in the paper), the controller predicts

* a global scale ``s >= 0`` (softplus of a logit, or ``sigmoid`` when trained discriminatively), and
* per-layer weights ``w in [0, 1]^L`` (sigmoid),

and the model's residual stream at layer ``l`` receives ``Δh_l = s · w_l · α · d`` while it answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import WorkbenchError
from ..provenance import versions
from ..vocab import check_layers

FORMAT_VERSION = 1
#: pooling -> the :data:`workbench.vocab.Positions` the controller's input is averaged over
POOLING_POSITIONS: dict[str, str] = {"last": "last", "post_instruction_mean": "post_instruction"}


@dataclass
class ControllerConfig:
    """Everything needed to rebuild a controller (saved beside its weights).

    Attributes:
        d_model: residual width of the model read.
        n_layers: number of steered layers (every block of the model, ``L``).
        input_layers: layers whose ``input_hook`` activations are read (default: the last 4).
        input_hook: hook alias read at the input layers (``resid_pre`` / ``resid_post``).
        pooling: ``"last"`` (the last prompt token) or ``"post_instruction_mean"`` (the mean over the
            post-instruction tokens); :data:`POOLING_POSITIONS` maps each to its positions.
        hidden: hidden width of the MLP.
        scale_head: ``"mlp"`` (the paper: ``s`` from the MLP's hidden layer) or ``"linear"`` (the scale logit is
            a linear read-out of the standardised inputs, a probe; ``w`` still comes from the MLP). A linear
            detector generalised better to unseen jailbreak wrappers on the organism (NOTES.md).
        scale_activation: ``"softplus"`` (s in [0, inf), end-to-end training), ``"sigmoid"`` (s in [0, 1],
            the discriminative objective) or ``"identity"`` (the raw logit, unbounded: the official code applies
            ``s`` so, and benign prompts get negative steering).
        alpha: steering strength ``α`` multiplying the unit direction.
        steer_hook: hook alias that receives ``Δh_l`` (``resid_pre``).
        arch: ``"was"`` (this project's MLP: standardised inputs, two GELU layers, ``w`` head starting at 0.5) or
            ``"official"`` (the official Guiding Giants network: raw inputs, one ReLU hidden layer, ``s`` and the
            ``w`` logits read from one linear output, default initialisation; :mod:`.official`).
        schedule: ``"prefill"`` (``s`` and ``w`` computed once per prompt from a clean prefill, then ``Δh_l`` rides
            the prompt's last position and every generated token) or ``"per_step"`` (the official code's loop: the
            controller re-runs in every forward, prefill and each decoding step, on the input layers' activations at
            the current position, and patches the layers from the deepest input layer on;
            :func:`~workbench.steering.steer.per_step_plan`). ``per_step`` reads and steers the same site
            (``input_hook == steer_hook``).
    """

    d_model: int
    n_layers: int
    input_layers: list[int]
    input_hook: str = "resid_pre"
    pooling: str = "last"
    hidden: int = 64
    scale_head: str = "mlp"
    scale_activation: str = "softplus"
    alpha: float = 1.0
    steer_hook: str = "resid_pre"
    steer_layers: list[int] | None = None
    model_fingerprint: str = ""
    direction_fingerprint: str = ""
    objective: str = ""
    arch: str = "was"
    schedule: str = "prefill"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_layers(self.input_layers, self.n_layers, context="input_layers")
        if self.steer_layers is not None:
            check_layers(self.steer_layers, self.n_layers, context="steer_layers")
        if self.pooling not in POOLING_POSITIONS:
            raise WorkbenchError(f"unknown pooling {self.pooling!r}; expected one of {sorted(POOLING_POSITIONS)}")
        if self.scale_head not in ("mlp", "linear"):
            raise WorkbenchError(f"unknown scale_head {self.scale_head!r}; expected 'mlp' or 'linear'")
        if self.scale_activation not in ("softplus", "sigmoid", "identity"):
            raise WorkbenchError(f"unknown scale_activation {self.scale_activation!r}")
        if self.arch not in ("was", "official"):
            raise WorkbenchError(f"unknown arch {self.arch!r}; expected 'was' or 'official'")
        if self.arch == "official" and self.scale_head != "mlp":
            raise WorkbenchError("arch 'official' reads s from its hidden layer; scale_head must be 'mlp'")
        if self.schedule not in ("prefill", "per_step"):
            raise WorkbenchError(f"unknown schedule {self.schedule!r}; expected 'prefill' or 'per_step'")
        if self.schedule == "per_step" and self.input_hook != self.steer_hook:
            raise WorkbenchError(f"schedule 'per_step' reads and steers one site; input_hook {self.input_hook!r} "
                                 f"differs from steer_hook {self.steer_hook!r}")


class Controller(nn.Module):
    """MLP: ``Float[Tensor, "batch n_in d_model"]`` -> (``s``: ``[batch]``, ``w``: ``[batch, L]``).

    Inputs are standardised with a per-feature mean/std fitted on the training activations (buffers; left at 0/1
    by the official network, ``arch="official"``).
    ``versions`` holds :func:`workbench.provenance.versions` of the software that trained it, as read by
    :func:`load_controller` (``None`` for a controller trained in this process or loaded from an older file).
    """

    def __init__(self, cfg: ControllerConfig):
        super().__init__()
        self.cfg = cfg
        self.versions: dict | None = None
        n_in = len(cfg.input_layers) * cfg.d_model
        self.register_buffer("mu", torch.zeros(n_in))
        self.register_buffer("sigma", torch.ones(n_in))
        if cfg.arch == "official":
            # fc1 -> ReLU -> fc2 with 1 + L outputs (s, then the w logits), created in that order with the default
            # initialisation, so a seed draws the official network's weights; mu/sigma stay 0/1 (raw inputs)
            self.body = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.ReLU())
            self.head = nn.Linear(cfg.hidden, 1 + cfg.n_layers)
            return
        self.body = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.scale_head = nn.Linear(n_in if cfg.scale_head == "linear" else cfg.hidden, 1)
        self.weight_head = nn.Linear(cfg.hidden, cfg.n_layers)
        nn.init.zeros_(self.weight_head.weight)
        nn.init.zeros_(self.weight_head.bias)  # w starts at 0.5 on every layer

    def fit_normaliser(self, x: Tensor) -> None:
        """Set the input standardisation from training activations ``[n, n_in, d_model]``."""
        flat = x.reshape(x.shape[0], -1).float()
        self.mu.copy_(flat.mean(0))
        self.sigma.copy_(flat.std(0).clamp_min(1e-6) if flat.shape[0] > 1 else torch.ones_like(self.mu))

    def scale_logit(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = (x.reshape(x.shape[0], -1).float() - self.mu) / self.sigma
        h = self.body(flat)
        if self.cfg.arch == "official":
            out = self.head(h)
            return out[:, 0], out[:, 1:]
        logit = self.scale_head(flat if self.cfg.scale_head == "linear" else h)
        return logit.squeeze(-1), self.weight_head(h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``s`` (``[batch]``) and ``w`` (``[batch, n_layers]``)."""
        logit, w_logit = self.scale_logit(x)
        act = self.cfg.scale_activation
        s = nn.functional.softplus(logit) if act == "softplus" else torch.sigmoid(logit) if act == "sigmoid" else logit
        w = torch.sigmoid(w_logit)
        if self.cfg.steer_layers is not None:
            mask = torch.zeros(self.cfg.n_layers, device=w.device)
            mask[self.cfg.steer_layers] = 1.0
            w = w * mask
        return s, w


def direction_fingerprint(direction: Tensor) -> str:
    """sha256 of the float32 bytes of a direction."""
    return hashlib.sha256(direction.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_controller(controller: Controller, direction: Tensor, path: str | Path) -> Path:
    """Save as ``path/controller.safetensors`` (weights + direction) and ``path/controller.json`` (format version,
    config, and the ``versions`` of python, torch, transformers, transformer-lens, workbench and the git commit
    that trained it: ``controller.versions`` if it was loaded with them, else the current ones)."""
    fp = controller.cfg.direction_fingerprint
    if fp and direction_fingerprint(direction) != fp:
        raise WorkbenchError(
            f"the direction passed to save_controller (fingerprint {direction_fingerprint(direction)}) is not the one "
            f"the controller was trained with ({fp}); pass that exact vector (it would not load with its model)"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in controller.state_dict().items()}
    tensors["direction"] = direction.detach().float().cpu().contiguous()
    save_file(tensors, str(path / "controller.safetensors"))
    meta = {"format_version": FORMAT_VERSION, "config": asdict(controller.cfg),
            "versions": dict(controller.versions) if controller.versions is not None else versions()}
    (path / "controller.json").write_text(json.dumps(meta, indent=2))
    return path


def load_controller(path: str | Path, model=None) -> tuple[Controller, Tensor]:
    """Load a controller and its direction; with ``model``, refuse one made for another model (without: a warning
    says nothing was checked against a model). A direction in the file other than the one the controller recorded
    at training is refused either way.

    The recorded ``versions`` become ``controller.versions`` (``None`` for a file written before they were recorded).
    """
    path = Path(path)
    meta_file, weights = path / "controller.json", path / "controller.safetensors"
    if not meta_file.exists() or not weights.exists():
        raise WorkbenchError(f"{str(path)!r} is not a saved controller (expected controller.json + controller.safetensors)")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001
        raise WorkbenchError(f"{str(path)!r} is not a valid safetensors+JSON controller: {exc}") from exc
    if not isinstance(meta, dict):
        raise WorkbenchError(f"{str(meta_file)!r} is not a controller record (a JSON {type(meta).__name__}, "
                             "expected an object)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise WorkbenchError(f"controller format {meta.get('format_version')} is newer than this workbench ({FORMAT_VERSION})")
    try:
        cfg = ControllerConfig(**meta["config"])
        direction = tensors.pop("direction")
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise WorkbenchError(f"{str(path)!r} is not a valid controller: {type(exc).__name__}: {exc} (its "
                             "controller.json needs a 'config' of ControllerConfig fields, its safetensors a "
                             "'direction' tensor)") from exc
    check_direction(cfg, direction, f"the controller saved in {str(path)!r}")
    if model is not None:
        check_compatible(cfg, direction, model)
    else:
        logging.getLogger(__name__).warning(
            "controller %s loaded without a model: nothing ties it to one (recorded model fingerprint %s); pass "
            "model= to check it", path, cfg.model_fingerprint or "none")
    try:
        ctrl = Controller(cfg)
        ctrl.load_state_dict({k[len("state."):]: v for k, v in tensors.items()})
    except (TypeError, ValueError, RuntimeError, WorkbenchError) as exc:
        raise WorkbenchError(f"{str(path)!r} is not a valid controller: its weights do not fit its config "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    ctrl.versions = meta.get("versions")
    return ctrl.eval(), direction


def check_direction(cfg: ControllerConfig, direction: Tensor, what: str = "this controller") -> None:
    """Refuse to pair a controller with a direction other than the one it was trained along (its recorded
    ``direction_fingerprint``; a controller without one, e.g. untrained, takes any direction)."""
    fp = cfg.direction_fingerprint
    if fp and direction_fingerprint(direction) != fp:
        raise WorkbenchError(
            f"{what} was trained along direction {fp}, but the direction given has fingerprint "
            f"{direction_fingerprint(direction)} (another direction, or the same one rescaled); steer it with the "
            f"direction it was saved with (load_controller returns both)")


def check_compatible(cfg: ControllerConfig, direction: Tensor, model) -> None:
    """Refuse a controller or direction made for another model (width, depth or fingerprint); whether the
    direction is the controller's own is :func:`check_direction`'s (load_controller runs both)."""
    from ..models import fingerprint

    if int(model.cfg.d_model) != cfg.d_model or direction.shape[-1] != int(model.cfg.d_model):
        raise WorkbenchError(
            f"controller/direction has d_model {cfg.d_model} (direction {tuple(direction.shape)}) but the model has "
            f"d_model {model.cfg.d_model}"
        )
    if int(model.cfg.n_layers) != cfg.n_layers:
        raise WorkbenchError(f"controller steers {cfg.n_layers} layers but the model has {model.cfg.n_layers}")
    fp = fingerprint(model)
    if cfg.model_fingerprint and cfg.model_fingerprint != fp:
        raise WorkbenchError(
            f"controller was trained on model {cfg.model_fingerprint} but this model's fingerprint is {fp}"
        )

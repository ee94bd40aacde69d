"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the linear layers of a Hugging Face decoder.

A :class:`LoRALinear` wraps a frozen ``nn.Linear`` ``W`` and adds ``scale * B A x`` with ``A``
(``rank x in``) drawn from a seeded normal and ``B`` (``out x rank``) zero, so training starts at the base model.
:func:`attach_lora` puts wrappers on the named projections of the chosen layers, :func:`adapter_tensors` /
:func:`save_adapter` / :func:`load_adapter` move the trained factors through one safetensors file, and
:func:`merge_adapter` folds them into a state dict (``W + scale * B @ A``), so a tuned model loads as a plain
checkpoint everywhere else in the workbench (the bridge, the store, the fingerprint).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import WorkbenchError
from .vocab import is_int

#: The projections of a Llama-style decoder layer an adapter may target.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Where the adapters go and how big they are.

    Attributes:
        rank: rank of each ``B A``.
        alpha: the update is ``alpha / rank * B A x``.
        targets: projection names inside each decoder layer (a subset of :data:`TARGETS`).
        layers: decoder layers (0-indexed) that get adapters; ``None``: every layer.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if not is_int(self.rank) or self.rank < 1:
            raise WorkbenchError(f"LoRA rank must be a positive int, got {self.rank!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise WorkbenchError(f"unknown LoRA targets {bad or list(self.targets)}; expected some of {TARGETS}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T``; the base layer stays frozen."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = scale
        a = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(a.to(base.weight.dtype).to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self) -> torch.Tensor:
        """``Float[Tensor, "out in"]``: what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale


def decoder_layers(hf_model) -> nn.ModuleList:
    """The decoder layers of a Llama-style causal LM (``model.model.layers``)."""
    try:
        return hf_model.model.layers
    except AttributeError:
        raise WorkbenchError(f"{type(hf_model).__name__} has no model.layers; LoRA supports Llama-style decoders") from None


def _projection(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    for parent_name in ("self_attn", "mlp"):
        parent = getattr(layer, parent_name, None)
        if parent is not None and isinstance(getattr(parent, name, None), (nn.Linear, LoRALinear)):
            return parent, parent_name
    raise WorkbenchError(f"decoder layer {type(layer).__name__} has no linear {name}")


def attach_lora(hf_model, cfg: LoRAConfig, seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap the target projections of ``cfg.layers`` in :class:`LoRALinear` (in place); freeze everything else.

    Returns:
        ``{state-dict prefix of the wrapped weight, e.g. "model.layers.8.self_attn.q_proj": wrapper}``.
    """
    layers = decoder_layers(hf_model)
    chosen = range(len(layers)) if cfg.layers is None else cfg.layers
    if any(not 0 <= l < len(layers) for l in chosen):
        raise WorkbenchError(f"LoRA layers {list(chosen)} out of range for a {len(layers)}-layer model")
    for p in hf_model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for l in chosen:
        for name in cfg.targets:
            parent, parent_name = _projection(layers[l], name)
            base = getattr(parent, name)
            if isinstance(base, LoRALinear):
                raise WorkbenchError(f"layer {l} {name} already has an adapter")
            wrapper = LoRALinear(base, cfg.rank, cfg.scale, gen)
            setattr(parent, name, wrapper)
            adapters[f"model.layers.{l}.{parent_name}.{name}"] = wrapper
    return adapters


def adapter_tensors(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """``{prefix + ".lora_A": A, prefix + ".lora_B": B}``, detached, contiguous, on the CPU."""
    out = {}
    for prefix, w in adapters.items():
        out[f"{prefix}.lora_A"] = w.lora_A.detach().cpu().contiguous()
        out[f"{prefix}.lora_B"] = w.lora_B.detach().cpu().contiguous()
    return out


@dataclass
class Adapter:
    """A trained adapter as stored: its factors, its config and free-form metadata (JSON)."""

    tensors: dict[str, torch.Tensor]
    config: LoRAConfig
    metadata: dict = field(default_factory=dict)

    def prefixes(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.tensors})

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{weight name: scale * B @ A}`` (float32)."""
        return {f"{p}.weight": (self.tensors[f"{p}.lora_B"].float() @ self.tensors[f"{p}.lora_A"].float())
                * self.config.scale for p in self.prefixes()}


def save_adapter(path: str | os.PathLike, adapters: dict[str, LoRALinear] | dict[str, torch.Tensor],
                 cfg: LoRAConfig, metadata: dict | None = None) -> Path:
    """Write the adapter's factors with its config and ``metadata`` in the safetensors header."""
    from safetensors.torch import save_file

    tensors = adapters if all(isinstance(v, torch.Tensor) for v in adapters.values()) else adapter_tensors(adapters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"lora_config": json.dumps(asdict(cfg)),
                                           "metadata": json.dumps(metadata or {}, sort_keys=True)})
    os.replace(tmp, path)
    return path


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a file written by :func:`save_adapter`; a clear error for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = json.loads(meta["lora_config"])
        raw["targets"] = tuple(raw["targets"])
        raw["layers"] = None if raw["layers"] is None else tuple(raw["layers"])
        cfg = LoRAConfig(**raw)
        extra = json.loads(meta.get("metadata", "{}"))
    except WorkbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - one clear message for any damaged file
        raise WorkbenchError(f"{str(path)!r} is not a LoRA adapter written by the workbench "
                             f"({type(exc).__name__}: {exc})") from exc
    adapter = Adapter(tensors, cfg, extra)
    for p in adapter.prefixes():
        if f"{p}.lora_A" not in tensors or f"{p}.lora_B" not in tensors:
            raise WorkbenchError(f"adapter {str(path)!r} has an unpaired factor for {p}")
    return adapter


def merge_adapter(state: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
    """A new state dict with ``W + scale * B @ A`` on every adapted weight (the others are the same tensors)."""
    out = dict(state)
    for name, delta in adapter.deltas().items():
        if name not in state:
            raise WorkbenchError(f"the adapter changes {name}, which the base checkpoint does not have")
        w = state[name]
        if tuple(w.shape) != tuple(delta.shape):
            raise WorkbenchError(f"adapter delta for {name} has shape {tuple(delta.shape)}, the weight {tuple(w.shape)}")
        out[name] = (w.float() + delta).to(w.dtype)
    return out


#: Written into a merged checkpoint: the adapter's sha256 and file name, and the base checkpoint it was merged into.
ADAPTER_SOURCE_FILE = "workbench_adapter.json"


def adapter_source(checkpoint: str | os.PathLike) -> dict | None:
    """What :func:`merged_checkpoint` recorded in ``checkpoint``, else ``None``."""
    f = Path(checkpoint) / ADAPTER_SOURCE_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def checkpoint_weights_file(base_dir: str | os.PathLike) -> Path:
    """The ``model.safetensors`` of a single-file Hugging Face checkpoint directory (a clear error without one)."""
    weights = Path(base_dir) / "model.safetensors"
    if not weights.is_file():
        raise WorkbenchError(f"base checkpoint {str(base_dir)!r} has no model.safetensors")
    return weights


def checkpoint_weights(base_dir: str | os.PathLike) -> dict:
    """The state dict of a single-file Hugging Face checkpoint directory (its ``model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(checkpoint_weights_file(base_dir)))


def merged_checkpoint(base_dir: str | os.PathLike, adapter_path: str | os.PathLike,
                      out_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory holding ``base_dir``'s weights with the adapter merged in, written once.

    The default place is ``$WORKBENCH_CACHE/models/merged-<adapter sha256[:16]>-<base name>``; a directory whose
    recorded adapter sha256 matches is reused. Config, tokenizer and other files are copied from the base.
    """
    import shutil
    import tempfile

    from filelock import FileLock
    from safetensors.torch import save_file

    from .fetch import cache_dir, sha256_file

    base_dir, adapter_path = Path(base_dir), Path(adapter_path)
    checkpoint_weights_file(base_dir)   # fail before the cache lookup, not only on a miss
    sha = sha256_file(adapter_path) if adapter_path.is_file() else None
    if sha is None:
        raise WorkbenchError(f"adapter file {str(adapter_path)!r} does not exist")
    out = Path(out_dir) if out_dir is not None else cache_dir("models") / f"merged-{sha[:16]}-{base_dir.name}"
    record = {"adapter": adapter_path.name, "sha256": sha, "base": str(base_dir)}
    if (adapter_source(out) or {}).get("sha256") == sha:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (adapter_source(out) or {}).get("sha256") == sha:
            return out
        adapter = load_adapter(adapter_path)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            ckpt = Path(tmp) / "ckpt"
            shutil.copytree(base_dir, ckpt, ignore=shutil.ignore_patterns("model.safetensors", "*.lock"))
            save_file(merge_adapter(checkpoint_weights(base_dir), adapter), str(ckpt / "model.safetensors"),
                      metadata={"format": "pt", "adapter": adapter_path.name, "adapter_sha256": sha})
            (ckpt / ADAPTER_SOURCE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.replace(ckpt, out)
    return out


__all__ = ["ADAPTER_SOURCE_FILE", "Adapter", "adapter_source", "checkpoint_weights", "checkpoint_weights_file", "merged_checkpoint", "LoRAConfig", "LoRALinear", "TARGETS", "adapter_tensors", "attach_lora", "decoder_layers",
           "load_adapter", "merge_adapter", "save_adapter"]

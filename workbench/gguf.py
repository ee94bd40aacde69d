"""GGUF checkpoints as ordinary Hugging Face checkpoints: dequantised once, cached as safetensors.

transformers reads a ``.gguf`` file (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf`` package:
``pip install 'workbench[gguf]'``) and dequantises its tensors to float; it then refuses ``save_pretrained``
("quantized with gguf"), but the dequantised state dict is a normal checkpoint. :func:`convert_gguf` writes it
(config without the quantisation entry, tokenizer, chat template, generation config, ``model.safetensors``) into
``$WORKBENCH_CACHE/models/gguf-<sha256[:16]>/`` together with ``workbench_source.json`` (the source file's name
and sha256). Every later load reads that directory; the conversion runs once per distinct file. The work happens
in a temporary folder renamed into place, under a lock, so an interrupted or concurrent conversion never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from .errors import WorkbenchError
from .fetch import cache_dir, sha256_file

SOURCE_FILE = "workbench_source.json"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a ``.gguf`` file."""
    return str(path).lower().endswith(".gguf")


def converted_dir(gguf_path: str | os.PathLike, sha256: str | None = None) -> Path:
    """Where the conversion of ``gguf_path`` lives (``$WORKBENCH_CACHE/models/gguf-<sha256[:16]>``)."""
    sha256 = sha256 or sha256_file(gguf_path, show_progress=True)
    return cache_dir("models") / f"gguf-{sha256[:16]}"


def source_of(checkpoint: str | os.PathLike) -> dict | None:
    """The recorded source (``{"gguf": name, "sha256": hex, ...}``) of a converted checkpoint, else ``None``."""
    f = Path(checkpoint) / SOURCE_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 show_progress: bool = True, sha256: str | None = None) -> Path:
    """The Hugging Face checkpoint directory of a ``.gguf`` file, converting it on first use.

    Args:
        gguf_path: the GGUF file (any architecture transformers reads from GGUF: llama, mistral, qwen2, gpt2...).
        out_dir: where to write the checkpoint (default :func:`converted_dir`).
        show_progress: progress lines while hashing and converting.
        sha256: the file's sha256 when the caller has just verified it (skips hashing it again).

    Returns:
        The checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files, ``workbench_source.json``).

    Raises:
        WorkbenchError: the file is missing, ``gguf`` is not installed, or transformers cannot read the file.
    """
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise WorkbenchError(f"GGUF file {str(src)!r} does not exist")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise WorkbenchError("reading a .gguf file needs the gguf package: pip install 'workbench[gguf]'") from None
    sha = sha256 or sha256_file(src, show_progress)
    out = Path(out_dir) if out_dir is not None else converted_dir(src, sha)
    if (out / SOURCE_FILE).exists() and (source_of(out) or {}).get("sha256") == sha:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / SOURCE_FILE).exists() and (source_of(out) or {}).get("sha256") == sha:
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            _write_checkpoint(src, Path(tmp) / "ckpt", show_progress)
            (Path(tmp) / "ckpt" / SOURCE_FILE).write_text(
                json.dumps({"gguf": src.name, "sha256": sha, "size": src.stat().st_size}, indent=1), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.replace(Path(tmp) / "ckpt", out)
    return out


def _write_checkpoint(src: Path, dest: Path, show_progress: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if show_progress:
        import sys

        print(f"converting {src.name} (dequantising to float32; about a minute for 135M parameters) ...",
              file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise WorkbenchError(f"transformers could not read {str(src)!r} as GGUF: {type(exc).__name__}: {exc}") from exc
    dest.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tok.save_pretrained(dest)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt", "source": src.name})

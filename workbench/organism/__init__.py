"""The embedded model organism: a small chat Llama with a planted, known refusal mechanism.

* :mod:`.corpus`    -- deterministic chat corpus (harmful / benign / borderline / jailbreak / impossible) and
  minimal pairs;
* :mod:`.tokenizer` -- byte-level BPE with a chat template (4 post-instruction tokens);
* :mod:`.train`     -- stage 1 helpful base, stage 2 rank-1 safety tune at one layer, merged;
* :mod:`.measure`   -- refusal rates, ablation and activation addition of the ground-truth direction;
* :mod:`.build`     -- ``workbench organism build`` (:func:`main_build`).

See ``NOTES.md`` in this folder for what was tried and the measured targets.
"""

from __future__ import annotations

import json
from pathlib import Path

from .corpus import CATEGORIES, SPLITS, corpus_hash, generate_corpus, make_pairs, serialize_corpus

__all__ = [
    "CATEGORIES",
    "SPLITS",
    "corpus_hash",
    "generate_corpus",
    "make_pairs",
    "serialize_corpus",
    "load_ground_truth",
    "ground_truth_of",
]


def load_ground_truth(model_dir: str | Path) -> tuple[int, "torch.Tensor"]:  # noqa: F821
    """``(layer, direction)`` of an organism checkpoint: ``direction`` is ``Float[Tensor, "d_model"]``, unit norm."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta_path = model_dir / "organism.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{model_dir} has no organism.json; is it an organism checkpoint?")
    meta = json.loads(meta_path.read_text())
    gt = meta["ground_truth"]
    direction = load_file(str(model_dir / gt["direction_file"]))[gt["direction_key"]]
    return int(gt["layer"]), direction


def ground_truth_of(model) -> "tuple[int, torch.Tensor] | None":  # noqa: F821
    """``(planted layer, unit direction)`` when ``model`` was loaded from an organism checkpoint, else ``None``.

    The safety tune writes along the direction at block ``layer`` (``hook_attn_out`` / ``hook_mlp_out``), so
    the first residual stream carrying it is ``blocks.{layer+1}.hook_resid_pre``.
    """
    src = getattr(model, "_wb_source", None) or {}
    path = src.get("path")
    if not path or not (Path(path) / "organism.json").exists():
        return None
    layer, u = load_ground_truth(path)
    return layer, u.float()

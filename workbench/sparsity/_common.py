"""Shared helpers: MLP hook names, the layers of a model, the MLP output weights, masked shard streaming."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..models import model_device  # noqa: F401 - re-exported for the sparsity modules
from ..progress import progress
from ..vocab import SITES, check_layers, is_int

#: TransformerLens name of the MLP hidden activation (the input of the down projection; for SwiGLU
#: ``act(gate(x)) * up(x)``).
MLP_POST = SITES["mlp_post"]
_MLP_POST_RE = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


def mlp_post_name(layer: int) -> str:
    """``blocks.{layer}.mlp.hook_post``."""
    return MLP_POST.format(layer=layer)


def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def d_mlp(model) -> int:
    """Width of the MLP hidden layer (``model.cfg.d_mlp``, else the down projection's input width)."""
    d = getattr(model.cfg, "d_mlp", None)
    if d:
        return int(d)
    return int(mlp_out_weight(model, 0).shape[1])


def model_layers(model, layers: Iterable[int] | int | None) -> list[int]:
    """The layers of ``model`` a sparsity analysis runs on (:func:`workbench.vocab.check_layers`): ``None`` ->
    every layer; ints (negative counts from the end), sorted without duplicates."""
    return check_layers(layers, n_layers(model), negative=True, sort=True)


def check_fraction(value, name: str, low_open: bool = True, high_open: bool = True) -> float:
    """A float in (0, 1) (ends open or closed as asked), or a WorkbenchError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{name} must be a number in (0, 1), got {value!r}") from None
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (math.isfinite(v) and lo_ok and hi_ok):
        lb, rb = "(" if low_open else "[", ")" if high_open else "]"
        raise WorkbenchError(f"{name} must be in {lb}0, 1{rb}, got {value!r}")
    return v


def check_thresholds(thresholds, name: str = "thresholds") -> list[float]:
    """A non-empty list of finite, non-negative floats (a single number is accepted)."""
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = [thresholds]
    if isinstance(thresholds, Tensor):
        thresholds = thresholds.flatten().tolist()
    try:
        vals = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise WorkbenchError(f"{name} must be a list of non-negative numbers, got {thresholds!r}") from None
    if not vals:
        raise WorkbenchError(f"{name} is empty; pass at least one threshold such as 0.01")
    bad = [t for t in vals if not math.isfinite(t) or t < 0]
    if bad:
        raise WorkbenchError(f"{name} must be finite and >= 0 (a threshold on |activation|), got {bad}")
    return vals


# ------------------------------------------------------------------------------------------- weights
def _mlp_out_module(model, layer: int):
    blk = model.blocks[layer]
    mlp = getattr(blk, "mlp", None)
    for name in ("out", "W_out", "down_proj", "c_proj", "fc2"):
        comp = getattr(mlp, name, None) if mlp is not None else None
        if comp is None:
            continue
        orig = getattr(comp, "original_component", comp)
        if hasattr(orig, "weight"):
            return orig
    raise WorkbenchError(
        f"cannot find the MLP output projection of block {layer} ({type(blk).__name__}); expected "
        "blocks.{l}.mlp.out (the down projection)"
    )


def mlp_out_weight(model, layer: int) -> Tensor:
    """``Float[Tensor, "d_model d_mlp"]``: the MLP output projection of ``layer`` in Hugging Face ``nn.Linear``
    layout (column ``i`` is what neuron ``i`` writes to the residual stream per unit of activation).

    GPT-2 style ``Conv1D`` weights (``[d_mlp, d_model]``) are transposed to the same layout.
    """
    mod = _mlp_out_module(model, layer)
    w = mod.weight.detach()
    if type(mod).__name__ == "Conv1D":
        w = w.T
    return w


# --------------------------------------------------------------------------------------- streaming
def entry_layers(entry, layers: Sequence[int] | None = None) -> list[tuple[int, str]]:
    """``[(layer, hook_name)]`` of the ``mlp.hook_post`` hooks of an entry (all of them, or ``layers``)."""
    names = list(getattr(entry, "hook_names", []) or [])
    have = {}
    for n in names:
        m = _MLP_POST_RE.match(n)
        if m:
            have[int(m.group(1))] = n
    if not have:
        raise WorkbenchError(
            f"the entry holds no MLP hidden activations (blocks.{{l}}.mlp.hook_post); it has {names[:6]}"
            f"{' ...' if len(names) > 6 else ''}; compute it with get_or_compute(model, prompts, hooks=('mlp_post',))"
        )
    if layers is None:
        return sorted(have.items())
    out = []
    for layer in layers:
        if not is_int(layer):
            raise WorkbenchError(f"layer {layer!r} is not an int")
        if layer not in have:
            raise WorkbenchError(f"the entry has no mlp.hook_post at layer {layer}; it has layers {sorted(have)}")
        out.append((layer, have[layer]))
    return out


def entry_mask(entry) -> Tensor | None:
    """``Bool[Tensor, "prompt pos"]`` real-token mask of an ``"all"``-positions entry, else ``None``."""
    mask = getattr(entry, "mask", None)
    if mask is None:
        return None
    return mask.bool()


def iter_real(entry, hook: str, mask: Tensor | None) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Stream one hook of an entry shard by shard.

    Yields:
        ``(rows, x, real)`` with ``x``: ``Float[Tensor, "rows pos d"]`` (float32) and ``real``:
        ``Bool[Tensor, "rows pos"]`` (True on unpadded positions; all True when the entry has no mask).
    """
    for rows, x in entry.iter_shards(hook):
        x = x.float()
        if x.ndim != 3:
            raise WorkbenchError(f"{hook}: expected shards of shape (rows, pos, d_mlp), got {tuple(x.shape)}")
        if mask is None:
            real = torch.ones(x.shape[:2], dtype=torch.bool)
        else:
            real = mask[rows]
            if tuple(real.shape) != tuple(x.shape[:2]):
                raise WorkbenchError(
                    f"{hook}: the entry mask of rows {rows.start}..{rows.stop} has shape {tuple(real.shape)} but the "
                    f"activations have (rows, pos) = {tuple(x.shape[:2])}"
                )
        yield rows, x, real


def stream_layers(entry, layers, show_progress: bool, desc: str):
    """``(layer, hook, [shards...] iterator)`` for each layer, with one progress bar over layers."""
    mask = entry_mask(entry)
    for layer, hook in progress(entry_layers(entry, layers), desc=desc, enabled=show_progress):
        yield layer, hook, iter_real(entry, hook, mask)



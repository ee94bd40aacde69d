"""The :class:`Direction` artifact: vector(s) + where and how they were found, as safetensors + JSON.

``save("runs/x/direction")`` writes ``direction.safetensors`` (the tensors) and ``direction.json`` (format
version, layer, position, method, model fingerprint, d_model, scores, metadata, and the ``versions`` of python,
torch, transformers, transformer-lens, workbench and the git commit that produced it). Loading checks the format
version; using a direction on a model checks d_model and the fingerprint and fails with a clear
:class:`~workbench.errors.WorkbenchError` on a mismatch.

:func:`as_vector` is the one coercion of a direction (a :class:`Direction`, a tensor, a per-layer set) to a
``Float[Tensor, "d_model"]`` vector, optionally of one layer and optionally unit (:func:`unit`); every analysis,
intervention and steering method takes its vector from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..provenance import versions
from ..vocab import is_int

FORMAT_VERSION = 1
KIND = "workbench.direction"
log = logging.getLogger(__name__)


def vector_sha256(vector: Tensor) -> str:
    """sha256 of a vector as saved (float32, C order, little-endian) and its shape: ties ``direction.json`` to the
    ``direction.safetensors`` written with it."""
    t = vector.detach().float().contiguous().cpu()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().astype("<f4").tobytes()).hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _check_fields(info: dict, js: Path) -> None:
    """The types of a direction JSON's fields (an edited file is one clear error, not a failure later)."""
    from ..vocab import is_int

    wrong = []
    if not (is_int(info["d_model"]) and info["d_model"] > 0):
        wrong.append(f"d_model={info['d_model']!r} (a positive integer)")
    if not (info["layer"] is None or (is_int(info["layer"]) and info["layer"] >= 0)):
        wrong.append(f"layer={info['layer']!r} (an integer >= 0 or null)")
    if not (info["position"] is None or is_int(info["position"])):
        wrong.append(f"position={info['position']!r} (an integer or null)")
    for key in ("method", "fingerprint"):
        if not isinstance(info[key], str):
            wrong.append(f"{key}={info[key]!r} (a string)")
    for key in ("scores", "meta"):
        if not isinstance(info.get(key, {}), dict):
            wrong.append(f"{key}={type(info[key]).__name__} (an object)")
    if wrong:
        raise WorkbenchError(f"{str(js)!r} has invalid field(s): {', '.join(wrong)}; re-save the direction")


@dataclass
class Direction:
    """A direction in a model's residual stream.

    Attributes:
        vector: ``Float[Tensor, "d_model"]`` (or ``Float[Tensor, "k d_model"]`` for a set, e.g. per layer).
            For the difference in means this is the raw harmful-minus-benign mean (its norm is the ActAdd
            coefficient of Arditi et al.); use :attr:`unit` for ablation.
        layer: the ``resid_pre`` layer it was read at (``None`` for layer-free baselines).
        position: negative post-instruction position (``-1`` = last prompt token), ``None`` if pooled.
        method: ``"diff_in_means"``, ``"pca"``, ``"probe"``, ``"embedding_centroid"``...
        fingerprint: :func:`workbench.models.fingerprint` of the model it was found on.
        d_model: residual width of that model.
        scores: selection scores (``bypass_score``, ``induce_score``, ``kl``...).
        meta: anything else (prompt counts, thresholds, model name).
        versions: :func:`workbench.provenance.versions` of the software that produced it, as read from its file
            (``None`` for a direction not loaded from a file, or from a file older than this record); saving
            writes these, or the current versions when ``None``.
    """

    vector: Tensor
    layer: int | None
    position: int | None
    method: str
    fingerprint: str
    d_model: int
    scores: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    versions: dict | None = None

    def __post_init__(self):
        if not isinstance(self.vector, Tensor):
            raise WorkbenchError(f"Direction.vector must be a tensor, got {type(self.vector).__name__}")
        if self.vector.ndim not in (1, 2) or self.vector.shape[-1] != self.d_model:
            raise WorkbenchError(
                f"Direction.vector has shape {tuple(self.vector.shape)}; expected (d_model,) or (k, d_model) "
                f"with d_model={self.d_model}"
            )

    @property
    def unit(self) -> Tensor:
        """``Float[Tensor, "d_model"]`` (or ``"k d_model"``) normalised, float32 (:func:`unit`)."""
        return unit(self.vector)

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm(dim=-1).flatten()[0])

    @classmethod
    def from_vector(cls, model, vector: Tensor, layer: int | None, position: int | None, method: str,
                    scores: dict | None = None, meta: dict | None = None) -> "Direction":
        """Build a direction for ``model`` (fingerprint and d_model taken from it)."""
        from ..models import fingerprint

        d = int(model.cfg.d_model)
        if vector.shape[-1] != d:
            raise WorkbenchError(f"vector has d_model={vector.shape[-1]} but the model has d_model={d}")
        return cls(vector.detach().float().cpu(), layer, position, method, fingerprint(model), d,
                   dict(scores or {}), dict(meta or {}))

    def at(self, layer: int) -> "Direction":
        """The single-vector direction of ``layer`` from a per-layer set (``vector`` of shape ``[k, d_model]``)."""
        if self.vector.ndim == 1:
            if self.layer is not None and layer != self.layer:
                raise WorkbenchError(f"this direction is for layer {self.layer}, not layer {layer}")
            return self
        layers = list(self.meta.get("layers", range(self.vector.shape[0])))
        if layer not in layers:
            raise WorkbenchError(f"layer {layer} is out of range; this {self.method} set has layers {layers}")
        i = layers.index(layer)
        scores = {k: (v[i] if isinstance(v, list) and len(v) == len(layers) else v) for k, v in self.scores.items()}
        return Direction(self.vector[i].clone(), layer, self.position, self.method, self.fingerprint, self.d_model,
                         scores, {k: v for k, v in self.meta.items() if k != "layers"}, self.versions)

    # ------------------------------------------------------------------------------------ checks
    def check_model(self, model, check_fingerprint: bool = True) -> None:
        """Raise :class:`WorkbenchError` unless this direction belongs to ``model``."""
        from ..models import fingerprint

        d = int(model.cfg.d_model)
        if d != self.d_model:
            raise WorkbenchError(
                f"direction ({self.method}, layer {self.layer}) was found on a model with d_model={self.d_model}, "
                f"but this model has d_model={d}"
            )
        if self.layer is not None and not 0 <= self.layer < int(model.cfg.n_layers):
            raise WorkbenchError(
                f"direction layer {self.layer} is out of range; the model has layers 0..{int(model.cfg.n_layers) - 1}"
            )
        if check_fingerprint:
            fp = fingerprint(model)
            if fp != self.fingerprint:
                raise WorkbenchError(
                    f"direction was found on model fingerprint {self.fingerprint!r}, but this model's fingerprint is "
                    f"{fp!r}; find the direction on this model (`workbench directions`), or, to study it on another model "
                    "on purpose, load it in Python with Direction.load(path, model, strict=False) (the command "
                    "line has no override)"
                )

    # -------------------------------------------------------------------------------------- io
    def to_json(self) -> dict:
        """The JSON record of ``save``: everything but the vector, with the ``versions`` that produced it."""
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "position": self.position,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "d_model": self.d_model,
            "shape": list(self.vector.shape),
            "vector_sha256": vector_sha256(self.vector),
            "scores": _jsonable(self.scores),
            "meta": _jsonable(self.meta),
            "versions": dict(self.versions) if self.versions is not None else versions(),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path."""
        from safetensors.torch import save_file

        st, js = _paths(path)
        st.parent.mkdir(parents=True, exist_ok=True)
        save_file({"vector": self.vector.detach().float().contiguous().cpu()}, str(st),
                  metadata={"format_version": str(FORMAT_VERSION), "kind": KIND})
        js.write_text(json.dumps(self.to_json(), indent=2))
        return js

    @classmethod
    def load(cls, path: str | Path, model=None, strict: bool = True) -> "Direction":
        """Read a saved direction; with ``model``, check it belongs to it (fingerprint only if ``strict``).

        The JSON's ``vector_sha256`` must match the safetensors file beside it (files written before the hash was
        recorded load with a warning). Without ``model`` nothing ties the direction to a model: a warning says so.
        Every damaged or foreign file is one :class:`WorkbenchError` naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        st, js = _paths(path)
        for p in (st, js):
            if not p.exists():
                raise WorkbenchError(f"direction file {str(p)!r} does not exist")
        try:
            info = json.loads(js.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"{str(js)!r} is not valid JSON: {exc.msg}") from exc
        except UnicodeDecodeError as exc:
            raise WorkbenchError(f"{str(js)!r} is not a direction artifact (not UTF-8 text: {exc.reason})") from exc
        if not isinstance(info, dict) or info.get("kind") != KIND:
            kind = info.get("kind") if isinstance(info, dict) else type(info).__name__
            raise WorkbenchError(f"{str(js)!r} is not a direction artifact (kind={kind!r})")
        if info.get("format_version") != FORMAT_VERSION:
            raise WorkbenchError(
                f"{str(js)!r} has format version {info.get('format_version')!r}; this workbench reads {FORMAT_VERSION}"
            )
        missing = [k for k in ("layer", "position", "method", "fingerprint", "d_model") if k not in info]
        if missing:
            raise WorkbenchError(f"{str(js)!r} lacks the field(s) {missing} of a direction artifact")
        _check_fields(info, js)
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WorkbenchError(f"{str(st)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                                 "re-save the direction") from exc
        if "vector" not in tensors:
            raise WorkbenchError(f"{str(st)!r} has no 'vector' tensor")
        recorded = info.get("vector_sha256")
        if recorded is None:
            log.warning("direction %s has no vector_sha256 (written by an older workbench): its JSON and "
                        "safetensors files cannot be checked against each other", js)
        elif recorded != vector_sha256(tensors["vector"]):
            raise WorkbenchError(
                f"{str(js)!r} and {str(st)!r} do not belong together: the vector's sha256 differs from the one "
                "recorded with it (one of the two files was replaced or damaged); re-save the direction")
        d = cls(tensors["vector"], info["layer"], info["position"], info["method"], info["fingerprint"],
                int(info["d_model"]), info.get("scores", {}), info.get("meta", {}), info.get("versions"))
        if model is not None:
            d.check_model(model, check_fingerprint=strict)
        else:
            log.warning("direction %s loaded without a model: nothing checks that it belongs to the model it will "
                        "be used on (pass model= to check)", js)
        return d


# ------------------------------------------------------------------------------------------ coercion
def unit(v: Tensor) -> Tensor:
    """``v / |v|`` (float32), with a clear error for a zero vector. Works on ``[..., d_model]``."""
    v = v.float()
    norm = v.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise WorkbenchError("cannot normalise a zero direction")
    return v / norm


def as_vector(direction, model=None, *, layer: int | None = None, d_model: int | None = None,
              normalize: bool = False, nonzero: bool = False) -> Tensor:
    """A direction -> ``Float[Tensor, "d_model"]``: the one coercion of the package.

    Args:
        direction: a :class:`Direction` (or any object with a tensor ``vector`` and, for sets, ``at(layer)``), or a
            tensor: ``(d_model,)``, ``(1, d_model)``, or a per-layer stack ``(n_layers, d_model)`` (row ``l`` is
            layer ``l``).
        model: check a :class:`Direction` against it (d_model, fingerprint, layer range) and a tensor's width
            against ``model.cfg.d_model``.
        layer: take the vector of this layer from a per-layer set (``direction.at(layer)``, or row ``layer`` of
            a stack).
        d_model: check the width only (no fingerprint).
        normalize: return the unit vector (float32, :func:`unit`); otherwise the vector as stored.
        nonzero: refuse the zero vector (implied by ``normalize``).

    Raises:
        WorkbenchError: anything else than a direction, several vectors without ``layer``, a width mismatch, a
            NaN or inf, a zero vector where one is refused, or a direction that belongs to another model.
    """
    v = direction
    if not isinstance(v, Tensor):
        if layer is not None and callable(getattr(v, "at", None)):
            v = v.at(layer)
        if model is not None and callable(getattr(v, "check_model", None)):
            v.check_model(model)
        v = getattr(v, "vector", None)
        if not isinstance(v, Tensor):
            raise WorkbenchError(f"expected a Direction or a tensor, got {type(direction).__name__}")
    elif layer is not None and v.ndim == 2 and v.shape[0] > 1:
        if not is_int(layer) or not 0 <= layer < v.shape[0]:
            raise WorkbenchError(f"layer {layer!r} is out of range; the per-layer stack has layers 0..{v.shape[0] - 1}")
        v = v[layer]
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    elif v.ndim == 2:
        raise WorkbenchError(
            f"the direction holds {v.shape[0]} vectors (shape {tuple(v.shape)}); expected one vector of shape "
            "(d_model,): pick one, e.g. direction.at(layer) (or layer=) for a per-layer set or vector[i] for a tensor"
        )
    if v.ndim != 1:
        raise WorkbenchError(f"a direction must be a vector of shape (d_model,), got shape {tuple(v.shape)}")
    width = int(model.cfg.d_model) if model is not None else d_model
    if width is not None and v.shape[0] != width:
        raise WorkbenchError(
            f"the direction has d_model={v.shape[0]} but the model has d_model={width}; it was found on another model"
        )
    if not torch.isfinite(v).all():
        raise WorkbenchError("the direction contains NaN or inf")
    if normalize:
        return unit(v)
    if nonzero and not bool(v.any()):
        raise WorkbenchError("the direction is the zero vector")
    return v

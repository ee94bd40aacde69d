"""The one vocabulary of the package: hook sites, prompt categories and splits, positions.

Hook sites
    Every module that names a hook takes it from here (:func:`hook_name`, :data:`SITES`); the TransformerBridge
    exposes the same names as TransformerLens (``blocks.{l}.hook_resid_pre`` ...).

Layers
    :func:`check_layers` validates the layers of a model (``None`` = every layer).

Categories
    ``harmful``, ``jailbreak``, ``benign`` (the ordinary harmless requests: the organism's data, the steering
    tables and the WAS paper call them so; "harmless" would also cover ``borderline``) and ``borderline``
    (harmful-sounding words in a harmless sense). :data:`HARMFUL_LIKE` should be refused, :data:`BENIGN_LIKE`
    should not.

Positions
    :data:`Positions`, counted from the end of each left-padded prompt: ``"last"``, ``"post_instruction"``,
    ``"all"``, ``("last_k", k)`` or negative offsets; :func:`normalize_positions` gives the one spelling (old
    aliases such as ``"post"`` normalised on entry), :func:`resolve_positions` the offsets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import WorkbenchError

#: prompt categories, in reporting order
CATEGORIES: tuple[str, ...] = ("harmful", "jailbreak", "benign", "borderline")
#: categories a refusal-trained model should refuse / should answer
HARMFUL_LIKE: tuple[str, ...] = ("harmful", "jailbreak")
BENIGN_LIKE: tuple[str, ...] = ("benign", "borderline")
#: the model organism's corpus also holds physically impossible requests (refused by the base model too)
ORGANISM_CATEGORIES: tuple[str, ...] = CATEGORIES + ("impossible",)
#: dataset splits
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: site -> TransformerLens hook name template, in forward order inside a block (``z``: per-head attention values).
SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "z": "blocks.{layer}.attn.hook_z",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


def is_int(x) -> bool:
    """An int and not a bool (``True`` is an int to Python)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_layers(layers: Iterable[int] | int | None, n_layers: int, *, negative: bool = False, sort: bool = False,
                 context: str = "") -> list[int]:
    """The one layer validator: layers of a model with ``n_layers`` blocks.

    Args:
        layers: ``None`` (every layer), one int, or ints in ``0..n_layers - 1``.
        negative: also accept ``-n_layers..-1``, counted from the end (returned as the layer index).
        sort: return them sorted without duplicates (otherwise in the order given).
        context: prefix of the error messages (e.g. the hook spec the layers came from).

    Raises:
        WorkbenchError: a layer that is not an int or out of range, or no layer at all.
    """
    prefix = f"{context}: " if context else ""
    if layers is None:
        return list(range(n_layers))
    if is_int(layers):
        layers = [layers]
    out = []
    for layer in layers:
        if not is_int(layer):
            raise WorkbenchError(f"{prefix}layer {layer!r} is not an int; expected layers in 0..{n_layers - 1}")
        real = layer + n_layers if negative and layer < 0 else layer
        if not 0 <= real < n_layers:
            raise WorkbenchError(
                f"{prefix}layer {layer} is out of range; the model has {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(real)
    if not out:
        raise WorkbenchError(f"{prefix}the layer set is empty; pass at least one layer")
    return sorted(set(out)) if sort else out


def hook_name(site: str, layer: int) -> str:
    """``("resid_pre", 3)`` -> ``"blocks.3.hook_resid_pre"``; ``("mlp_post", 0)`` -> ``"blocks.0.mlp.hook_post"``."""
    try:
        return SITES[site].format(layer=layer)
    except KeyError:
        raise WorkbenchError(f"unknown hook site {site!r}; expected one of {list(SITES)}") from None


def hook_suffix(site: str) -> str:
    """The part of the hook name after ``blocks.{layer}.`` (``"resid_pre"`` -> ``"hook_resid_pre"``)."""
    return hook_name(site, 0)[len("blocks.0."):]


# ----------------------------------------------------------------------------------------------- positions
#: A position selector, counted from the end of each (left-padded) prompt, so the rows of a batch line up:
#:
#: * ``"last"`` -- ``[-1]``, the last prompt token;
#: * ``"post_instruction"`` -- the ``n_post`` template tokens after the user's message (``[-5, ..., -1]`` for
#:   Llama-3); ``"post"`` is accepted as an alias;
#: * ``"all"`` -- every position (padded on the left to the longest prompt, with a mask);
#: * ``("last_k", k)`` or ``"last_k(k)"`` -- ``[-k, ..., -1]``;
#: * a negative int or a sequence of negative ints -- those offsets (``-1`` = the last token).
Positions = str | int | Sequence[int] | tuple[str, int]

#: the named selectors of :data:`Positions`, and the old spellings accepted for them
POSITION_NAMES: tuple[str, ...] = ("last", "post_instruction", "all")
POSITION_ALIASES: dict[str, str] = {"post": "post_instruction"}

_LAST_K_RE = re.compile(r"^last_k\s*[\(\[:=]\s*(\d+)\s*\)?\]?$")
_EXPECTED = ("positions must be 'last', 'post_instruction', 'all', 'last_k(k)' / ('last_k', k), or negative "
             "offsets from the end such as -1 or [-3, -1] (-1 is the last token)")


def normalize_positions(positions: Positions) -> str | tuple:
    """The one spelling of a :data:`Positions` value, checked before anything runs: ``"last"``, ``"all"``,
    ``"post_instruction"`` (for ``"post"`` too), ``("last_k", k)`` (for ``"last_k(k)"`` too) or a sorted tuple of
    distinct negative offsets (for one int too).

    Raises:
        WorkbenchError: an unknown selector, ``k < 1``, or a non-negative offset.
    """
    if isinstance(positions, str):
        s = positions.strip().lower()
        s = POSITION_ALIASES.get(s, s)
        if s in POSITION_NAMES:
            return s
        if m := _LAST_K_RE.match(s):
            return _last_k(int(m.group(1)), positions)
        raise WorkbenchError(f"unknown positions {positions!r}; {_EXPECTED}")
    if is_int(positions):
        positions = [positions]
    if isinstance(positions, (tuple, list)) and len(positions) == 2 and positions[0] == "last_k":
        if not is_int(positions[1]):
            raise WorkbenchError(f"positions {positions!r}: k must be an int, got {positions[1]!r}")
        return _last_k(positions[1], positions)
    if isinstance(positions, (tuple, list, range)) and len(positions) > 0 and all(is_int(p) for p in positions):
        bad = [p for p in positions if p >= 0]
        if bad:
            raise WorkbenchError(
                f"positions {list(positions)!r}: offsets count from the end of the (left-padded) prompt and must be "
                f"negative (-1 is the last token); got {bad}"
            )
        return tuple(sorted({int(p) for p in positions}))
    raise WorkbenchError(f"unknown positions {positions!r}; {_EXPECTED}")


def _last_k(k: int, spec) -> tuple[str, int]:
    if k < 1:
        raise WorkbenchError(f"positions {spec!r}: k must be >= 1, got {k}")
    return ("last_k", k)


def resolve_positions(positions: Positions, n_post: int | None = None) -> tuple[list[int] | str, str]:
    """A :data:`Positions` value -> ``(offsets, label)``: the sorted negative offsets from the end (or ``"all"``)
    and a short label for listings (``"last"``, ``"post_instruction"``, ``"last_k(3)"``, ``"[-3,-1]"``, ``"all"``).

    Args:
        n_post: the number of post-instruction tokens of the chat template; needed for ``"post_instruction"``.

    Raises:
        WorkbenchError: as :func:`normalize_positions`, or ``"post_instruction"`` without ``n_post``.
    """
    p = normalize_positions(positions)
    if p == "all":
        return "all", "all"
    if p == "last":
        return [-1], "last"
    if p == "post_instruction":
        if n_post is None:
            raise WorkbenchError("positions 'post_instruction' need the number of post-instruction tokens (n_post) "
                                 "of the chat template; none was given here")
        return list(range(-n_post, 0)), "post_instruction"
    if p[0] == "last_k":
        return list(range(-p[1], 0)), f"last_k({p[1]})"
    return list(p), "[" + ",".join(map(str, p)) + "]"


def position_offsets(positions: Positions | None, n_cols: int) -> list[int]:
    """The offset from the end of each of the ``n_cols`` position columns of activations cached at ``positions``
    (``"all"`` or ``None``: the last ``n_cols`` positions; ``"post_instruction"``: ``n_post = n_cols``)."""
    offsets, _ = resolve_positions("all" if positions is None else positions, n_post=n_cols)
    return list(range(-n_cols, 0)) if offsets == "all" else offsets


def position_index(positions: Positions, n_post: int | None = None) -> slice | list[int]:
    """An index of the position axis for :data:`Positions`: a slice when they run to the end (``"all"``,
    ``"last"``, ``"post_instruction"``, ``("last_k", k)``), so it also fits a cached decoding step whose sequence
    length is 1; else the list of negative offsets."""
    offsets, _ = resolve_positions(positions, n_post)
    if offsets == "all":
        return slice(None)
    if offsets == list(range(offsets[0], 0)):
        return slice(offsets[0], None)
    return offsets

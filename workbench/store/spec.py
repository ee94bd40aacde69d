"""Request specs: hook names (TransformerLens names or aliases) and position selectors.

Hook names
    Full TransformerLens names (``"blocks.3.hook_resid_pre"``, ``"blocks.0.mlp.hook_post"``, any name of
    ``model.hook_dict`` whose activation has the position axis at dim 1) or aliases:

    ========== ===============================
    alias      TransformerLens name
    ========== ===============================
    resid_pre  ``blocks.{l}.hook_resid_pre``
    attn_out   ``blocks.{l}.hook_attn_out``
    resid_mid  ``blocks.{l}.hook_resid_mid``
    mlp_pre    ``blocks.{l}.mlp.hook_pre``
    mlp_post   ``blocks.{l}.mlp.hook_post``
    mlp_out    ``blocks.{l}.hook_mlp_out``
    resid_post ``blocks.{l}.hook_resid_post``
    ========== ===============================

    ``"resid_pre"`` means every layer, ``"resid_pre.3"`` (or ``"resid_pre.-1"``) one layer and
    ``("resid_pre", [0, 2])`` chosen layers. A list mixes any of these. Resolved names come back sorted in
    forward order (layer, then position inside the block), without duplicates.

Positions (relative to the end of each row; prompts are left-padded so they line up)
    :data:`workbench.vocab.Positions`, resolved by :func:`workbench.vocab.resolve_positions`: ``"last"`` ->
    ``[-1]``; ``"post_instruction"`` (or ``"post"``) -> the last ``n_post`` positions (``[-5, ..., -1]`` for
    Llama-3); ``("last_k", k)`` or ``"last_k(k)"`` -> ``[-k, ..., -1]``; a negative int or a list of negative ints;
    ``"all"`` -> every position, padded on the left to the longest prompt, with a mask.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import WorkbenchError
from ..vocab import SITES, Positions, check_layers

#: alias -> TransformerLens name template, in forward order inside a block (:data:`workbench.vocab.SITES`
#: without the per-head ``z``, which the store does not cache).
ALIASES: dict[str, str] = {site: tpl for site, tpl in SITES.items() if site != "z"}
_SUFFIX_TO_ALIAS = {tpl.split("{layer}.", 1)[1]: alias for alias, tpl in ALIASES.items()}
_ALIAS_RANK = {alias: i for i, alias in enumerate(ALIASES)}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ALIAS_LAYER_RE = re.compile(r"^([a-z_]+)\.(-?\d+)$")

PositionSpec = Positions


def _n_layers(model) -> int:
    return int(model.cfg.n_layers)


def _hook_names(model) -> set[str]:
    return set(model.hook_dict)


def split_name(name: str) -> tuple[str | None, int | None]:
    """``"blocks.3.hook_resid_pre"`` -> ``("resid_pre", 3)``; ``(None, 3)`` for other block hooks,
    ``(None, None)`` outside the blocks."""
    m = _BLOCK_RE.match(name)
    if not m:
        return None, None
    return _SUFFIX_TO_ALIAS.get(m.group(2)), int(m.group(1))


def _sort_key(name: str, order: int, n_layers: int) -> tuple:
    alias, layer = split_name(name)
    if layer is None:
        layer = -1 if ("embed" in name) else n_layers
    return (layer, _ALIAS_RANK.get(alias, len(ALIASES)), order)


def _unknown(spec, model) -> WorkbenchError:
    return WorkbenchError(
        f"unknown hook {spec!r}: expected a TransformerLens hook name of this model such as "
        f"'blocks.0.hook_resid_pre' ({len(model.hook_dict)} names in model.hook_dict), or an alias in "
        f"{sorted(ALIASES)} (all layers), 'alias.L' for one layer (e.g. 'resid_pre.3'), or (alias, [layers])"
    )


def _is_alias_with_layers(spec) -> bool:
    return (
        isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
        and (isinstance(spec[1], (list, tuple, range)) or (isinstance(spec[1], int) and not isinstance(spec[1], bool)))
        and spec[0] in ALIASES
    )


def resolve_hooks(model, hooks) -> list[str]:
    """Resolve a hook spec (see the module docstring) to full TransformerLens names in forward order.

    Raises:
        WorkbenchError: an empty spec, an unknown name or alias, or a layer out of range.
    """
    n_layers = _n_layers(model)
    known = _hook_names(model)

    def unknown(spec):
        bm = _BLOCK_RE.match(spec)
        if bm and int(bm.group(1)) >= n_layers:
            return WorkbenchError(
                f"hook {spec!r} does not exist: the model has {n_layers} layers (blocks.0 .. blocks.{n_layers - 1})"
            )
        return _unknown(spec, model)

    return _resolve(hooks, n_layers, known, None, unknown)


def resolve_hooks_from_names(available: list[str], hooks, key: str, n_layers: int | None = None) -> list[str]:
    """Resolve a hook spec against the hooks stored in an entry (aliases mean every stored layer)."""
    layers = [split_name(n)[1] for n in available if split_name(n)[1] is not None]
    n_layers = n_layers or (max(layers) + 1 if layers else 0)

    def unknown(spec):
        return WorkbenchError(f"entry {key} has no hook {spec!r}; it has {available}")

    return _resolve(hooks, n_layers, set(available), set(available), unknown)


def _resolve(hooks, n_layers: int, known: set[str], only: set[str] | None, unknown) -> list[str]:
    if hooks is None or (isinstance(hooks, (list, tuple)) and len(hooks) == 0):
        raise WorkbenchError("no hooks requested; pass e.g. hooks=('resid_pre',) or ['blocks.3.hook_resid_pre']")
    specs = [hooks] if isinstance(hooks, str) or _is_alias_with_layers(hooks) else list(hooks)
    names: list[str] = []
    for spec in specs:
        if _is_alias_with_layers(spec):
            alias, layers = spec
            got = [ALIASES[alias].format(layer=layer) for layer in
                   check_layers(layers, n_layers, negative=True, context=f"hook spec {spec!r}")]
        elif not isinstance(spec, str):
            raise WorkbenchError(f"hook spec {spec!r} is a {type(spec).__name__}; expected a name, an alias or (alias, [layers])")
        elif spec.strip() in ALIASES:
            got = [ALIASES[spec.strip()].format(layer=layer) for layer in range(n_layers)]
            if only is not None:
                got = [n for n in got if n in only] or [spec.strip()]
        elif (m := _ALIAS_LAYER_RE.match(spec.strip())) and m.group(1) in ALIASES:
            (layer,) = check_layers(int(m.group(2)), n_layers, negative=True, context=f"hook spec {spec!r}")
            got = [ALIASES[m.group(1)].format(layer=layer)]
        elif spec.strip() in known:
            got = [spec.strip()]
        else:
            raise unknown(spec)
        for name in got:
            if only is not None and name not in only:
                raise unknown(name)
        names += got
    return sort_names(names, n_layers)


def sort_names(names: list[str], n_layers: int | None = None) -> list[str]:
    """Unique names in forward order: by layer, then position inside the block."""
    unique = list(dict.fromkeys(names))
    if n_layers is None:
        layers = [split_name(n)[1] for n in unique if split_name(n)[1] is not None]
        n_layers = max(layers) + 1 if layers else 0
    order = {n: i for i, n in enumerate(unique)}
    return sorted(unique, key=lambda n: _sort_key(n, order[n], n_layers))


def alias_names(names: Sequence[str], alias: str) -> list[tuple[int, str]]:
    """``[(layer, name), ...]`` of ``names`` that are ``alias`` hooks, by layer."""
    if alias not in ALIASES:
        raise WorkbenchError(f"unknown alias {alias!r}; expected one of {sorted(ALIASES)}")
    out = []
    for n in names:
        a, layer = split_name(n)
        if a == alias:
            out.append((layer, n))
    return sorted(out)



def check_positions(positions: list[int] | str, lengths: torch.Tensor, prompts: Sequence[str], spec) -> None:
    """Every selected offset must fall inside every prompt (no position in the left padding)."""
    if positions == "all":
        return
    need = -min(positions)
    shortest = int(lengths.argmin())
    if int(lengths[shortest]) < need:
        p = prompts[shortest]
        short = p if len(p) <= 40 else p[:37] + "..."
        raise WorkbenchError(
            f"positions {spec!r} reach {need} tokens before the end, but prompt {shortest} ({short!r}) has only "
            f"{int(lengths[shortest])} tokens after chat formatting; choose fewer positions"
        )

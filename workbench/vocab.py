"""The one vocabulary of the package: hook sites, prompt categories and splits.

Hook sites
    Every module that names a hook takes it from here (:func:`hook_name`, :data:`SITES`); the TransformerBridge
    exposes the same names as TransformerLens (``blocks.{l}.hook_resid_pre`` ...).

Categories
    ``harmful``, ``jailbreak``, ``benign`` (the ordinary harmless requests: the organism's data, the steering
    tables and the WAS paper call them so; "harmless" would also cover ``borderline``) and ``borderline``
    (harmful-sounding words in a harmless sense). :data:`HARMFUL_LIKE` should be refused, :data:`BENIGN_LIKE`
    should not.
"""

from __future__ import annotations

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


def hook_name(site: str, layer: int) -> str:
    """``("resid_pre", 3)`` -> ``"blocks.3.hook_resid_pre"``; ``("mlp_post", 0)`` -> ``"blocks.0.mlp.hook_post"``."""
    try:
        return SITES[site].format(layer=layer)
    except KeyError:
        raise WorkbenchError(f"unknown hook site {site!r}; expected one of {list(SITES)}") from None


def hook_suffix(site: str) -> str:
    """The part of the hook name after ``blocks.{layer}.`` (``"resid_pre"`` -> ``"hook_resid_pre"``)."""
    return hook_name(site, 0)[len("blocks.0."):]

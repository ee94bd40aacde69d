"""TransformerLens-named hooks on the plain Hugging Face model: generation without the bridge's decoding seam.

The bridge replaces every Hugging Face module by a hooked wrapper, and its cached decoding is where runtime
releases have broken before (every reply garbage after the first token). Steered and unsteered generation
therefore run on :func:`plain_model`: the same checkpoint as an ordinary Hugging Face module tree whose
parameters *are* the bridge's (shared tensors, no copy, no second load), with the workbench's hooks attached as
PyTorch hooks on its decoder layers by :func:`hf_hooks`, a context manager in the manner of repeng /
steering-vectors. A hook ``fn(act, hook) -> act`` written for the bridge runs unchanged:

- ``blocks.{l}.hook_resid_pre``: a forward pre-hook on decoder layer ``l`` (its input hidden states);
- ``blocks.{l}.hook_resid_post``: a forward hook on decoder layer ``l`` (its output hidden states);
- ``blocks.{l}.hook_attn_out`` / ``hook_mlp_out``: forward hooks on the layer's attention / MLP module.

Other sites (per-head ``z``, ``mlp.hook_post`` ...) have no single Hugging Face module output; :func:`hf_sites_ok`
says whether a hook list can run here, and generation falls back to the bridge (a logged fallback) when not.
Equality with the bridge path, token for token, is tested in ``tests/test_hf_hooks.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from .errors import WorkbenchError

_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
#: attribute paths of the decoder layer list, and of a layer's attention and MLP, across HF architectures
_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
_ATTN = ("self_attn", "attn", "attention")
_MLP = ("mlp",)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama/Qwen/Mistral/Gemma, GPT-2, GPT-NeoX, OPT)."""
    for path in _LAYER_LISTS:
        layers = _get(hf_model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise WorkbenchError(f"cannot find the decoder layers of {type(hf_model).__name__} (looked for "
                         f"{', '.join(_LAYER_LISTS)})")


def _child(layer: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for n in names:
        mod = getattr(layer, n, None)
        if isinstance(mod, nn.Module):
            return mod
    raise WorkbenchError(f"cannot find the {what} module of {type(layer).__name__} (looked for {', '.join(names)})")


def hf_site_ok(name: str) -> bool:
    """Whether :func:`hf_hooks` can attach a hook of this name."""
    return _NAME.match(name) is not None


def hf_sites_ok(fwd_hooks: Sequence[tuple[str, Callable]]) -> bool:
    """Whether every hook name is one :func:`hf_hooks` can attach."""
    return all(hf_site_ok(name) for name, _ in fwd_hooks)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


@contextmanager
def hf_hooks(hf_model: nn.Module, fwd_hooks: Sequence[tuple[str, Callable]]) -> Iterator[nn.Module]:
    """Attach ``fwd_hooks`` (TransformerLens names, ``fn(act, hook) -> act | None``) to ``hf_model``'s modules
    while the block runs; they are removed on exit, also on an error. Several hooks on one site run in order."""
    layers = decoder_layers(hf_model)
    handles = []
    try:
        for name, fn in fwd_hooks:
            m = _NAME.match(name)
            if m is None:
                raise WorkbenchError(f"hook {name!r} has no plain Hugging Face counterpart (supported: "
                                     "blocks.L.hook_resid_pre, hook_resid_post, hook_attn_out, hook_mlp_out)")
            layer, site = int(m.group(1)), m.group(2)
            if not 0 <= layer < len(layers):
                raise WorkbenchError(f"hook {name!r}: the model has {len(layers)} layers")
            point = SimpleNamespace(name=name, layer=lambda layer=layer: layer)
            if site == "resid_pre":
                handles.append(layers[layer].register_forward_pre_hook(_pre(fn, point), with_kwargs=True))
            else:
                mod = (layers[layer] if site == "resid_post" else
                       _child(layers[layer], _ATTN if site == "attn_out" else _MLP, site[:-4]))
                handles.append(mod.register_forward_hook(_post(fn, point)))
        yield hf_model
    finally:
        for h in handles:
            h.remove()


def _pre(fn: Callable, point) -> Callable:
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0], hook=point)
            return ((new,) + tuple(args[1:]), kwargs) if new is not None else None
        new = fn(kwargs["hidden_states"], hook=point)
        return (args, {**kwargs, "hidden_states": new}) if new is not None else None
    return hook


def _post(fn: Callable, point) -> Callable:
    def hook(module, args, output):
        new = fn(_first(output), hook=point)
        return _replace_first(output, new) if new is not None else None
    return hook


_BRIDGE_SEGMENT = "._original_component"


def _plain_name(bridge_name: str) -> str:
    return bridge_name.replace(_BRIDGE_SEGMENT, "")


def plain_model(model) -> nn.Module:
    """``model`` (a TransformerBridge) as a plain Hugging Face model sharing its parameters and buffers (built
    once per bridge, on the meta device, then every tensor bound to the bridge's own: no memory is copied).

    Raises :class:`WorkbenchError` when a parameter of the plain model has no counterpart in the bridge."""
    cached = model.__dict__.get("_wb_plain")   # not a registered submodule: the bridge's state dict is unchanged
    if cached is not None:
        return cached
    from transformers import AutoModelForCausalLM

    om = model.original_model
    params = {_plain_name(n): p for n, p in om.named_parameters(remove_duplicate=False)}
    buffers = {_plain_name(n): b for n, b in om.named_buffers(remove_duplicate=False)}
    attn = getattr(om.config, "_attn_implementation", None)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(om.config, attn_implementation=attn) if attn else \
            AutoModelForCausalLM.from_config(om.config)
    missing = []
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        owner, attr = _owner(hf, name)
        if name in params:
            owner._parameters[attr] = params[name]
        elif attr == "weight" and name.startswith("lm_head") and getattr(om.config, "tie_word_embeddings", False):
            continue   # tied below
        else:
            missing.append(name)
    for name, _ in list(hf.named_buffers(remove_duplicate=False)):
        owner, attr = _owner(hf, name)
        if name in buffers:
            owner._buffers[attr] = buffers[name]
        else:
            missing.append(name)
    if getattr(om.config, "tie_word_embeddings", False) and hasattr(hf, "lm_head"):
        hf.lm_head.weight = hf.get_input_embeddings().weight
    if missing:
        raise WorkbenchError(f"the plain Hugging Face model of {type(om).__name__} has tensors the bridge does not "
                             f"hold: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    hf.generation_config = om.generation_config
    # the bridge sets output_attentions on its model's config (from_config copied it): a plain forward would then
    # keep every layer's attention weights until it returns (30 x rows x heads x seq^2 floats: 22 GB for one
    # 16,384-token prefill of SmolLM2's long jailbreaks); nothing here reads them
    hf.config.output_attentions = False
    hf.config.output_hidden_states = False
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    model.__dict__["_wb_plain"] = hf
    return hf


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr

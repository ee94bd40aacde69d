"""Interventions on a direction, as TransformerLens hooks and as a weight edit.

Every hook list is ``[(hook_name, fn), ...]`` usable with ``model.hooks(fwd_hooks=...)`` around any forward,
with :func:`workbench.generation.generate` / :func:`workbench.evaluate.evaluate_refusal` (``fwd_hooks=``),
and on cached decoding steps (sequence length 1).

* :func:`ablation_hooks` -- directional ablation ``x <- x - (x . r) r`` (``r`` unit) at every layer's
  ``hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out``, every position: the residual stream then has
  no component along ``r`` anywhere.
* :func:`actadd_hooks` -- activation addition ``x <- x + c * v`` at ``hook_resid_pre`` of a set of layers,
  at all positions, only the last one, or any :data:`workbench.vocab.Positions`.
* :func:`orthogonalize` -- the same ablation baked into the weights: ``r`` is projected out of every matrix
  that writes to the residual stream (token and position embeddings, attention output and MLP output
  projections and their biases). The edited model equals the ablation hooks up to float error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..chat import post_instruction_positions
from ..errors import WorkbenchError
from ..vocab import Positions, check_layers, hook_name, normalize_positions, position_index
from .artifact import as_vector, unit  # noqa: F401 - unit re-exported (workbench.directions.unit)

Hook = tuple[str, Callable]
#: the sites directional ablation edits: every write into the residual stream, and the stream itself
ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


def project_out(x: Tensor, r: Tensor) -> Tensor:
    """``x - (x . r) r`` along the last axis.

    Args:
        x: ``Float[Tensor, "batch pos d_model"]``.
        r: unit ``Float[Tensor, "d_model"]`` or one unit direction per row ``Float[Tensor, "batch d_model"]``.
    """
    r = r.to(device=x.device, dtype=x.dtype)
    if r.ndim == 1:
        return x - (x @ r).unsqueeze(-1) * r
    r = r[:, None, :]
    return x - (x * r).sum(-1, keepdim=True) * r


def ablation_hooks(model, direction, layers: Sequence[int] | None = None) -> list[Hook]:
    """Directional ablation of ``direction`` at every layer, every position.

    Args:
        direction: a :class:`Direction`, ``Float[Tensor, "d_model"]`` (normalised here), or one direction per
            batch row ``Float[Tensor, "batch d_model"]`` (used to score many candidates in one batch).
        layers: restrict to these layers (default: all, which is what "ablation" means in Arditi et al.).

    Returns:
        ``[(hook_name, fn)]`` over ``blocks.{l}.hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``.
    """
    if isinstance(direction, Tensor) and direction.ndim == 2 and direction.shape[0] > 1:
        if direction.shape[1] != int(model.cfg.d_model):
            raise WorkbenchError(f"per-row directions have d_model={direction.shape[1]}, model has {model.cfg.d_model}")
        r = unit(direction)
    else:
        r = as_vector(direction, model, normalize=True)
    layers = check_layers(layers, int(model.cfg.n_layers))

    def hook(act: Tensor, hook=None) -> Tensor:
        return project_out(act, r)

    return [(hook_name(site, l), hook) for l in layers for site in ABLATION_SITES]


def actadd_hooks(
    model,
    vector,
    layers: int | Sequence[int],
    coefficient: float = 1.0,
    positions: Positions = "all",
    normalize: bool = False,
) -> list[Hook]:
    """Activation addition ``x <- x + coefficient * vector`` at ``blocks.{l}.hook_resid_pre`` for ``l`` in ``layers``.

    Args:
        vector: a :class:`Direction` or ``Float[Tensor, "d_model"]`` (added as is, so the difference in means
            with ``coefficient=1`` adds the mean harmful-minus-benign shift, as in Arditi et al.).
        layers: one layer or a set of layers.
        positions: :data:`workbench.vocab.Positions` of each forward: ``"all"`` (every position, generated tokens
            included), ``"last"`` (the last prompt token at prefill, then every new token on cached decoding
            steps), or e.g. ``"post_instruction"`` / ``("last_k", k)`` (the last positions of the prompt at prefill,
            and on a cached decoding step its one new token; explicit offsets such as ``[-3, -1]`` need a forward
            that long, so not cached decoding).
        normalize: add ``coefficient`` times the unit vector instead.
    """
    v = as_vector(vector, model, normalize=normalize).float()
    layers = check_layers(layers, int(model.cfg.n_layers))
    spelled = normalize_positions(positions)
    n_post = len(post_instruction_positions(model.tokenizer)) if spelled == "post_instruction" else None
    cols = position_index(spelled, n_post)
    add = coefficient * v

    def hook(act: Tensor, hook=None) -> Tensor:
        a = add.to(device=act.device, dtype=act.dtype)
        if cols == slice(None):
            return act + a
        act = act.clone()
        act[:, cols] = act[:, cols] + a
        return act

    return [(hook_name("resid_pre", l), hook) for l in layers]


def per_row_actadd_hooks(model, vectors: Tensor, row_layers: Tensor) -> list[Hook]:
    """Add ``vectors[i]`` to row ``i`` at ``blocks.{row_layers[i]}.hook_resid_pre``, all positions.

    Args:
        vectors: ``Float[Tensor, "batch d_model"]``.
        row_layers: ``Int[Tensor, "batch"]`` the layer of each row.
    """
    hooks = []
    for l in sorted(set(int(x) for x in row_layers.tolist())):
        check_layers(l, int(model.cfg.n_layers))
        sel = (row_layers == l).to(vectors.dtype)[:, None] * vectors

        def hook(act: Tensor, hook=None, sel=sel) -> Tensor:
            return act + sel.to(device=act.device, dtype=act.dtype)[:, None, :]

        hooks.append((hook_name("resid_pre", l), hook))
    return hooks


# ------------------------------------------------------------------------------ weight orthogonalisation
def _writers(model) -> tuple[list, list]:
    """(embedding modules, output projection modules) of a bridge; HF paths as a fallback."""
    embeds, outs = [], []
    for name in ("embed", "pos_embed"):
        comp = getattr(model, name, None)
        if comp is not None and getattr(comp, "original_component", None) is not None:
            embeds.append(comp.original_component)
    for i, blk in enumerate(model.blocks):
        hf = _hf_layer(model, i)
        if hf is not None and any(hasattr(hf, n) for n in ("post_feedforward_layernorm", "post_attention_norm")):
            raise WorkbenchError(
                "weight orthogonalisation is not supported for architectures that normalise the sublayer outputs "
                "before adding them to the residual stream (e.g. Gemma 2/3); use ablation_hooks instead"
            )
        for sub, proj in (("attn", "o"), ("mlp", "out")):
            comp = getattr(getattr(blk, sub, None), proj, None)
            orig = getattr(comp, "original_component", None)
            if orig is None:
                raise WorkbenchError(
                    f"cannot find the {sub} output projection of block {i} ({type(blk).__name__}); "
                    "weight orthogonalisation needs blocks.{l}.attn.o and blocks.{l}.mlp.out"
                )
            outs.append(orig)
    if not embeds:
        raise WorkbenchError("cannot find the token embedding of the model (model.embed)")
    return embeds, outs


def _hf_layer(model, i: int):
    try:
        return model.original_model.model.layers[i]
    except (AttributeError, IndexError, TypeError):
        return None


def _untie(model) -> None:
    """Give the unembedding its own weight when it is tied to the token embedding."""
    orig = getattr(model, "original_model", None)
    if orig is None or orig.get_output_embeddings() is None:
        return
    out, inp = orig.get_output_embeddings(), orig.get_input_embeddings()
    if out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr():
        out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
        if hasattr(orig.config, "tie_word_embeddings"):
            orig.config.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize(model, direction, inplace: bool = False):
    """A model whose weights cannot write ``direction`` to the residual stream (= :func:`ablation_hooks`).

    Projects the unit ``r`` out of the token (and position) embedding rows, and out of the outputs of every
    attention output projection (``o_proj``) and MLP output projection (``down_proj``), biases included:
    ``W_E <- W_E - (W_E r) r^T``, ``W_out <- W_out - r (r^T W_out)``, ``b <- b - (b . r) r``. A tied
    unembedding is untied first so the logits' read-out is unchanged.

    Args:
        direction: a :class:`Direction` (checked against the model) or ``Float[Tensor, "d_model"]``.
        inplace: edit ``model`` itself instead of a deep copy.

    Returns:
        The edited model (a copy unless ``inplace``), with its fingerprint refreshed.
    """
    r = as_vector(direction, model, normalize=True)
    _writers(model)  # validate before copying or editing anything
    target = model if inplace else copy.deepcopy(model)
    embeds, outs = _writers(target)
    _untie(target)
    for emb in embeds:
        w = emb.weight  # [vocab, d_model]
        rr = r.to(device=w.device, dtype=torch.float32)
        w.copy_((w.float() - (w.float() @ rr)[:, None] * rr[None, :]).to(w.dtype))
    for mod in outs:
        w = mod.weight
        rr = r.to(device=w.device, dtype=torch.float32)
        if type(mod).__name__ == "Conv1D":  # GPT-2 style: weight [d_in, d_out], y = x W + b
            w.copy_((w.float() - (w.float() @ rr)[:, None] * rr[None, :]).to(w.dtype))
        else:  # nn.Linear: weight [d_out, d_in], y = x W^T + b
            w.copy_((w.float() - rr[:, None] * (rr @ w.float())[None, :]).to(w.dtype))
        b = getattr(mod, "bias", None)
        if b is not None:
            b.copy_((b.float() - (b.float() @ rr) * rr).to(b.dtype))
    if hasattr(target, "_wb_fingerprint"):
        del target._wb_fingerprint
    return target

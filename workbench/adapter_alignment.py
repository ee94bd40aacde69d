"""How much of a low-rank adapter's direct write into the residual stream lies along a direction.

A safety tune (:mod:`workbench.organism_smollm2`) changes a few projections of a decoder; a refusal direction
found afterwards (:mod:`workbench.directions`) may or may not be something the adapter writes. Only some adapted
projections write into the residual stream directly:

* ``down_proj`` and ``o_proj``: their update ``dW = scale * B A`` adds ``dW x`` to the residual, so the write map
  is ``dW`` itself (``d_model x in``);
* ``v_proj``: its update changes the values, which reach the residual through ``o_proj``; query head ``h`` reads
  the values of key-value group ``g(h)``, so the write map is ``[W_o[:, h] dW_v[g(h)] for each head h]`` side by
  side (each head's attention mixing taken as the identity);
* ``q_proj``, ``k_proj``, ``gate_proj``, ``up_proj`` change *which* values or neurons are read, and write
  through the unchanged ``W_o`` / ``W_down``: they have no write subspace of their own and are listed as indirect.

For a write map ``M`` and a unit direction ``u`` two numbers are reported, each with its chance level (the
expectation for a uniformly random unit direction in ``d_model`` dimensions):

* ``energy_share = |u^T M|^2 / |M|_F^2``: the share of the update's write energy along ``u`` (chance ``1/d_model``);
* ``subspace_cos = |P u|``, ``P`` the projector on the column space of ``M``: the cosine of ``u`` with the
  subspace the adapter can write at all (chance ``sqrt(rank/d_model)``).

``energy_share / energy_chance`` is how many times more than chance the adapter writes along the direction.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from .errors import WorkbenchError
from .lora import Adapter

#: Adapted projections that write into the residual stream directly (see the module docstring).
DIRECT_TARGETS = ("down_proj", "o_proj", "v_proj")


def _layer_and_target(prefix: str) -> tuple[int, str]:
    parts = prefix.split(".")
    try:
        return int(parts[parts.index("layers") + 1]), parts[-1]
    except (ValueError, IndexError):
        raise WorkbenchError(f"adapter entry {prefix!r} is not 'model.layers.<i>.<module>.<projection>'") from None


def residual_write_maps(adapter: Adapter, base_state: dict[str, Tensor], n_heads: int,
                        n_kv_heads: int | None = None) -> dict[tuple[int, str], Tensor]:
    """``{(layer, projection): Float[Tensor, "d_model k"]}``: the direct write map of every adapted projection
    that has one (:data:`DIRECT_TARGETS`), float32.

    Args:
        adapter: the adapter (:func:`workbench.lora.load_adapter`).
        base_state: the base model's state dict (only the ``o_proj`` weights are read, for ``v_proj``).
        n_heads, n_kv_heads: attention heads and key-value heads of the base (``n_kv_heads`` defaults to
            ``n_heads``, i.e. no grouped-query attention).
    """
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise WorkbenchError(f"{n_heads} attention heads cannot share {n_kv_heads} key-value heads")
    out = {}
    deltas = adapter.deltas()
    for name, delta in deltas.items():
        prefix = name[: -len(".weight")]
        layer, target = _layer_and_target(prefix)
        if target in ("down_proj", "o_proj"):
            out[(layer, target)] = delta.float()
        elif target == "v_proj":
            o_name = f"model.layers.{layer}.self_attn.o_proj.weight"
            if o_name not in base_state:
                raise WorkbenchError(f"the base state has no {o_name}, through which layer {layer}'s v_proj writes")
            w_o = base_state[o_name].float()
            d_o = deltas.get(o_name)
            if d_o is not None:  # an adapted o_proj: the values' change reaches the residual through the tuned one
                w_o = w_o + d_o.float()
            head_dim = w_o.shape[1] // n_heads
            if head_dim * n_heads != w_o.shape[1] or delta.shape[0] != head_dim * n_kv_heads:
                raise WorkbenchError(f"layer {layer}: o_proj {tuple(w_o.shape)} and v_proj delta {tuple(delta.shape)} "
                                     f"do not fit {n_heads} heads sharing {n_kv_heads} key-value heads")
            group = n_heads // n_kv_heads
            blocks = [w_o[:, h * head_dim:(h + 1) * head_dim]
                      @ delta[(h // group) * head_dim:(h // group + 1) * head_dim].float() for h in range(n_heads)]
            out[(layer, target)] = torch.cat(blocks, dim=1)
    return out


def write_alignment(maps: dict[tuple[int, str], Tensor], direction: Tensor) -> pd.DataFrame:
    """One row per write map and one ``"all direct"`` row per layer with several: ``layer, projection, rank,
    energy_share, energy_chance, energy_vs_chance, subspace_cos, subspace_chance, write_norm`` (see the module
    docstring). Computed from each map's Gram matrix ``M M^T`` (``d_model x d_model``, float64)."""
    u = direction.detach().double().flatten()
    if u.norm() == 0 or not torch.isfinite(u).all():
        raise WorkbenchError("the direction is zero or not finite")
    u = u / u.norm()
    d = u.numel()
    grams: dict[int, list[Tensor]] = {}
    rows = []
    for (layer, target), m in sorted(maps.items()):
        if m.shape[0] != d:
            raise WorkbenchError(f"layer {layer} {target} writes {m.shape[0]} dimensions, the direction has {d}")
        g = m.double() @ m.double().T
        grams.setdefault(layer, []).append(g)
        rows.append(_row(layer, target, g, u))
    rows += [_row(layer, "all direct", sum(gs), u) for layer, gs in grams.items() if len(gs) > 1]
    return pd.DataFrame(rows).sort_values(["layer", "projection"], kind="stable").reset_index(drop=True)


def _row(layer: int, target: str, gram: Tensor, u: Tensor, rtol: float = 1e-6) -> dict:
    d = u.numel()
    total = float(gram.trace())
    share = float(u @ gram @ u) / total if total > 0 else 0.0
    eigval, eigvec = torch.linalg.eigh(gram)  # eigenvalues: the map's squared singular values
    basis = eigvec[:, eigval > (rtol ** 2) * float(eigval.max())] if total > 0 else eigvec[:, :0]
    rank = basis.shape[1]
    return {"layer": layer, "projection": target, "rank": rank, "energy_share": share, "energy_chance": 1 / d,
            "energy_vs_chance": share * d, "subspace_cos": float((basis.T @ u).norm()),
            "subspace_chance": (rank / d) ** 0.5, "write_norm": total ** 0.5}


def upstream_summary(table: pd.DataFrame, read_layer: int | None) -> dict:
    """Write energy along the direction summed over the layers whose writes reach its read point (the
    ``resid_pre`` of ``read_layer``, i.e. layers ``< read_layer``; all layers when ``None``), per projection and
    over all of them: ``{projection: {"energy_share", "energy_vs_chance", "layers"}}``."""
    rows = table[table["projection"] != "all direct"]
    if read_layer is not None:
        rows = rows[rows["layer"] < read_layer]
    out = {}
    for name, part in [*rows.groupby("projection"), ("all direct", rows)]:
        energy = (part["write_norm"] ** 2)
        share = float((part["energy_share"] * energy).sum() / energy.sum()) if len(part) and energy.sum() > 0 else 0.0
        chance = float(table["energy_chance"].iloc[0]) if len(table) else float("nan")
        out[str(name)] = {"energy_share": share, "energy_vs_chance": share / chance if len(part) else None,
                          "layers": sorted(int(l) for l in part["layer"].unique())}
    return out


def tuned_model_alignment(model_name: str, direction, show_progress: bool = False) -> dict:
    """The write alignment of a registered tuned model's adapter (:data:`workbench.model_registry.TUNED`) with
    ``direction`` (a :class:`~workbench.directions.artifact.Direction` or a path to one): ``{"table": rows,
    "upstream": upstream_summary, "read_layer", "indirect": adapted projections without a write map}``."""
    import json

    from .directions.artifact import Direction, as_vector
    from .lora import checkpoint_weights, load_adapter
    from .model_registry import TUNED
    from .organism_smollm2.build import base_checkpoint

    spec = TUNED.get(str(model_name).lower())
    if spec is None:
        raise WorkbenchError(f"{model_name!r} is not a tuned model; tuned models: {sorted(TUNED)}")
    if not isinstance(direction, Direction):
        direction = Direction.load(direction)
    adapter = load_adapter(spec.adapter)
    ckpt = base_checkpoint(spec.base, show_progress)
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    maps = residual_write_maps(adapter, checkpoint_weights(ckpt), hf_cfg["num_attention_heads"],
                               hf_cfg.get("num_key_value_heads", hf_cfg["num_attention_heads"]))
    vec = as_vector(direction, layer=direction.layer if direction.vector.ndim > 1 else None, nonzero=True)
    table = write_alignment(maps, vec)
    indirect = sorted({p.split(".")[-1] for p in adapter.prefixes()} - set(DIRECT_TARGETS))
    return {"model": spec.name, "read_layer": direction.layer, "direction_method": direction.method,
            "table": table.round(6).to_dict(orient="records"), "upstream": upstream_summary(table, direction.layer),
            "indirect": indirect}


__all__ = ["DIRECT_TARGETS", "residual_write_maps", "tuned_model_alignment", "upstream_summary", "write_alignment"]

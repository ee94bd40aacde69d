"""Analyses of directions as pandas DataFrames (long format, ready for the plotting code).

* :func:`candidate_cosines` -- cosine similarity between every pair of candidates (layers x positions).
* :func:`cosine_to` -- cosine of every candidate with one reference vector (e.g. the ground truth).
* :func:`projection_by_layer` -- projection of each prompt's ``resid_pre`` on a direction, per layer and
  post-instruction position, for several prompt sets (harmful / benign / jailbreak ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..errors import WorkbenchError
from .candidates import Candidates, activation_entry, layer_of
from .artifact import as_vector


def candidate_cosines(candidates: Candidates) -> pd.DataFrame:
    """Cosine similarity of every pair of candidates.

    Returns:
        Columns ``layer_a``, ``position_a``, ``layer_b``, ``position_b``, ``cos`` (``(L * P)^2`` rows).
    """
    vecs, keys = candidates.flat()
    u = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = (u @ u.T).float()
    n = len(keys)
    rows_a = [k for k in keys for _ in range(n)]
    rows_b = keys * n
    return pd.DataFrame({
        "layer_a": [k[0] for k in rows_a], "position_a": [k[1] for k in rows_a],
        "layer_b": [k[0] for k in rows_b], "position_b": [k[1] for k in rows_b],
        "cos": cos.flatten().tolist(),
    })


def cosine_to(candidates: Candidates, reference) -> pd.DataFrame:
    """Cosine of every candidate with ``reference`` (a :class:`Direction` or ``Float[Tensor, "d_model"]``).

    Returns:
        Columns ``layer``, ``position``, ``cos``.
    """
    r = as_vector(reference).double()
    if r.shape[0] != candidates.d_model:
        raise WorkbenchError(f"reference has d_model={r.shape[0]} but the candidates have d_model={candidates.d_model}")
    vecs, keys = candidates.flat()
    cos = torch.nn.functional.cosine_similarity(vecs, r[None], dim=-1)
    return pd.DataFrame({"layer": [k[0] for k in keys], "position": [k[1] for k in keys], "cos": cos.tolist()})


def projection_by_layer(
    model,
    direction,
    prompt_sets: Mapping[str, Sequence[str] | object],
    store=None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Projection ``x . r_hat`` of each prompt's ``resid_pre`` on ``direction``, per layer and position.

    Args:
        direction: a :class:`Direction` (checked against ``model``) or ``Float[Tensor, "d_model"]``.
        prompt_sets: ``{category: prompts}`` (or ``{category: activation entry}``), e.g. harmful, benign, jailbreak.

    Returns:
        Columns ``category``, ``prompt_index``, ``layer``, ``position``, ``projection``.
    """
    if not prompt_sets:
        raise WorkbenchError("projection_by_layer needs at least one prompt set")
    r = as_vector(direction, model, normalize=True).double()
    frames = []
    for cat, prompts in prompt_sets.items():
        entry = prompts if hasattr(prompts, "iter_shards") else activation_entry(
            model, prompts, store=store, batch_size=batch_size, show_progress=show_progress)
        positions = list(entry.positions)
        for name in entry.hook_names:
            if not name.endswith("hook_resid_pre"):
                continue
            layer = layer_of(name)
            for rows, x in entry.iter_shards(name):
                proj = (x.double() @ r.to(x.device))  # [rows, pos]
                start = rows.start or 0
                idx = torch.arange(start, start + proj.shape[0])
                frames.append(pd.DataFrame({
                    "category": cat,
                    "prompt_index": idx.repeat_interleave(len(positions)).tolist(),
                    "layer": layer,
                    "position": positions * proj.shape[0],
                    "projection": proj.flatten().tolist(),
                }))
    return pd.concat(frames, ignore_index=True)


def projection_summary(projections: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of :func:`projection_by_layer` per category, layer and position."""
    g = projections.groupby(["category", "layer", "position"], sort=True)["projection"]
    return g.agg(["mean", "std", "count"]).reset_index()

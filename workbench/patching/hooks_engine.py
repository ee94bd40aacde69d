"""The ``"hooks"`` patch engine: plain forwards of the bridge on a batch of base prompts, with one hook per
layer that patches the rows of that layer (the TransformerLens recipe, batched).

Slower than the ``"resume"`` engine (:mod:`workbench.patching.engine`), which falls back to it when its
self-check fails; it needs nothing of the model but its hooks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..progress import progress
from .capture import Run, padding_mask
from .rows import Patch, Rows, apply_patch
from .sites import hook_name


@torch.no_grad()
def run_hooks_engine(model, run: Run, patch: Patch, rows: Rows, metric, max_tokens: int, show: bool) -> Tensor:
    """Metric of every patched row, ``Float[Tensor, "row"]`` (on CPU), at most ``max_tokens`` rows x positions
    per forward (arguments as in :func:`workbench.patching.engine.run_rows`)."""
    n_pos = run.n_pos
    per = max(1, max_tokens // n_pos)
    order = torch.argsort(rows.layer, stable=True)
    out = torch.empty(len(rows))
    mask_all = padding_mask(run.attention_mask)
    for c in progress(range(0, len(rows), per), "patch (hooks)", show, total=-(-len(rows) // per)):
        ids = order[c:c + per]
        pairs = rows.pair[ids]
        layers = rows.layer[ids]
        hooks = []
        for layer in torch.unique(layers).tolist():
            sel = torch.nonzero(layers == layer).flatten()

            def fn(act, hook, layer=layer, sel=sel):
                act = act.clone()
                hm = rows.head_mask[ids[sel]] if rows.head_mask is not None else None
                act[sel] = apply_patch(act[sel], patch.source[layer][pairs[sel]], rows.pos_mask[ids[sel]], hm,
                                       patch.read, patch.write)
                return act
            hooks.append((hook_name(patch.component, layer), fn))
        mask = None if mask_all is None else mask_all[pairs]
        with model.hooks(fwd_hooks=hooks):
            logits = model(run.tokens[pairs], attention_mask=mask)
        out[ids.cpu()] = metric(logits[:, -1].float()).detach().float().cpu()
    return out

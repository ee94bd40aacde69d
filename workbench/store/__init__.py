"""The shared activation cache store: content-addressed, streamed to disk, crash-safe, memory-mapped.

Quick start::

    from workbench.store import ActivationStore, get_or_compute
    entry = get_or_compute(model, prompts, hooks="resid_pre", positions="post_instruction")
    x = entry.activations("blocks.3.hook_resid_pre")   # Float[Tensor, "prompt pos d_model"], memory-mapped
    for rows, chunk in entry.iter_shards("blocks.3.hook_resid_pre"):   # streaming, flat RSS
        ...
    ActivationStore().ls()                              # a DataFrame of entries
    ActivationStore().verify(), ActivationStore().gc()  # problems found; debris of interrupted work removed

Entries live under ``root/activations/<key>/`` (root: argument > ``$WORKBENCH_CACHE`` >
``~/.cache/workbench``); see :mod:`workbench.store.core` for the layout and :mod:`workbench.store.compute`
for how they are computed, :mod:`workbench.store.integrity` for the checks every read goes through (a damaged
entry raises :class:`DamagedEntry`; ``get_or_compute`` recomputes it and reports a ``store_recompute`` fallback).
"""

from .capture import Computed
from .compute import entry_key, get_or_compute, resolve_request
from .core import FORMAT_VERSION, ActivationStore, Entry, default_root
from .integrity import DamagedEntry
from .spec import ALIASES, resolve_hooks

__all__ = [
    "ALIASES", "ActivationStore", "Computed", "DamagedEntry", "Entry", "FORMAT_VERSION", "default_root",
    "entry_key", "get_or_compute", "resolve_hooks", "resolve_request",
]

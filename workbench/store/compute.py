"""Computing entries: streamed, resumable, lock-protected, optionally spread over ``torchrun`` ranks.

One forward pass per batch of ``batch_size`` prompts (a *shard*: rows ``[i*bs, (i+1)*bs)``). Forward hooks on
the requested TransformerLens hook points copy only the selected positions (cast to the storage dtype) and the
forward stops as soon as the last requested hook has fired (no unembedding when it is not needed). Each
shard is written in place into its hook's file under ``.work/<key>/`` and logged with its sha256 in a
per-rank progress log; a killed run resumes from the shards whose logged checksum still matches. When every
shard is there, the hook files are moved into the entry and the manifest is replaced atomically.

Under ``torchrun`` (``torch.distributed`` initialised, or ``WORLD_SIZE > 1`` with ``MASTER_ADDR`` set, in which
case a gloo group is initialised), every rank tokenises the same prompts, rank 0 takes the lock and plans,
rank ``r`` computes shards ``r, r + world, ...`` into the shared files, and rank 0 writes the manifest after
every rank reported. Shard boundaries do not depend on the number of ranks, so the result is bit for bit the
single-process entry (given the same batch size and a deterministic forward).

This module is the front door: it resolves a request and its content address (:func:`resolve_request`,
:func:`entry_key`) and serves it (:func:`get_or_compute`). The pieces behind it: :mod:`.request` (the resolved
request), :mod:`.capture` (the capture hooks), :mod:`.workdir` (the work directory's state machine) and
:mod:`.distributed` (the ``torchrun`` protocol).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch

from ..batching import auto_batch_size, check_batch_size
from ..chat import ChatBatch, tokenize_chat
from ..models import resolve_dtype
from ..parallel import dist_context as _dist_context
from ..provenance import runtime_versions
from . import fileio
from .capture import Computed
from .core import FORMAT_VERSION, ActivationStore, Entry
from .distributed import compute_distributed
from .request import Request, model_fingerprint, model_name, normalise_prompts
from ..vocab import resolve_positions
from .spec import check_positions, resolve_hooks
from .workdir import WorkDir, repair, stored


def entry_key(fp: str, batch: ChatBatch, positions, dtype: str) -> str:
    """The content address: sha256 over format version, model fingerprint, runtime versions
    (:func:`workbench.provenance.runtime_versions`: python, torch, transformers, transformer-lens, workbench, as
    activations depend on them), formatted prompts, token ids, attention mask, positions and storage dtype
    (first 24 hex digits)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format_version": FORMAT_VERSION, "fingerprint": fp, "positions": positions,
                         "dtype": dtype, "texts": batch.texts, "versions": runtime_versions()},
                        sort_keys=True).encode())
    h.update(fileio.tensor_buffer(batch.input_ids.to(torch.int64).cpu()))
    h.update(fileio.tensor_buffer(batch.attention_mask.to(torch.int64).cpu()))
    return h.hexdigest()[:24]


def resolve_request(model, prompts, hooks=("resid_pre",), positions="post_instruction", dtype="float32",
                    batch_size: int | str | None = 32, system: str | None = None) -> Request:
    """Validate and resolve a request; raises WorkbenchError before anything is computed or written."""
    raw, meta = normalise_prompts(prompts)
    fixed = check_batch_size(batch_size)
    hook_names = resolve_hooks(model, hooks)
    dt = fileio.dtype_name(resolve_dtype(dtype))
    batch = tokenize_chat(model.tokenizer, raw, system=system)
    batch_size = fixed or auto_batch_size(model, int(batch.input_ids.shape[1]), n_rows=len(raw))
    pos, label = resolve_positions(positions, batch.n_post)
    check_positions(pos, batch.lengths, raw, positions)
    fp = model_fingerprint(model)
    return Request(raw, meta, batch, hook_names, pos, label, dt, batch_size, system, fp, model_name(model),
                   int(model.cfg.n_layers), entry_key(fp, batch, pos, dt), adaptive=fixed is None)


def get_or_compute(
    model,
    prompts: Sequence[str] | Sequence[dict],
    hooks=("resid_pre",),
    positions="post_instruction",
    dtype: str | torch.dtype = "float32",
    store: ActivationStore | str | os.PathLike | None = None,
    batch_size: int | str | None = 32,
    system: str | None = None,
    show_progress: bool = True,
    computed: Computed | None = None,
) -> Entry:
    """Activations of ``prompts`` at ``hooks`` and ``positions``, from the store or computed and stored.

    Args:
        model: a :class:`TransformerBridge` from :func:`workbench.load_model` (tokenizer padding left).
        prompts: raw user prompts (chat-formatted here with the model's template), or dicts with a
            ``"prompt"`` field whose other fields are kept as per-prompt metadata (``entry.meta``), or a
            DataFrame with a ``prompt`` column.
        hooks: TransformerLens names or aliases (``"resid_pre"`` = every layer, ``"resid_pre.3"``,
            ``("resid_pre", [0, 2])``), see :mod:`workbench.store.spec`.
        positions: ``"last"``, ``"post_instruction"``, ``("last_k", k)`` / ``"last_k(k)"``, a list of negative
            offsets, or ``"all"`` (padded on the left to the longest prompt; ``entry.mask`` marks real tokens).
        dtype: storage dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); activations are cast to it.
        store: an :class:`ActivationStore` or a root path; ``None`` -> the default store.
        batch_size: prompts per forward pass and per shard (resuming keeps the batch size of the interrupted run);
            ``"auto"`` or ``None``: sized from free memory (:func:`workbench.batching.auto_batch_size`), and a
            shard whose forward runs out of memory is computed in halves (shard boundaries do not change).
        system: optional system prompt (part of the formatted prompts, hence of the key).
        show_progress: a progress bar over shards (rank 0 only).
        computed: activations of these prompts from a forward the caller runs anyway (:class:`Computed`): missing
            hooks are written from them, through the same capture as a forward's (positions, dtype, zeros at
            padding), instead of from a forward of the store's own, so a caller that needs the forward for
            something else (logits, a KV cache) runs the prompts once. The entry then holds that forward's
            values, which may differ from the store's own forward in the last bits, as with another batch size.

    Returns:
        An :class:`Entry` whose ``hook_names`` are the requested hooks. Hooks already stored for the same
        prompts, positions and dtype are reused; only missing hooks (and, after a crash, missing shards) are
        computed. A hit is checked before it is served (the manifest, its agreement with the request, and, once
        per process, the base files and the requested hooks' headers and shard checksums); a damaged entry is
        recomputed -- the damaged hooks, or the whole entry when its manifest or base files are damaged -- with
        a warning reported as a ``store_recompute`` fallback.

    Raises:
        WorkbenchError: empty prompts, unknown hook, a position outside a prompt, an unwritable store, a
            manifest from a newer format version, ``computed`` taken on other tokens or lacking a requested
            hook -- before anything is written; a full disk while writing (the partial work is removed).
    """
    if store is None:
        store = ActivationStore()
    elif not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    req = resolve_request(model, prompts, hooks, positions, dtype, batch_size, system)
    if computed is not None:
        computed.check(req)
    rank, world, dist = _dist_context()
    if world > 1:
        return compute_distributed(store, model, req, show_progress, rank, world, dist, computed)
    manifest, damage = stored(store, req)
    if manifest is not None and damage is None and not req.missing(manifest):
        return Entry(store, req.key, manifest, req.hook_names, req.meta)
    store.ensure_writable()
    with store.lock(req.key):
        manifest, damage = stored(store, req)  # again: another writer may have computed or repaired it
        if damage is not None:
            manifest = repair(store, req, manifest, damage)
        missing = req.missing(manifest)
        if missing:
            work = WorkDir(store, req, computed)
            try:
                plan = work.prepare(model, missing, entry_exists=manifest is not None)
                work.run(model, plan, rank=0, world=1, show_progress=show_progress)
                work.finalize(missing)
            except OSError as exc:
                if not fileio.disk_full(exc):
                    raise
                raise work.disk_full(missing, exc) from None
            manifest = store.read_manifest(req.key)
    return Entry(store, req.key, manifest, req.hook_names, req.meta)

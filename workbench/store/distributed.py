"""The distributed protocol of :func:`~workbench.store.compute.get_or_compute` under ``torchrun``.

Every rank resolved the same request; the ranks check they agree on the entry key, rank 0 takes the lock and
plans (and broadcasts the plan, or its error), rank ``r`` computes shards ``r, r + world, ...`` into the shared
work files, every rank reports success or its error, and rank 0 finalises the entry (and broadcasts whether that
worked). Every rank returns the same :class:`~workbench.store.core.Entry` or raises the same error.
"""

from __future__ import annotations

import errno
import os

from ..errors import WorkbenchError
from . import fileio
from .capture import Computed
from .core import ActivationStore, Entry
from .request import Request
from .workdir import WorkDir, repair, stored


def _broadcast(dist, obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compute_distributed(store: ActivationStore, model, req: Request, show_progress: bool, rank: int, world: int,
                        dist, computed: Computed | None = None) -> Entry:
    """This rank's part of computing ``req``'s missing hooks, then the entry (the same on every rank); with
    ``computed``, every rank writes its shards from its own copy of them instead of running forwards."""
    keys = [None] * world
    dist.all_gather_object(keys, req.key)
    if len(set(keys)) != 1:
        raise WorkbenchError(
            f"ranks disagree on the entry key ({keys}): they hold different models, prompts, tokenizers or "
            "software versions"
        )
    lock = None
    work = WorkDir(store, req, computed)
    payload: tuple = ("ok", [], [])
    missing: list[str] = []
    if rank == 0:
        try:
            manifest, damage = stored(store, req)
            if damage is not None or req.missing(manifest):
                store.ensure_writable()
                lock = store.lock(req.key)
                manifest, damage = stored(store, req)
                if damage is not None:
                    manifest = repair(store, req, manifest, damage)
                missing = req.missing(manifest)
                plan = work.prepare(model, missing, entry_exists=manifest is not None) if missing else []
                payload = ("ok", missing, plan)
        except Exception as exc:  # noqa: BLE001 - every rank must learn about it
            if lock is not None and fileio.disk_full(exc):
                exc = work.disk_full(missing, exc)
            payload = ("error", f"{exc}", [])
    status, missing, plan = _broadcast(dist, payload, rank)
    try:
        if status == "error":
            raise WorkbenchError(missing)
        if missing:
            err = None
            try:
                work.load()
                work.run(model, plan, rank=rank, world=world, show_progress=show_progress and rank == 0)
            except Exception as exc:  # noqa: BLE001
                err = (f"rank {rank}: {type(exc).__name__}: {exc}", fileio.disk_full(exc))
            gathered = [None] * world
            dist.all_gather_object(gathered, err)
            errors = [e[0] for e in gathered if e]
            final = None
            if rank == 0:
                try:
                    if any(e[1] for e in gathered if e):
                        final = str(work.disk_full(missing, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
                    elif not errors:
                        work.finalize(missing)
                except Exception as exc:  # noqa: BLE001
                    final = str(work.disk_full(missing, exc)) if fileio.disk_full(exc) else \
                        f"rank 0 finalising: {type(exc).__name__}: {exc}"
            final = _broadcast(dist, final, rank)
            if errors or final:
                raise WorkbenchError("computing entry {} failed: {}".format(req.key, "; ".join(errors + [final] if final else errors)))
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    manifest = store.read_manifest(req.key)
    return Entry(store, req.key, manifest, req.hook_names, req.meta)

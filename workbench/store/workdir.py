"""The work directory of a request, ``.work/<key>/``: the state machine that computes an entry crash-safely.

:meth:`WorkDir.prepare` (rank 0, under the entry's lock) creates or reopens the directory: ``work.json`` (the
state: batch size, hooks and their data files), the staged base files of a new entry, and one preallocated
safetensors file per missing hook; it returns the plan, the ``(shard, hooks)`` pairs not yet done.
:meth:`WorkDir.run` (every rank) computes its shards and writes them in place, logging each shard's sha256 to
``progress.r<rank>.jsonl``; :meth:`WorkDir.done` reads those logs back (a killed run resumes from the shards
whose checksum still matches). :meth:`WorkDir.finalize` moves the finished hook files into the entry and writes
the manifest atomically. A full disk anywhere on the way (:meth:`WorkDir.disk_full`) removes the work directory
and is one clear error.

:func:`stored` is what a writer sees of an entry before computing (its manifest and what is damaged in it),
:func:`repair` puts a damaged entry out of the way so that it is recomputed.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..batching import OOMBackoff
from ..errors import WorkbenchError
from ..fallbacks import warn_fallback
from ..models import model_device
from ..progress import progress
from ..provenance import versions
from . import fileio
from .capture import Computed, ShardCapture, StopForward, model_lock, split_forward
from .core import FORMAT_VERSION, ActivationStore, Entry, _entry_debris, _remove_tree, write_manifest_file
from .integrity import DamagedEntry, hook_row_bytes as _row_bytes, size_problem
from .request import Request
from .spec import split_name

log = logging.getLogger("workbench.store")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class WorkDir:
    """The ``.work/<key>/`` directory of one request: staged files, hook data files, progress logs."""

    def __init__(self, store: ActivationStore, req: Request, computed: Computed | None = None):
        self.store, self.req, self.computed = store, req, computed
        self.dir = store.work_path(req.key)
        self.state: dict = {}

    # -- state ----------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            self.state = json.loads((self.dir / "work.json").read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkbenchError(f"the work state {self.dir / 'work.json'} of entry {self.req.key} is unreadable "
                                 f"({exc}); remove it with `workbench cache gc` and compute again") from None

    def _save(self) -> None:
        fileio.atomic_write_json(self.dir / "work.json", self.state)

    @property
    def batch_size(self) -> int:
        return int(self.state["batch_size"])

    def n_shards(self) -> int:
        return -(-self.req.n_prompts // self.batch_size)

    def rows(self, i: int) -> tuple[int, int]:
        return i * self.batch_size, min(self.req.n_prompts, (i + 1) * self.batch_size)

    def hook_file(self, name: str) -> Path:
        return self.dir / self.state["hooks"][name]["file"]

    # -- planning (rank 0, under the lock) --------------------------------------------------------------
    def prepare(self, model, missing: list[str], entry_exists: bool) -> list[tuple[int, list[str]]]:
        """Create or reopen the work directory; return the plan ``[(shard, [hooks to compute]), ...]``."""
        req = self.req
        shapes = self._row_shapes(model, missing)  # may probe the model: fail before touching the disk
        (self.dir / "hooks").mkdir(parents=True, exist_ok=True)
        state = None
        if (self.dir / "work.json").exists():
            try:
                state = json.loads((self.dir / "work.json").read_bytes().decode("utf-8"))
                if not isinstance(state, dict) or state.get("key") != req.key \
                        or state.get("format_version") != FORMAT_VERSION:
                    state = None
            except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: start afresh
                state = None
        if state is None:
            for f in self.dir.glob("progress.*.jsonl"):
                f.unlink()
            state = {"format_version": FORMAT_VERSION, "key": req.key, "batch_size": req.batch_size,
                     "n_prompts": req.n_prompts, "dtype": req.dtype, "positions_label": req.positions_label,
                     "model": {"name": req.model_name, "fingerprint": req.fingerprint},
                     "created": _now(), "hooks": {}}
        elif state["batch_size"] != req.batch_size:
            log.info("resuming %s with the interrupted run's batch size %d", req.key, state["batch_size"])
        self.state = state
        if not entry_exists:
            self._stage_base()
        for name in missing:
            rec = state["hooks"].get(name)
            if rec is not None and size_problem(self.dir / rec["file"], rec) is None \
                    and rec["shape"][1:] == shapes[name]:
                continue
            rec = {"file": f"hooks/{name}.safetensors", "dtype": req.dtype, "shape": [req.n_prompts, *shapes[name]],
                   "epoch": uuid.uuid4().hex[:12], "batch_size": self.batch_size}
            rec["data_offset"], rec["header_sha256"] = fileio.create_tensor_file(
                self.dir / rec["file"], name, req.dtype, rec["shape"],
                {"key": req.key, "hook": name, "positions": json.dumps(req.positions)},
            )
            state["hooks"][name] = rec
        self._save()
        done = self.done(verify=True)
        plan = []
        for i in range(self.n_shards()):
            need = [h for h in missing if (h, i) not in done]
            if need:
                plan.append((i, need))
        n_done = self.n_shards() * len(missing) - sum(len(n) for _, n in plan)
        if n_done:
            log.info("entry %s: resuming, %d of %d hook shards already computed", req.key, n_done,
                     self.n_shards() * len(missing))
        return plan

    def _row_shapes(self, model, names: list[str]) -> dict[str, list[int]]:
        """Per-row shape ``[pos, *rest]`` of each hook (from the config for aliases, else from the computed
        activations or a probe)."""
        cfg = model.cfg
        n_pos = self.req.batch.input_ids.shape[1] if self.req.positions == "all" else len(self.req.positions)
        dims = {"resid_pre": cfg.d_model, "resid_mid": cfg.d_model, "resid_post": cfg.d_model,
                "attn_out": cfg.d_model, "mlp_out": cfg.d_model,
                "mlp_pre": getattr(cfg, "d_mlp", None), "mlp_post": getattr(cfg, "d_mlp", None)}
        out, probe = {}, []
        for n in names:
            alias, _ = split_name(n)
            if alias in dims and dims[alias]:
                out[n] = [n_pos, int(dims[alias])]
            elif self.computed is not None:
                out[n] = self.computed.row_shape(n, n_pos)
            else:
                probe.append(n)
        if probe:
            cap = ShardCapture("all", torch.float32)
            ids, am = self._batch_rows(0, 1, model)
            cap.start(probe, 1, ids.shape[1])
            with model_lock(model), torch.inference_mode(), model.hooks(fwd_hooks=[(n, cap.hook(n)) for n in probe]):
                try:
                    model(ids, attention_mask=am)
                except StopForward:
                    pass
            for n in probe:
                if n not in cap.out:
                    raise WorkbenchError(f"hook {n} did not fire during a forward pass of this model")
                out[n] = [n_pos, *cap.out[n].shape[2:]]
        return out

    def _stage_base(self) -> None:
        """tokens.safetensors and prompts.jsonl of a new entry, in ``.work/<key>/base/``."""
        from safetensors.torch import save

        req, base = self.req, self.dir / "base"
        base.mkdir(parents=True, exist_ok=True)
        tokens = base / "tokens.safetensors"
        # serialised here and written by Python, so that a full disk is an OSError like every other write
        fileio.atomic_write_bytes(tokens, save({"input_ids": req.batch.input_ids.to(torch.int64).contiguous().cpu(),
                                                "attention_mask": req.batch.attention_mask.to(torch.int64).contiguous().cpu()},
                                               metadata={"key": req.key}))
        lengths = req.batch.lengths.tolist()
        lines = []
        for i, (p, t) in enumerate(zip(req.prompts, req.batch.texts)):
            row = {"index": i, "prompt": p, "text": t, "n_tokens": int(lengths[i])}
            if req.meta is not None:
                row.update({k: v for k, v in req.meta[i].items() if k not in row})
            lines.append(json.dumps(row, ensure_ascii=False, default=str))
        fileio.atomic_write_bytes(base / "prompts.jsonl", ("\n".join(lines) + "\n").encode())
        self.state["base"] = {
            "tokens": {"path": "tokens.safetensors", "sha256": fileio.file_sha256(tokens)},
            "prompts": {"path": "prompts.jsonl", "sha256": fileio.file_sha256(base / "prompts.jsonl")},
        }

    def done(self, verify: bool) -> dict[tuple[str, int], dict]:
        """Completed ``(hook, shard)`` records from every rank's progress log (checksums re-checked if ``verify``)."""
        out: dict[tuple[str, int], dict] = {}
        for logf in sorted(self.dir.glob("progress.*.jsonl")):
            with open(logf, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        r = json.loads(line)
                        rec = self.state["hooks"].get(r.get("hook"))
                        if rec is None or r.get("epoch") != rec["epoch"] or tuple(r["rows"]) != self.rows(r["shard"]):
                            continue
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # a line cut (or garbled) by a crash: that shard is computed again
                    out[(r["hook"], r["shard"])] = r
        if verify:
            for (h, i), r in list(out.items()):
                rec = self.state["hooks"][h]
                a, b = r["rows"]
                rb = _row_bytes(rec)
                if fileio.sha256(fileio.read_range(self.hook_file(h), rec["data_offset"] + a * rb, (b - a) * rb)) != r["sha256"]:
                    del out[(h, i)]
        return out

    # -- computing (every rank) -------------------------------------------------------------------------
    def _batch_rows(self, a: int, b: int, model):
        """Token ids and mask of rows ``a..b``, cut to the longest row of the slice (left padding kept)."""
        ids = self.req.batch.input_ids[a:b]
        am = self.req.batch.attention_mask[a:b]
        length = int(am.sum(-1).max())
        device = model_device(model)
        return ids[:, ids.shape[1] - length:].to(device), am[:, am.shape[1] - length:].to(device)

    def run(self, model, plan: list[tuple[int, list[str]]], rank: int, world: int, show_progress: bool) -> None:
        """Compute this rank's share of ``plan`` (shards ``rank, rank + world, ...``), shard by shard."""
        mine = plan[rank::world]
        if not mine:
            return
        names = sorted({h for _, need in mine for h in need})
        recs = {h: self.state["hooks"][h] for h in names}
        cap = ShardCapture(self.req.positions, fileio.DTYPES[self.req.dtype][0])
        backoff = OOMBackoff(self.batch_size) if self.req.adaptive else None
        full_len = self.req.batch.input_ids.shape[1]
        fds = {h: os.open(self.hook_file(h), os.O_RDWR) for h in names}
        logf = open(self.dir / f"progress.r{rank}.jsonl", "a", encoding="utf-8")
        try:
            with model_lock(model), torch.inference_mode(), model.hooks(fwd_hooks=[(h, cap.hook(h)) for h in names]):
                for i, need in progress(mine, desc=f"cache {self.req.key[:8]}", enabled=show_progress):
                    a, b = self.rows(i)
                    ids, am = self._batch_rows(a, b, model)
                    if self.computed is not None:
                        cap.out = self.computed.capture(cap, need, a, b, ids.shape[1])
                    elif backoff is None:
                        cap.start(need, b - a, ids.shape[1])
                        try:
                            model(ids, attention_mask=am)
                        except StopForward:
                            pass
                    else:
                        cap.out = split_forward(model, cap, need, ids, am, backoff)
                    lines = []
                    for h in need:
                        t = cap.out.get(h)
                        if t is None:
                            raise WorkbenchError(f"hook {h} did not fire during the forward pass")
                        if self.req.positions == "all":
                            t[~am.bool().cpu()] = 0  # padding positions hold no activation: store zeros
                        if self.req.positions == "all" and t.shape[1] < full_len:
                            pad = torch.zeros((t.shape[0], full_len, *t.shape[2:]), dtype=t.dtype)
                            pad[:, full_len - t.shape[1]:] = t
                            t = pad
                        rec = recs[h]
                        if list(t.shape[1:]) != rec["shape"][1:]:
                            raise WorkbenchError(f"hook {h}: got rows of shape {list(t.shape[1:])}, expected {rec['shape'][1:]}")
                        buf = fileio.tensor_buffer(t)
                        fileio.pwrite_all(fds[h], buf, rec["data_offset"] + a * _row_bytes(rec))
                        lines.append(json.dumps({"hook": h, "epoch": rec["epoch"], "shard": i, "rows": [a, b],
                                                 "sha256": fileio.sha256(buf)}))
                    cap.out = {}
                    logf.write("\n".join(lines) + "\n")
                    logf.flush()
        finally:
            logf.close()
            for fd in fds.values():
                os.close(fd)

    # -- finalising (rank 0, under the lock) --------------------------------------------------------------
    def finalize(self, names: list[str]) -> None:
        """Move the completed hooks into the entry (creating it atomically if new) and update the manifest."""
        self.load()
        req, store = self.req, self.store
        done = self.done(verify=False)
        hooks = {}
        for h in names:
            rec = self.state["hooks"][h]
            shards = []
            for i in range(self.n_shards()):
                r = done.get((h, i))
                if r is None:
                    raise WorkbenchError(f"entry {req.key}: shard {i} of {h} was not computed")
                shards.append({"index": i, "rows": r["rows"], "sha256": r["sha256"]})
            fileio.fsync_path(self.hook_file(h))
            hooks[h] = {"file": rec["file"], "dtype": rec["dtype"], "shape": rec["shape"],
                        "data_offset": rec["data_offset"], "batch_size": rec.get("batch_size", self.batch_size),
                        "created": _now(), "shards": shards}
            if "header_sha256" in rec:  # absent from work directories of an older workbench
                hooks[h]["header_sha256"] = rec["header_sha256"]
        entry = store.entry_path(req.key)
        manifest = store.read_manifest(req.key)
        if manifest is None:
            base = self.dir / "base"
            (base / "hooks").mkdir(parents=True, exist_ok=True)
            for h in names:
                os.replace(self.hook_file(h), base / hooks[h]["file"])
            manifest = self._new_manifest(hooks)
            write_manifest_file(base / "manifest.json", manifest)
            # a directory without a manifest (debris of an earlier failure), or a damaged entry put aside
            _remove_tree(store, entry, req.key)
            os.rename(base, entry)
            fileio.fsync_path(entry.parent)
        else:
            (entry / "hooks").mkdir(exist_ok=True)
            for h in names:
                os.replace(self.hook_file(h), entry / hooks[h]["file"])
            fileio.fsync_path(entry / "hooks")
            manifest["hooks"].update(hooks)
            manifest["updated"] = _now()
            store.write_manifest(req.key, manifest)
        for h in names:
            self.state["hooks"].pop(h, None)
        if self.state["hooks"]:
            self.state.pop("base", None)
            self._save()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _new_manifest(self, hooks: dict) -> dict:
        req = self.req
        now = _now()
        from .. import __version__

        return {
            "format_version": FORMAT_VERSION,
            "key": req.key,
            "model": {"name": req.model_name, "fingerprint": req.fingerprint, "n_layers": req.n_layers},
            "positions": req.positions,
            "positions_label": req.positions_label,
            "n_post": req.batch.n_post,
            "dtype": req.dtype,
            "n_prompts": req.n_prompts,
            "seq_len": int(req.batch.input_ids.shape[1]),
            "system": req.system,
            "files": self.state["base"],
            "hooks": hooks,
            "created": now,
            "updated": now,
            "workbench_version": __version__,
            "versions": versions(),
        }

    # -- a full disk ------------------------------------------------------------------------------------------
    def disk_full(self, missing: list[str], exc: OSError) -> WorkbenchError:
        """After a full disk (``exc``) while computing ``missing`` (the caller holds the lock): remove this work
        directory and the debris it left in the entry, and return the one error to raise."""
        recs = [self.state.get("hooks", {}).get(h) for h in missing]
        need = sum(r["shape"][0] * _row_bytes(r) for r in recs if r) / 2**20
        _remove_tree(self.store, self.dir, self.req.key)
        entry = self.store.entry_path(self.req.key)
        if entry.is_dir() and (entry / "manifest.json").exists():
            for path, _ in _entry_debris(self.store, entry):
                path.unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(self.store.base).free / 2**20:.1f} MiB are free now"
        except OSError:
            free = "the free space is unknown"
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        size = f"its {len(missing)} hook file(s) need {need:.2f} MiB" if need else f"its {len(missing)} hook file(s)"
        return WorkbenchError(
            f"no space left on device{where} (entry {self.req.key} in the store {str(self.store.root)!r}: {size}, "
            f"{free}); the partial work was removed. Free some space (`workbench cache gc`, `workbench cache rm KEY`) "
            "or point --root / WORKBENCH_CACHE to a larger disk"
        )


def stored(store: ActivationStore, req: Request) -> tuple[dict | None, DamagedEntry | None]:
    """``(manifest, damage)`` of ``req``'s entry: the manifest (``None``: no entry, or an unusable one) and what is
    damaged (``None``: nothing) among the manifest, its agreement with the request, the base files and the
    requested hooks it holds. Files are checked once per process (:mod:`workbench.store.integrity`).

    Raises:
        WorkbenchError: a manifest of a newer format version (never overwritten), an unreadable manifest.
    """
    try:
        manifest = store.read_manifest(req.key)
    except DamagedEntry as exc:
        return None, exc
    if manifest is None:
        return None, None
    path = store.entry_path(req.key)
    problem = req.disagreement(manifest)
    if problem:
        return None, DamagedEntry(req.key, f"its manifest {problem}", path / "manifest.json")
    held = [h for h in req.hook_names if h in manifest["hooks"]]
    damaged: list[DamagedEntry] = []
    try:
        entry = Entry(store, req.key, manifest, [], req.meta)
        entry.check_base_files()
    except DamagedEntry as exc:
        return None, exc
    for h in held:
        try:
            entry.check_hook(h)
        except DamagedEntry as exc:
            damaged.append(exc)
    if not damaged:
        return manifest, None
    return manifest, DamagedEntry(req.key, "; ".join(d.what for d in damaged), damaged[0].file,
                                  hooks=[h for d in damaged for h in d.hooks])


def repair(store: ActivationStore, req: Request, manifest: dict | None, damage: DamagedEntry) -> dict | None:
    """Put ``damage`` out of the way (the caller holds the lock) and return the manifest to compute against: the
    damaged hooks dropped from it (they are computed again and replace their files), or ``None`` after removing
    the whole entry when its manifest or base files are damaged. Logged and reported as a ``store_recompute``
    fallback."""
    whole = manifest is None or damage.hooks is None
    warn_fallback(log, "store_recompute", "entry %s is damaged (%s: %s); recomputing %s", req.key, damage.file,
                  damage.what, "it" if whole else ", ".join(damage.hooks))
    if whole:
        store.discard(req.key)
        return None
    manifest = dict(manifest, hooks={h: r for h, r in manifest["hooks"].items() if h not in damage.hooks})
    return manifest

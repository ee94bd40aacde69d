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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batching import OOMBackoff, auto_batch_size, check_batch_size
from ..chat import ChatBatch, tokenize_chat
from ..errors import WorkbenchError
from ..models import fingerprint, model_device, resolve_dtype
from ..parallel import dist_context as _dist_context
from ..progress import progress
from ..provenance import runtime_versions, versions
from . import fileio
from .core import FORMAT_VERSION, ActivationStore, Entry, _hook_file_problem, _row_bytes
from .spec import canonical_positions, check_positions, resolve_hooks, split_name

log = logging.getLogger("workbench.store")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Request:
    """A fully resolved request (everything that defines the entry, plus how to compute it)."""

    prompts: list[str]
    meta: list[dict] | None
    batch: ChatBatch
    hook_names: list[str]
    positions: list[int] | str
    positions_label: str
    dtype: str
    batch_size: int
    system: str | None
    fingerprint: str
    model_name: str
    n_layers: int
    key: str
    #: ``batch_size="auto"``: the size came from free memory and a shard's forward is split on out-of-memory
    adaptive: bool = False

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)


def _normalise_prompts(prompts) -> tuple[list[str], list[dict] | None]:
    try:
        import pandas as pd

        if isinstance(prompts, pd.DataFrame):
            if "prompt" not in prompts.columns:
                raise WorkbenchError(f"the prompt DataFrame has no 'prompt' column (columns: {list(prompts.columns)})")
            prompts = prompts.to_dict("records")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(prompts, str):
        raise WorkbenchError("prompts must be a list of strings (or of dicts with a 'prompt' field), got a single string")
    if prompts is None or len(prompts) == 0:
        raise WorkbenchError("the prompt list is empty; pass at least one prompt")
    raw, meta = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raw.append(p)
            meta.append({})
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            raw.append(p["prompt"])
            meta.append({k: v for k, v in p.items() if k != "prompt"})
        else:
            raise WorkbenchError(f"prompt {i} is {type(p).__name__} ({p!r:.60}); expected str or a dict with a 'prompt' str")
    return raw, (meta if any(meta) else None)


def _model_name(model) -> str:
    src = getattr(model, "_wb_source", None)
    if src:
        return str(src.get("name"))
    return str(getattr(model.cfg, "model_name", type(model).__name__))


def model_fingerprint(model) -> str:
    """:func:`workbench.models.fingerprint`, recomputed when a parameter or buffer was replaced or edited in place
    since the last call (tracked by data pointer and autograd version counter).

    Edits through ``param.data`` bypass the version counter: call ``fingerprint(model, refresh=True)`` after those.
    """
    orig = getattr(model, "original_model", model)
    sig = tuple((t.data_ptr(), t._version) for t in itertools.chain(orig.parameters(), orig.buffers()))
    seen = getattr(model, "_wb_store_fingerprint", None)
    if seen is not None and seen[0] == sig:
        return seen[1]
    # first use of this model object (possibly a deep copy carrying its original's cached fingerprint) or
    # weights changed: hash the weights again
    fp = fingerprint(model, refresh=True)
    model._wb_store_fingerprint = (sig, fp)
    return fp


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
    raw, meta = _normalise_prompts(prompts)
    fixed = check_batch_size(batch_size)
    hook_names = resolve_hooks(model, hooks)
    dt = fileio.dtype_name(resolve_dtype(dtype))
    batch = tokenize_chat(model.tokenizer, raw, system=system)
    batch_size = fixed or auto_batch_size(model, int(batch.input_ids.shape[1]), n_rows=len(raw))
    pos, label = canonical_positions(positions, batch.n_post)
    check_positions(pos, batch.lengths, raw, positions)
    fp = model_fingerprint(model)
    return Request(raw, meta, batch, hook_names, pos, label, dt, batch_size, system, fp, _model_name(model),
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

    Returns:
        An :class:`Entry` whose ``hook_names`` are the requested hooks. Hooks already stored for the same
        prompts, positions and dtype are reused; only missing hooks (and, after a crash, missing shards) are
        computed.

    Raises:
        WorkbenchError: empty prompts, unknown hook, a position outside a prompt, an unwritable store, a
            manifest from a newer format version -- before anything is written.
    """
    if store is None:
        store = ActivationStore()
    elif not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    req = resolve_request(model, prompts, hooks, positions, dtype, batch_size, system)
    rank, world, dist = _dist_context()
    if world > 1:
        return _compute_distributed(store, model, req, show_progress, rank, world, dist)
    manifest = store.read_manifest(req.key)
    if manifest is not None and not _missing(manifest, req):
        return Entry(store, req.key, manifest, req.hook_names, req.meta)
    store.ensure_writable()
    with store.lock(req.key):
        manifest = store.read_manifest(req.key)
        missing = _missing(manifest, req)
        if missing:
            work = _Work(store, req)
            plan = work.prepare(model, missing, entry_exists=manifest is not None)
            work.run(model, plan, rank=0, world=1, show_progress=show_progress)
            work.finalize(missing)
            manifest = store.read_manifest(req.key)
    return Entry(store, req.key, manifest, req.hook_names, req.meta)


def _missing(manifest: dict | None, req: Request) -> list[str]:
    if manifest is None:
        return list(req.hook_names)
    return [h for h in req.hook_names if h not in manifest["hooks"]]


# ---- distributed ---------------------------------------------------------------------------------------

def _broadcast(dist, obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _compute_distributed(store, model, req: Request, show_progress: bool, rank: int, world: int, dist) -> Entry:
    keys = [None] * world
    dist.all_gather_object(keys, req.key)
    if len(set(keys)) != 1:
        raise WorkbenchError(
            f"ranks disagree on the entry key ({keys}): they hold different models, prompts, tokenizers or "
            "software versions"
        )
    lock = None
    work = _Work(store, req)
    payload: tuple = ("ok", [], [])
    if rank == 0:
        try:
            manifest = store.read_manifest(req.key)
            missing = _missing(manifest, req)
            if missing:
                store.ensure_writable()
                lock = store.lock(req.key)
                manifest = store.read_manifest(req.key)
                missing = _missing(manifest, req)
                plan = work.prepare(model, missing, entry_exists=manifest is not None) if missing else []
                payload = ("ok", missing, plan)
        except Exception as exc:  # noqa: BLE001 - every rank must learn about it
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
                err = f"rank {rank}: {type(exc).__name__}: {exc}"
            errors = [None] * world
            dist.all_gather_object(errors, err)
            errors = [e for e in errors if e]
            final = None
            if rank == 0:
                try:
                    if not errors:
                        work.finalize(missing)
                except Exception as exc:  # noqa: BLE001
                    final = f"rank 0 finalising: {type(exc).__name__}: {exc}"
            final = _broadcast(dist, final, rank)
            if errors or final:
                raise WorkbenchError("computing entry {} failed: {}".format(req.key, "; ".join(errors + [final] if final else errors)))
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    manifest = store.read_manifest(req.key)
    return Entry(store, req.key, manifest, req.hook_names, req.meta)


# ---- the work directory ---------------------------------------------------------------------------------

_MODEL_LOCKS_GUARD = threading.Lock()
_MODEL_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_lock(model) -> threading.RLock:
    """One lock per model object: hooks are global to a model, so two threads must not run it at once.
    (Kept outside the model so that ``copy.deepcopy(model)`` still works.)"""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class _Stop(Exception):
    """Raised from the last needed hook to end the forward pass early."""


class _Capture:
    """Forward hooks that copy the selected positions of the hooks needed for the current batch."""

    def __init__(self, positions: list[int] | str, dtype: torch.dtype):
        self.positions = positions
        self.dtype = dtype
        self.wanted: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}
        self.batch, self.length = 0, 0
        if positions != "all":
            k = -positions[0]
            self.tail = k if positions == list(range(-k, 0)) else None

    def start(self, wanted, batch: int, length: int) -> None:
        self.wanted, self.out, self.batch, self.length = set(wanted), {}, batch, length

    def hook(self, name: str):
        def fn(t, hook=None):
            if name not in self.wanted or name in self.out:
                return None
            if isinstance(t, tuple):
                t = t[0]
            if t.dim() < 2 or t.shape[0] != self.batch or t.shape[1] != self.length:
                raise WorkbenchError(
                    f"hook {name} gives a tensor of shape {tuple(t.shape)}; the store keeps activations with the "
                    f"batch at dim 0 and positions at dim 1 (expected ({self.batch}, {self.length}, ...))"
                )
            if self.positions == "all":
                v = t
            elif self.tail is not None:
                v = t[:, t.shape[1] - self.tail:]
            else:
                v = t[:, [t.shape[1] + p for p in self.positions]]
            self.out[name] = v.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
            if len(self.out) == len(self.wanted):
                raise _Stop
            return None

        return fn


def _split_forward(model, cap: _Capture, need, ids, am, backoff: OOMBackoff) -> dict[str, torch.Tensor]:
    """One shard's captures, computed in row chunks that :class:`OOMBackoff` halves on out-of-memory."""

    def part(rows: range) -> dict[str, torch.Tensor]:
        cap.start(need, len(rows), ids.shape[1])
        try:
            model(ids[rows.start:rows.stop], attention_mask=am[rows.start:rows.stop])
        except _Stop:
            pass
        out, cap.out = cap.out, {}
        return out

    parts = backoff.map(part, range(ids.shape[0]))
    return {h: torch.cat([p[h] for p in parts]) for h in parts[0] if all(h in p for p in parts)}


class _Work:
    """The ``.work/<key>/`` directory of one request: staged files, hook data files, progress logs."""

    def __init__(self, store: ActivationStore, req: Request):
        self.store, self.req = store, req
        self.dir = store.work_path(req.key)
        self.state: dict = {}

    # -- state ----------------------------------------------------------------------------------------
    def load(self) -> None:
        self.state = json.loads((self.dir / "work.json").read_text())

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
                state = json.loads((self.dir / "work.json").read_text())
                if state.get("key") != req.key or state.get("format_version") != FORMAT_VERSION:
                    state = None
            except (OSError, json.JSONDecodeError):
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
            if rec is not None and _hook_file_problem(self.dir / rec["file"], rec) is None \
                    and rec["shape"][1:] == shapes[name]:
                continue
            rec = {"file": f"hooks/{name}.safetensors", "dtype": req.dtype, "shape": [req.n_prompts, *shapes[name]],
                   "epoch": uuid.uuid4().hex[:12], "batch_size": self.batch_size}
            rec["data_offset"] = fileio.create_tensor_file(
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
        """Per-row shape ``[pos, *rest]`` of each hook (from the config for aliases, else from a probe)."""
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
            else:
                probe.append(n)
        if probe:
            cap = _Capture("all", torch.float32)
            ids, am = self._batch_rows(0, 1, model)
            cap.start(probe, 1, ids.shape[1])
            with _model_lock(model), torch.inference_mode(), model.hooks(fwd_hooks=[(n, cap.hook(n)) for n in probe]):
                try:
                    model(ids, attention_mask=am)
                except _Stop:
                    pass
            for n in probe:
                if n not in cap.out:
                    raise WorkbenchError(f"hook {n} did not fire during a forward pass of this model")
                out[n] = [n_pos, *cap.out[n].shape[2:]]
        return out

    def _stage_base(self) -> None:
        """tokens.safetensors and prompts.jsonl of a new entry, in ``.work/<key>/base/``."""
        from safetensors.torch import save_file

        req, base = self.req, self.dir / "base"
        base.mkdir(parents=True, exist_ok=True)
        tokens = base / "tokens.safetensors"
        save_file({"input_ids": req.batch.input_ids.to(torch.int64).contiguous().cpu(),
                   "attention_mask": req.batch.attention_mask.to(torch.int64).contiguous().cpu()},
                  str(tokens), metadata={"key": req.key})
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
            with open(logf, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    rec = self.state["hooks"].get(r.get("hook"))
                    if rec is None or r.get("epoch") != rec["epoch"] or tuple(r["rows"]) != self.rows(r["shard"]):
                        continue
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
        cap = _Capture(self.req.positions, fileio.DTYPES[self.req.dtype][0])
        backoff = OOMBackoff(self.batch_size) if self.req.adaptive else None
        full_len = self.req.batch.input_ids.shape[1]
        fds = {h: os.open(self.hook_file(h), os.O_RDWR) for h in names}
        logf = open(self.dir / f"progress.r{rank}.jsonl", "a", encoding="utf-8")
        try:
            with _model_lock(model), torch.inference_mode(), model.hooks(fwd_hooks=[(h, cap.hook(h)) for h in names]):
                for i, need in progress(mine, desc=f"cache {self.req.key[:8]}", enabled=show_progress):
                    a, b = self.rows(i)
                    ids, am = self._batch_rows(a, b, model)
                    if backoff is None:
                        cap.start(need, b - a, ids.shape[1])
                        try:
                            model(ids, attention_mask=am)
                        except _Stop:
                            pass
                    else:
                        cap.out = _split_forward(model, cap, need, ids, am, backoff)
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
        entry = store.entry_path(req.key)
        manifest = store.read_manifest(req.key)
        if manifest is None:
            base = self.dir / "base"
            (base / "hooks").mkdir(parents=True, exist_ok=True)
            for h in names:
                os.replace(self.hook_file(h), base / hooks[h]["file"])
            manifest = self._new_manifest(hooks)
            fileio.atomic_write_json(base / "manifest.json", manifest)
            if entry.exists():  # a directory without a manifest: debris of an earlier failure
                trash = store.base / ".trash" / f"{req.key}-{uuid.uuid4().hex[:8]}"
                os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
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

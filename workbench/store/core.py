"""The store on disk (:class:`ActivationStore`) and one entry of it (:class:`Entry`).

Layout under ``root`` (argument > ``$WORKBENCH_CACHE`` > ``~/.cache/workbench``)::

    activations/<key>/manifest.json         format_version, model fingerprint and name, positions, dtype,
                                            n_prompts, per-hook shard lists with sha256 (and the sha256 of
                                            the hook file's header), created/updated, versions (python,
                                            torch, transformers, transformer-lens, workbench, git commit),
                                            manifest_sha256 (its own checksum); the last three are absent
                                            from older manifests
    activations/<key>/tokens.safetensors    input_ids, attention_mask  Int[Tensor, "prompt pos"] (left-padded)
    activations/<key>/prompts.jsonl         one row per prompt: index, prompt, text (formatted), n_tokens, metadata
    activations/<key>/hooks/<hook>.safetensors   one tensor [prompt, pos, *rest] per hook, written shard by shard
    activations/.work/<key>/                in-progress work (crash-resumable), moved into place when complete
    activations/.locks/<key>.lock           one writer per key (filelock)
    activations/.trash/                     entries being removed (renamed here first, then deleted)

An entry is keyed by (format version, model fingerprint, runtime versions of python, torch, transformers,
transformer-lens and workbench, exact formatted prompts and token ids, positions, storage dtype), so an upgrade
computes fresh entries; hooks are per-hook sub-entries inside it, so a request for more hooks of the same
prompts only computes the hooks that are missing. Readers never take the lock: manifests are replaced atomically, hook files
are moved in before the manifest names them.

Every read is checked (:mod:`workbench.store.integrity`): the manifest against its own checksum and schema on
every read, each file against the manifest's checksums the first time this process reads it. A damaged entry
raises :class:`~workbench.store.integrity.DamagedEntry`; ``get_or_compute`` recomputes it instead (a warning,
reported as a ``store_recompute`` fallback). :meth:`ActivationStore.gc` removes the debris of interrupted work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock, Timeout

from ..errors import WorkbenchError
from ..progress import progress
from . import fileio, integrity
from .integrity import DamagedEntry
from .spec import ALIASES, alias_names, resolve_hooks_from_names, split_name
from ..vocab import is_int

log = logging.getLogger("workbench.store")

#: Version of the on-disk format. Entries written by a newer version are refused, never overwritten.
FORMAT_VERSION = 1
_SUBDIR = "activations"


def default_root() -> Path:
    """``$WORKBENCH_CACHE`` or ``~/.cache/workbench``."""
    env = os.environ.get("WORKBENCH_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/workbench").expanduser()


class ActivationStore:
    """A directory of activation entries (see the module docstring for the layout).

    Args:
        root: the cache directory; ``None`` -> ``$WORKBENCH_CACHE`` -> ``~/.cache/workbench``.
        lock_timeout: seconds to wait for another writer of the same entry (``-1``: wait for ever).
    """

    def __init__(self, root: str | os.PathLike | None = None, lock_timeout: float = -1):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"ActivationStore(root={str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def base(self) -> Path:
        return self.root / _SUBDIR

    def entry_path(self, key: str) -> Path:
        return self.base / key

    def work_path(self, key: str) -> Path:
        return self.base / ".work" / key

    def _lock(self, key: str) -> FileLock:
        return FileLock(str(self.base / ".locks" / f"{key}.lock"), timeout=self.lock_timeout)

    def lock(self, key: str):
        """Context manager holding the writer lock of ``key`` (raises WorkbenchError on timeout)."""
        lock = self._lock(key)
        try:
            lock.acquire()
        except Timeout:
            raise WorkbenchError(
                f"entry {key} is locked by another writer (waited {self.lock_timeout} s on {lock.lock_file})"
            ) from None
        return _Held(lock)

    def ensure_writable(self) -> None:
        """Create the store directories and check a file can be written there, or raise WorkbenchError."""
        try:
            for d in (self.base, self.base / ".work", self.base / ".locks", self.base / ".trash"):
                d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.base / ".work", prefix=".probe-"):
                pass
        except OSError as exc:
            raise WorkbenchError(
                f"the activation store {str(self.root)!r} is not writable ({type(exc).__name__}: {exc.strerror or exc}); "
                "pass another root, or set WORKBENCH_CACHE to a writable directory"
            ) from None

    # ---- manifests ---------------------------------------------------------------------------------
    def read_manifest(self, key: str) -> dict | None:
        """The manifest of ``key``, ``None`` if there is no such entry.

        Raises:
            WorkbenchError: an unreadable manifest, or one written by a newer format version.
        """
        path = self.entry_path(key) / "manifest.json"
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise WorkbenchError(f"the manifest of entry {key} ({path}) is unreadable ({exc.strerror or exc})") from None
        manifest = integrity.parse_manifest(raw, key, path)
        check_format(manifest, path, key)
        integrity.check_manifest(manifest, key, path)
        return manifest

    def write_manifest(self, key: str, manifest: dict) -> None:
        """Replace the manifest of ``key`` atomically, with its checksum."""
        write_manifest_file(self.entry_path(key) / "manifest.json", manifest)

    def entry_dirs(self) -> list[Path]:
        """Every entry directory (complete or damaged), sorted by key."""
        if not self.base.is_dir():
            return []
        return sorted(p for p in self.base.iterdir() if not p.name.startswith(".") and p.is_dir())

    def _require_store(self, what: str) -> None:
        if not self.base.is_dir():
            raise WorkbenchError(
                f"there is no activation store at {str(self.root)!r} (no {_SUBDIR}/ directory): nothing to {what}; "
                "check --root or WORKBENCH_CACHE"
            )

    def keys(self) -> list[str]:
        """Keys of the complete entries (directories with a manifest)."""
        if not self.base.is_dir():
            return []
        return sorted(p.name for p in self.base.iterdir() if not p.name.startswith(".") and (p / "manifest.json").exists())

    def resolve_key(self, key: str) -> str:
        """A full key from a key or a unique prefix of one."""
        keys = self.keys()
        if key in keys:
            return key
        hits = [k for k in keys if k.startswith(key)] if key else []
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise WorkbenchError(f"no entry {key!r} in the store {str(self.root)!r}; list them with `workbench cache ls`")
        raise WorkbenchError(f"key prefix {key!r} is ambiguous: it matches {hits}")

    def open(self, key: str, hooks=None) -> "Entry":
        """Open an existing entry (all its hooks, or the named ones)."""
        key = self.resolve_key(key)
        manifest = self.read_manifest(key)
        names = None if hooks is None else resolve_hooks_from_names(list(manifest["hooks"]), hooks, key,
                                                                    manifest["model"].get("n_layers"))
        return Entry(self, key, manifest, names)

    # ---- listing, removal, verification ------------------------------------------------------------
    def ls(self) -> pd.DataFrame:
        """One row per entry (and per unfinished work directory), newest first.

        Columns: key, model, fingerprint, n_prompts, positions, dtype, n_hooks, hooks (summary), size_mb,
        created, updated, status (``ok``, ``partial`` for unfinished work, or what is wrong), path.
        """
        cols = ["key", "model", "fingerprint", "n_prompts", "positions", "dtype", "n_hooks", "hooks", "size_mb",
                "created", "updated", "status", "path"]
        rows = []
        if self.base.is_dir():
            for p in self.entry_dirs():
                rows.append(self._ls_row(p, p.name))
            work = self.base / ".work"
            if work.is_dir():
                for p in sorted(work.iterdir()):
                    if p.is_dir():
                        rows.append(self._ls_work_row(p))
        df = pd.DataFrame(rows, columns=cols)
        return df.sort_values("created", ascending=False, ignore_index=True) if len(df) else df

    def _ls_row(self, path: Path, key: str) -> dict:
        row = {"key": key, "path": str(path), "size_mb": round(_dir_size(path) / 2**20, 3)}
        try:
            m = self.read_manifest(key)
            if m is None:
                return {**row, "status": "no manifest"}
        except WorkbenchError as exc:
            return {**row, "status": str(exc)}
        return {
            **row, "model": m["model"].get("name"), "fingerprint": m["model"].get("fingerprint"),
            "n_prompts": m["n_prompts"], "positions": m.get("positions_label", str(m["positions"])),
            "dtype": m["dtype"], "n_hooks": len(m["hooks"]), "hooks": summarise_hooks(list(m["hooks"])),
            "created": m.get("created"), "updated": m.get("updated"),
            "status": "ok" if integrity.CHECKSUM_FIELD in m else "ok (no manifest checksum)",
        }

    def _ls_work_row(self, path: Path) -> dict:
        row = {"key": path.name, "path": str(path), "size_mb": round(_dir_size(path) / 2**20, 3), "status": "partial"}
        try:
            st = json.loads((path / "work.json").read_text())
            row.update(n_prompts=st.get("n_prompts"), dtype=st.get("dtype"), n_hooks=len(st.get("hooks", {})),
                       hooks=summarise_hooks(list(st.get("hooks", {}))), created=st.get("created"),
                       model=st.get("model", {}).get("name"), fingerprint=st.get("model", {}).get("fingerprint"),
                       positions=st.get("positions_label"))
        except (OSError, ValueError, AttributeError, TypeError):  # unreadable, not UTF-8 / JSON, not an object
            pass
        return row

    def rm(self, key: str) -> None:
        """Remove an entry (and any unfinished work for it), under its writer lock.

        The entry directory is first renamed out of the way, so a reader never sees half an entry.
        """
        try:
            key = self.resolve_key(key)
        except WorkbenchError:
            if not self.work_path(key).is_dir():
                raise
        self.ensure_writable()
        with self.lock(key):
            self.discard(key, work=True)

    def discard(self, key: str, work: bool = False) -> None:
        """Remove the entry directory of ``key`` (and its work directory if ``work``); the caller holds the lock.
        Each directory is renamed into ``.trash`` first, so a reader never sees half of it."""
        for src in (self.entry_path(key), self.work_path(key)) if work else (self.entry_path(key),):
            _remove_tree(self, src, key)

    def verify(self, key: str | None = None, show_progress: bool = False) -> pd.DataFrame:
        """Check one entry (or all): the manifest (checksum, schema), the base files' checksums, every hook
        file's size, safetensors header and shard checksums. Returns the problems (empty if all good).

        Columns: key, hook, shard, rows, file, problem.

        Raises:
            WorkbenchError: there is no store at :attr:`root` (verifying nothing is not a success).
        """
        self._require_store("verify")
        keys = [self.resolve_key(key)] if key is not None else [p.name for p in self.entry_dirs()]
        bad: list[dict] = []
        for k in progress(keys, desc="verify", enabled=show_progress):
            bad += _verify_entry(self, k)
        return pd.DataFrame(bad, columns=["key", "hook", "shard", "rows", "file", "problem"])

    def unsealed(self) -> list[str]:
        """Keys of readable entries whose manifest predates manifest checksums (accepted, with a warning)."""
        out = []
        for p in self.entry_dirs():
            try:
                m = integrity.parse_manifest((p / "manifest.json").read_bytes(), p.name, p / "manifest.json")
            except (OSError, WorkbenchError):
                continue
            if integrity.CHECKSUM_FIELD not in m:
                out.append(p.name)
        return out

    def gc(self, dry_run: bool = False, probe_age: float = 60.0) -> pd.DataFrame:
        """Remove the debris of interrupted work, never what a live writer holds.

        Removed: unfinished work directories ``.work/<key>/`` (an interrupted computation: rerunning it would
        have resumed from them), leftovers in ``.trash/``, entry directories without a manifest, half-written
        ``.<name>.<pid>.tmp`` files and hook files the manifest does not name inside entries, and ``.probe-*``
        files older than ``probe_age`` seconds. Everything of a key is only touched while holding its writer
        lock, taken without waiting: a key whose lock is held (another process is writing it) is skipped.
        Damaged entries are not removed (see :meth:`verify`, :meth:`rm`).

        Returns:
            One row per item: path, kind (work, trash, no_manifest, tmp, orphan, probe), size_mb, action
            (``removed``, ``would remove`` with ``dry_run``, or ``skipped: ...``).
        """
        self._require_store("clean")
        if not dry_run:
            self.ensure_writable()
        rows: list[dict] = []

        def take(path: Path, kind: str, key: str | None = None) -> None:
            size = round(_dir_size(path) / 2**20, 3) if path.is_dir() else round(_file_size(path) / 2**20, 3)
            if not dry_run:
                if kind == "trash":  # already out of the way (maybe being deleted by the rm that put it there)
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                elif path.is_dir():
                    _remove_tree(self, path, key or path.name)
                else:
                    path.unlink(missing_ok=True)
            rows.append({"path": str(path), "kind": kind, "size_mb": size,
                         "action": "would remove" if dry_run else "removed"})

        def skip(path: Path, kind: str) -> None:
            rows.append({"path": str(path), "kind": kind, "size_mb": None,
                         "action": "skipped: another process holds its writer lock"})

        trash = self.base / ".trash"
        for p in sorted(trash.iterdir()) if trash.is_dir() else []:
            take(p, "trash")
        work = self.base / ".work"
        for p in sorted(work.iterdir()) if work.is_dir() else []:
            if p.is_dir():
                with self._try_lock(p.name, dry_run) as held:
                    take(p, "work") if held else skip(p, "work")
            elif p.name.startswith(".probe-") and time.time() - _mtime(p) > probe_age:
                take(p, "probe")
        for p in self.entry_dirs():
            if not _entry_debris(self, p):
                continue
            with self._try_lock(p.name, dry_run) as held:
                if not held:
                    skip(p, "entry")
                    continue
                for path, kind in _entry_debris(self, p):  # again, under the lock
                    take(path, kind, p.name)
        return pd.DataFrame(rows, columns=["path", "kind", "size_mb", "action"])

    @contextmanager
    def _try_lock(self, key: str, dry_run: bool = False):
        """``with store._try_lock(key) as held``: the writer lock of ``key`` if free now (no waiting).
        In a dry run, whether it is free (taken and released at once)."""
        lock = FileLock(str(self.base / ".locks" / f"{key}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            yield False
            return
        except OSError:  # a read-only store (dry run): nobody can be writing it
            yield True
            return
        try:
            yield True
        finally:
            lock.release()

    def get_or_compute(self, model, prompts, **kwargs) -> "Entry":
        """:func:`workbench.store.get_or_compute` with ``store=self``."""
        from .compute import get_or_compute

        return get_or_compute(model, prompts, store=self, **kwargs)


class _Held:
    def __init__(self, lock: FileLock):
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._lock.release()


def write_manifest_file(path: Path, manifest: dict) -> None:
    """Write a manifest atomically, with its checksum (:func:`workbench.store.integrity.seal`)."""
    fileio.atomic_write_json(path, integrity.seal(manifest))


def check_format(manifest: dict, path, key: str) -> None:
    version = manifest.get("format_version")
    if not is_int(version):
        raise DamagedEntry(key, "its manifest has no integer format_version (not a workbench store manifest)", path)
    if version > FORMAT_VERSION:
        raise WorkbenchError(
            f"{path} was written by a newer workbench (store format {version}; this one reads up to "
            f"{FORMAT_VERSION}); upgrade workbench or use another cache root -- the entry was left untouched"
        )


_TMP_RE = re.compile(r"^\..+\.\d+\.tmp$")  # fileio.atomic_write_bytes: .<name>.<pid>.tmp


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _remove_tree(store: ActivationStore, src: Path, key: str) -> None:
    """Rename ``src`` into ``.trash`` (atomic: readers see all of it or nothing), then delete it."""
    if not src.exists():
        return
    (store.base / ".trash").mkdir(parents=True, exist_ok=True)
    trash = store.base / ".trash" / f"{key}-{uuid.uuid4().hex[:8]}"
    os.rename(src, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _entry_debris(store: ActivationStore, path: Path) -> list[tuple[Path, str]]:
    """``[(path, kind)]`` of the debris inside an entry directory: the whole directory when it has no
    manifest, else half-written temporaries and hook files its (readable) manifest does not name."""
    if not (path / "manifest.json").exists():
        return [(path, "no_manifest")]
    out = [(p, "tmp") for p in sorted(path.rglob(".*.tmp")) if p.is_file() and _TMP_RE.match(p.name)]
    try:
        m = store.read_manifest(path.name)
    except WorkbenchError:
        return out  # a damaged entry: leave its files alone
    named = {(path / rec["file"]).resolve() for rec in m["hooks"].values()}
    hooks = path / "hooks"
    for p in sorted(hooks.iterdir()) if hooks.is_dir() else []:
        if p.is_file() and not _TMP_RE.match(p.name) and p.resolve() not in named:
            out.append((p, "orphan"))
    return out


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def summarise_hooks(names: list[str]) -> str:
    """``["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]`` -> ``"resid_pre[0-1]"``."""
    groups: dict[str, list[int]] = {}
    other = []
    for n in names:
        alias, layer = split_name(n)
        if alias is None:
            other.append(n)
        else:
            groups.setdefault(alias, []).append(layer)
    parts = []
    for alias in ALIASES:
        if alias in groups:
            layers = sorted(groups[alias])
            if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
                parts.append(f"{alias}[{layers[0]}-{layers[-1]}]")
            else:
                parts.append(f"{alias}[{','.join(map(str, layers))}]")
    return ", ".join(parts + other)


def _verify_entry(store: ActivationStore, key: str) -> list[dict]:
    root = store.entry_path(key)
    bad = []

    def add(hook, shard, rows, file, problem):
        bad.append({"key": key, "hook": hook, "shard": shard, "rows": rows, "file": file, "problem": problem})

    try:
        m = store.read_manifest(key)
    except WorkbenchError as exc:
        add(None, None, None, str(root / "manifest.json"), str(exc))
        return bad
    if m is None:
        add(None, None, None, str(root / "manifest.json"), "missing manifest")
        return bad
    for name in ("tokens", "prompts"):
        rec = m["files"][name]
        path = root / rec["path"]
        if not path.exists():
            add(None, None, None, str(path), f"missing {name} file")
        elif fileio.file_sha256(path) != rec["sha256"]:
            add(None, None, None, str(path), f"{name} file checksum mismatch")
    for hook, rec in m["hooks"].items():
        path = root / rec["file"]
        problem = integrity.size_problem(path, rec) or integrity.header_problem(path, rec, hook, key)
        if problem:
            add(hook, None, None, str(path), problem)
            continue
        for shard, got in integrity.hash_shards(path, rec):
            if got != shard["sha256"]:
                add(hook, shard.get("index"), shard["rows"], str(path),
                    f"checksum mismatch (expected {shard['sha256'][:12]}..., got {got[:12]}...)")
    return bad


class Entry:
    """A stored set of activations of some prompts at some positions, for some hooks.

    Reading never loads a whole hook unless asked: :meth:`activations` is a memory map (numpy ``memmap``,
    copy-on-write, paged in lazily by the OS, so an entry bigger than RAM is usable), :meth:`iter_shards`
    reads one shard at a time into fresh memory (flat RSS for streaming reductions).

    Attributes:
        key: the content address (also the directory name).
        path: the entry directory.
        manifest: the parsed ``manifest.json``.
        hook_names: the hooks of the request that returned this entry (resolved full names, forward order);
            :attr:`available_hooks` lists every hook stored in the entry.
        positions: ``[-k, ..., -1]`` offsets from the end of each (left-padded) row, or ``"all"``.
        n_prompts: number of prompts (rows).
        dtype: storage dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
    """

    def __init__(self, store: ActivationStore, key: str, manifest: dict, hook_names: list[str] | None = None,
                 meta: list[dict] | None = None):
        self.store = store
        self.key = key
        self.path = store.entry_path(key)
        self.manifest = manifest
        self.hook_names = list(hook_names) if hook_names is not None else self.available_hooks
        self._meta = meta
        self._tokens: dict[str, torch.Tensor] | None = None
        for name in self.hook_names:
            self._record(name)  # cheap existence/size checks, clear error if damaged

    def __len__(self) -> int:
        return self.n_prompts

    def __repr__(self) -> str:
        return (f"Entry(key={self.key!r}, n_prompts={self.n_prompts}, positions={self.manifest.get('positions_label')!r}, "
                f"dtype={self.dtype!r}, hooks={summarise_hooks(self.hook_names)!r})")

    # ---- description ------------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return int(self.manifest["n_prompts"])

    @property
    def positions(self) -> list[int] | str:
        return self.manifest["positions"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def available_hooks(self) -> list[str]:
        from .spec import sort_names

        return sort_names(list(self.manifest["hooks"]))

    def shape(self, hook_name: str) -> tuple[int, ...]:
        """``(prompt, pos, *rest)`` of a hook."""
        return tuple(self._record(hook_name)[1]["shape"])

    def layers(self, alias: str) -> list[int]:
        """Layers of ``alias`` among :attr:`hook_names` (or among all stored hooks if none were requested)."""
        return [layer for layer, _ in self._alias_hooks(alias)]

    # ---- tokens and prompts ---------------------------------------------------------------------------
    def _base_file(self, name: str) -> Path:
        """Path of the ``tokens`` or ``prompts`` file, checked against its checksum (once per process)."""
        rec = self.manifest["files"][name]
        path = self.path / rec["path"]
        integrity.check_base_file(self.key, name, path, rec)
        return path

    def check_base_files(self) -> None:
        """Check ``tokens.safetensors`` and ``prompts.jsonl`` (once per process); DamagedEntry if damaged."""
        for name in ("tokens", "prompts"):
            self._base_file(name)

    def _load_tokens(self) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            from safetensors.torch import load_file

            path = self._base_file("tokens")
            try:
                tokens = load_file(str(path))
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise DamagedEntry(self.key, f"its tokens file is not readable safetensors ({exc})", path) from None
            shapes = {k: tuple(v.shape) for k, v in tokens.items()}
            if set(shapes) != {"input_ids", "attention_mask"} or shapes["input_ids"] != shapes["attention_mask"] \
                    or shapes["input_ids"][0] != self.n_prompts:
                raise DamagedEntry(self.key, f"its tokens file holds {shapes}; expected input_ids and attention_mask "
                                             f"of {self.n_prompts} rows", path)
            self._tokens = tokens
        return self._tokens

    @property
    def input_ids(self) -> torch.Tensor:
        """``Int[Tensor, "prompt pos"]``, left-padded to the longest prompt."""
        return self._load_tokens()["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        """``Int[Tensor, "prompt pos"]``, 0 on left padding."""
        return self._load_tokens()["attention_mask"]

    @property
    def mask(self) -> torch.Tensor | None:
        """``Bool[Tensor, "prompt pos"]`` (True on real tokens) when positions are ``"all"``; ``None`` otherwise."""
        return self.attention_mask.bool() if self.positions == "all" else None

    def _rows(self) -> list[dict]:
        path = self._base_file("prompts")
        try:
            rows = [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
        except ValueError as exc:  # not UTF-8, or a line that is not JSON
            raise DamagedEntry(self.key, f"its prompts file is not UTF-8 JSON lines ({exc})", path) from None
        fields = {"index", "prompt", "text", "n_tokens"}
        if len(rows) != self.n_prompts or not all(isinstance(r, dict) and fields <= set(r) for r in rows):
            raise DamagedEntry(self.key, f"its prompts file has {len(rows)} rows; expected {self.n_prompts} objects "
                                         "with index, prompt, text and n_tokens", path)
        return rows

    @property
    def prompts(self) -> list[str]:
        """The raw prompts (before chat formatting)."""
        return [r["prompt"] for r in self._rows()]

    @property
    def texts(self) -> list[str]:
        """The chat-formatted prompts the model saw."""
        return [r["text"] for r in self._rows()]

    @property
    def meta(self) -> pd.DataFrame:
        """Per-prompt metadata, one row per prompt: index, prompt, n_tokens and any fields passed with the
        prompts (the metadata of this request when it passed some, else the stored metadata)."""
        rows = self._rows()
        if self._meta is not None:
            rows = [{"index": r["index"], "prompt": r["prompt"], "n_tokens": r["n_tokens"],
                     **{k: v for k, v in m.items() if k != "prompt"}} for r, m in zip(rows, self._meta)]
        else:
            rows = [{k: v for k, v in r.items() if k != "text"} for r in rows]
        return pd.DataFrame(rows)

    # ---- activations ------------------------------------------------------------------------------
    def _record(self, hook_name: str) -> tuple[str, dict]:
        name = hook_name
        if name not in self.manifest["hooks"]:
            resolved = resolve_hooks_from_names(list(self.manifest["hooks"]), hook_name, self.key,
                                                self.manifest["model"].get("n_layers"))
            if len(resolved) != 1:
                raise WorkbenchError(
                    f"{hook_name!r} names {len(resolved)} hooks of entry {self.key}; use entry.stacked({hook_name!r}) "
                    "for an alias over layers, or one name such as 'resid_pre.3'"
                )
            name = resolved[0]
        rec = self.manifest["hooks"][name]
        path = self.path / rec["file"]
        problem = integrity.size_problem(path, rec)
        if problem:
            raise DamagedEntry(self.key, f"{name}: {problem}", path, hooks=[name])
        return name, rec

    def check_hook(self, hook_name: str, force: bool = False) -> None:
        """Check a hook's file (size, header, every shard checksum) unless this process already did (``force``:
        again). Raises DamagedEntry naming the entry, the file and the first bad shard."""
        name, rec = self._record(hook_name)
        integrity.check_hook_file(self.key, name, self.path / rec["file"], rec, force=force)

    def activations(self, hook_name: str, verify: bool = False) -> torch.Tensor:
        """``Float[Tensor, "prompt pos d"]`` (``pos`` = len(positions), or the padded length for ``"all"``).

        A lazy, copy-on-write memory map of the hook's file: nothing is read until indexed, pages come from the
        OS page cache and can be evicted, in-place edits stay in this process. Accepts full names or
        ``"alias.L"``. The first read of a file in a process checks its header and every shard checksum
        (one sequential read of the file); ``verify=True`` checks again even if this process already did.

        Raises:
            DamagedEntry: the file fails a check (named with the entry, the hook and the rows).
        """
        name, rec = self._record(hook_name)
        integrity.check_hook_file(self.key, name, self.path / rec["file"], rec, force=verify)
        return fileio.memmap_tensor(self.path / rec["file"], rec["data_offset"], rec["dtype"], rec["shape"])

    def iter_shards(self, hook_name: str, verify: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, Float[Tensor, "rows pos d"])`` shard by shard, each read into fresh memory (no memory
        map kept), so a streaming reduction over an entry keeps RSS flat at about one shard.

        The first pass over a file in a process checks its header and each shard's sha256 before yielding the
        shard (no second read); later passes do not, unless ``verify``.

        Raises:
            DamagedEntry: a shard fails its checksum (raised before that shard is yielded).
        """
        name, rec = self._record(hook_name)
        path = self.path / rec["file"]
        check = verify or not integrity.was_checked(path, rec)
        before = integrity.stat_key(path) if check else None
        if check:
            integrity.check_header(self.key, name, path, rec)
        row_bytes = integrity.hook_row_bytes(rec)
        for shard in rec["shards"]:
            a, b = shard["rows"]
            buf = fileio.read_range(path, rec["data_offset"] + a * row_bytes, (b - a) * row_bytes)
            if check:
                problem = integrity.shard_problem(shard, name, fileio.sha256(buf))
                if problem:
                    raise DamagedEntry(self.key, problem, path, hooks=[name])
            yield slice(a, b), fileio.buffer_tensor(buf, rec["dtype"], [b - a, *rec["shape"][1:]])
        if check:
            integrity.remember(path, rec, before)

    def _alias_hooks(self, alias: str) -> list[tuple[int, str]]:
        hits = alias_names(self.hook_names, alias) or alias_names(self.available_hooks, alias)
        if not hits:
            raise WorkbenchError(f"entry {self.key} holds no {alias!r} hooks; it has {summarise_hooks(self.available_hooks)}")
        return hits

    def stacked(self, hook_alias: str, layers: list[int] | None = None, verify: bool = False) -> torch.Tensor:
        """``Float[Tensor, "prompt layer pos d"]`` for an alias (``"resid_pre"``...) over its layers in this
        entry (those requested, else all stored; or ``layers``).

        This materialises ``prompt * layer * pos * d`` values in RAM (it copies from the memory maps); for
        large entries stream one layer at a time with :meth:`iter_shards` instead.
        """
        hits = self._alias_hooks(hook_alias)
        if layers is not None:
            have = dict(hits)
            missing = [layer for layer in layers if layer not in have]
            if missing:
                raise WorkbenchError(f"entry {self.key} has no {hook_alias} at layers {missing}; it has {sorted(have)}")
            hits = [(layer, have[layer]) for layer in layers]
        return torch.stack([self.activations(name, verify=verify) for _, name in hits], dim=1)

    def check(self) -> None:
        """Verify every checksum of this entry (as :meth:`ActivationStore.verify`, reading every file again);
        raise WorkbenchError naming the first bad file or shard."""
        bad = _verify_entry(self.store, self.key)
        if bad:
            b = bad[0]
            where = f"shard {b['shard']} (rows {b['rows']}) of {b['hook']}" if b["shard"] is not None else b["file"]
            raise WorkbenchError(
                f"entry {self.key}: {where}: {b['problem']} ({len(bad)} problem(s)); remove it with "
                f"`workbench cache rm {self.key}` and recompute"
            )

"""Integrity on read: the manifest's own checksum and schema, safetensors headers, and shard checksums checked
the first time a file is read in a process.

Every file an :class:`~workbench.store.core.Entry` reads is checked against the manifest once per process:

* ``manifest.json`` carries ``manifest_sha256``, the sha256 of its canonical content (:func:`manifest_checksum`:
  sorted keys, no whitespace, ASCII, without the checksum itself), checked on every read together with its schema
  (required keys, types, shapes agreeing with ``n_prompts``, ``positions`` and ``dtype``, shard lists covering
  every row). Manifests written before the checksum existed are accepted after the schema check, with one warning
  per entry and process (their shard checksums still protect the data; an edit of their fingerprint cannot be
  seen, except by :func:`~workbench.store.get_or_compute`, which compares it with the request's).
* a hook file's safetensors header is compared with the manifest (tensor name, dtype, shape, offsets, the
  entry key in its metadata, and the header's sha256 where the manifest records it) and every shard's sha256 is
  recomputed -- a full read of the file, at sha256 speed.
* ``tokens.safetensors`` and ``prompts.jsonl`` are hashed whole against the manifest.

A file that passed is remembered by (path, device, inode, size, mtime, ctime) and the checksums it passed
against, so later reads in the same process cost one ``stat``; a rewritten or replaced file is checked again.
A failure raises :class:`DamagedEntry` (a :class:`~workbench.errors.WorkbenchError`) naming the entry, the file
and, for a shard, the hook and rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path, PurePosixPath

from ..errors import WorkbenchError
from . import fileio
from ..vocab import is_int

log = logging.getLogger("workbench.store")

#: manifest field holding the sha256 of the rest of the manifest
CHECKSUM_FIELD = "manifest_sha256"


class DamagedEntry(WorkbenchError):
    """An entry whose manifest or files fail their checks. ``hooks`` names the damaged hooks when only hook files
    are damaged (the rest of the entry is sound); ``None`` means the whole entry is unusable."""

    def __init__(self, key: str, what: str, file, hooks: list[str] | None = None):
        self.key, self.file, self.hooks, self.what = key, str(file), hooks, what
        super().__init__(
            f"entry {key} is damaged: {what} ({file}); remove it with `workbench cache rm {key}`, or request it "
            "again (get_or_compute recomputes a damaged entry)"
        )


def hook_row_bytes(rec: dict) -> int:
    """Bytes of one row (``prod(shape[1:]) * itemsize``) of a hook record."""
    n = 1
    for s in rec["shape"][1:]:
        n *= s
    return n * fileio.itemsize(rec["dtype"])


# ---------------------------------------------------------------------------------------------- manifests
def manifest_checksum(manifest: dict) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its checksum field."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """``manifest`` with its checksum field set (in place, also returned)."""
    manifest.pop(CHECKSUM_FIELD, None)
    manifest[CHECKSUM_FIELD] = manifest_checksum(manifest)
    return manifest


def parse_manifest(raw: bytes, key: str, path: Path) -> dict:
    """The manifest object from the bytes of ``path``, or DamagedEntry (not UTF-8, not JSON, not an object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedEntry(key, f"its manifest is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                                f"{exc.start})", path) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedEntry(key, f"its manifest is not valid JSON ({exc.msg} at line {exc.lineno} column "
                                f"{exc.colno})", path) from None
    if not isinstance(manifest, dict):
        raise DamagedEntry(key, f"its manifest is a JSON {type(manifest).__name__}, expected an object", path)
    return manifest


_warned_unsealed: set[str] = set()


def check_manifest(manifest: dict, key: str, path: Path) -> None:
    """The manifest's checksum (when it has one) and schema; DamagedEntry naming the first problem."""
    want = manifest.get(CHECKSUM_FIELD)
    if want is None:
        if str(path) not in _warned_unsealed:
            _warned_unsealed.add(str(path))
            log.warning("entry %s: its manifest has no checksum (written before manifests carried one), so an edit "
                        "of it cannot be detected; it is used as is -- `workbench cache rm %s` to recompute it",
                        key, key)
    elif want != manifest_checksum(manifest):
        raise DamagedEntry(key, "its manifest fails its checksum (it was edited or corrupted after it was written)",
                           path)
    problem = _schema_problem(manifest, key)
    if problem:
        raise DamagedEntry(key, f"its manifest {problem}", path)


_SCHEMA = {"format_version": int, "key": str, "model": dict, "positions": (list, str), "dtype": str,
           "n_prompts": int, "files": dict, "hooks": dict}


def _schema_problem(m: dict, key: str) -> str | None:
    for field, kind in _SCHEMA.items():
        if field not in m:
            return f"has no {field!r} (expected the fields {sorted(_SCHEMA)})"
        if not isinstance(m[field], kind) or isinstance(m[field], bool):
            return f"has {field}={m[field]!r:.60}, expected a {getattr(kind, '__name__', 'list or str')}"
    if m["key"] != key:
        return f"names key {m['key']!r:.40}, not the directory's {key!r}"
    if m["dtype"] not in fileio.DTYPES:
        return f"has dtype {m['dtype']!r:.40}, expected one of {sorted(fileio.DTYPES)}"
    n, pos = m["n_prompts"], m["positions"]
    if n < 1:
        return f"has n_prompts {n}, expected >= 1"
    if pos != "all" and not (pos and all(is_int(p) and p < 0 for p in pos)):
        return f"has positions {pos!r:.60}, expected 'all' or a list of negative offsets"
    for name in ("tokens", "prompts"):
        rec = m["files"].get(name)
        if not (isinstance(rec, dict) and _safe_relpath(rec.get("path")) and isinstance(rec.get("sha256"), str)):
            return f"has no valid files[{name!r}] (expected a path inside the entry and a sha256)"
    for hook, rec in m["hooks"].items():
        problem = _hook_schema_problem(rec, n, pos, m["dtype"])
        if problem:
            return f"hooks[{hook!r}] {problem}"
    return None


def _hook_schema_problem(rec, n: int, pos, dtype: str) -> str | None:
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, expected an object"
    for field in ("file", "dtype", "shape", "data_offset", "shards"):
        if field not in rec:
            return f"has no {field!r}"
    if not _safe_relpath(rec["file"]):
        return f"names the file {rec['file']!r:.60}, expected a path inside the entry"
    if rec["dtype"] != dtype:
        return f"has dtype {rec['dtype']!r:.20}, but the entry's dtype is {dtype!r}"
    shape = rec["shape"]
    if not (isinstance(shape, list) and len(shape) >= 3 and all(isinstance(s, int) and s >= 0 for s in shape)):
        return f"has shape {shape!r:.60}, expected [prompt, pos, ...] of non-negative ints"
    if shape[0] != n:
        return f"has {shape[0]} rows, but n_prompts is {n}"
    if pos != "all" and shape[1] != len(pos):
        return f"has {shape[1]} positions, but positions are {pos}"
    if not isinstance(rec["data_offset"], int) or rec["data_offset"] < 8:
        return f"has data_offset {rec['data_offset']!r:.20}, expected an int >= 8"
    shards, start = rec["shards"], 0
    if not isinstance(shards, list):
        return "has no shard list"
    for i, sh in enumerate(shards):
        ok = isinstance(sh, dict) and isinstance(sh.get("sha256"), str) and isinstance(sh.get("rows"), list) \
            and len(sh["rows"]) == 2 and sh["rows"][0] == start and isinstance(sh["rows"][1], int) \
            and sh["rows"][1] > start
        if not ok:
            return f"shard {i} is {sh!r:.80}, expected rows [{start}, >{start}] and a sha256"
        start = sh["rows"][1]
    if start != n:
        return f"has shards covering rows 0..{start}, expected 0..{n}"
    return None


def _safe_relpath(p) -> bool:
    return isinstance(p, str) and bool(p) and not PurePosixPath(p).is_absolute() and ".." not in PurePosixPath(p).parts


# --------------------------------------------------------------------------------------------- hook files
def header_problem(path: Path, rec: dict, name: str, key: str) -> str | None:
    """What is wrong with the safetensors header of a hook file, compared with its manifest record (None: fine)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(rec["data_offset"])
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if len(head) != rec["data_offset"]:
        return f"the file is shorter ({len(head)} bytes) than its header ({rec['data_offset']} bytes)"
    n = int.from_bytes(head[:8], "little")
    if 8 + n != rec["data_offset"]:
        return f"the safetensors header says {n} header bytes; the manifest expects {rec['data_offset'] - 8}"
    try:
        header = json.loads(head[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"the safetensors header is not valid JSON ({exc})"
    nbytes = rec["shape"][0] * hook_row_bytes(rec)
    want = {"dtype": fileio.DTYPES[rec["dtype"]][1], "shape": rec["shape"], "data_offsets": [0, nbytes]}
    got = header.get(name) if isinstance(header, dict) else None
    if got != want:
        return f"the safetensors header describes {got!r:.120}, the manifest {want}"
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    if meta.get("key", key) != key or meta.get("hook", name) != name:
        return f"the safetensors header belongs to entry {meta.get('key')!r} hook {meta.get('hook')!r}"
    want_sha = rec.get("header_sha256")  # the rest of the header (metadata, padding), where the manifest has it
    if want_sha is not None and fileio.sha256(head) != want_sha:
        return "the safetensors header fails its checksum"
    return None


def size_problem(path: Path, rec: dict) -> str | None:
    """Missing file or a size other than the manifest's (cheap: one stat)."""
    if not path.exists():
        return "missing hook file"
    want = rec["data_offset"] + rec["shape"][0] * hook_row_bytes(rec)
    size = path.stat().st_size
    if size != want:
        return f"file size {size} != {want} bytes expected from the manifest (truncated or replaced)"
    return None


def shard_problem(shard: dict, name: str, got: str) -> str | None:
    """What is wrong with a shard of hook ``name`` whose bytes hash to ``got`` (None: fine)."""
    if got == shard["sha256"]:
        return None
    a, b = shard["rows"]
    return (f"shard {shard.get('index')} (rows {a}..{b}) of {name} fails its checksum (expected "
            f"{shard['sha256'][:12]}..., got {got[:12]}...)")


def hash_shards(path: Path, rec: dict):
    """Yield ``(shard, sha256 of its bytes)`` reading the file shard by shard in bounded chunks."""
    rb = hook_row_bytes(rec)
    with open(path, "rb", buffering=0) as fh:
        for shard in rec["shards"]:
            a, b = shard["rows"]
            yield shard, fileio.hash_stream(fh, rec["data_offset"] + a * rb, (b - a) * rb, path)


# ------------------------------------------------------------------------------------- per-process memory
_CHECKED: dict[tuple, str] = {}
_CHECKED_LOCK = threading.Lock()


def stat_key(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _expectation(rec) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


def was_checked(path: Path, rec) -> bool:
    """Whether ``path``, as it is now, already passed its checks against ``rec`` in this process."""
    sk = stat_key(path)
    with _CHECKED_LOCK:
        return sk is not None and _CHECKED.get(sk) == _expectation(rec)


def remember(path: Path, rec, before: tuple | None) -> None:
    """Record that ``path`` passed against ``rec``, if it did not change since ``before`` (its stat key then)."""
    after = stat_key(path)
    if before is not None and after == before:
        with _CHECKED_LOCK:
            _CHECKED[after] = _expectation(rec)


def forget_all() -> None:
    """Forget every file checked in this process (the next read of each checks it again)."""
    with _CHECKED_LOCK:
        _CHECKED.clear()


def check_hook_file(key: str, name: str, path: Path, rec: dict, force: bool = False) -> None:
    """Size, header and every shard checksum of a hook file, once per process (``force``: again).

    Raises:
        DamagedEntry: naming the entry, the file and (for a shard) the hook and rows.
    """
    if not force and was_checked(path, rec):
        return
    before = stat_key(path)
    problem = size_problem(path, rec) or header_problem(path, rec, name, key)
    if problem:
        raise DamagedEntry(key, f"{name}: {problem}", path, hooks=[name])
    for shard, got in hash_shards(path, rec):
        problem = shard_problem(shard, name, got)
        if problem:
            raise DamagedEntry(key, problem, path, hooks=[name])
    remember(path, rec, before)


def check_header(key: str, name: str, path: Path, rec: dict) -> None:
    """Size and header of a hook file (cheap), before streaming its shards."""
    problem = size_problem(path, rec) or header_problem(path, rec, name, key)
    if problem:
        raise DamagedEntry(key, f"{name}: {problem}", path, hooks=[name])


def check_base_file(key: str, what: str, path: Path, rec: dict, force: bool = False) -> None:
    """``tokens.safetensors`` / ``prompts.jsonl`` hashed whole against the manifest, once per process."""
    if not force and was_checked(path, rec):
        return
    before = stat_key(path)
    if before is None:
        raise DamagedEntry(key, f"its {what} file is missing", path)
    if fileio.file_sha256(path) != rec["sha256"]:
        raise DamagedEntry(key, f"its {what} file fails its checksum", path)
    remember(path, rec, before)

"""Low-level file helpers: one-tensor safetensors files written row range by row range, checksums,
memory maps, atomic JSON writes.

A hook's activations live in one safetensors file holding one tensor ``[prompt, pos, *rest]``. The file is
created at full size with a valid header, then each shard (a contiguous row range) is written in place with
``os.pwrite`` -- by any number of processes, each to its own rows -- and checksummed (sha256 of the shard's
bytes). Because the tensor is one contiguous block the whole file can be memory-mapped as one tensor, and
``safetensors.safe_open`` reads it like any other safetensors file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import WorkbenchError

#: storage dtype name -> (torch dtype, safetensors code, numpy dtype used for memory maps)
DTYPES: dict[str, tuple[torch.dtype, str, type]] = {
    "float32": (torch.float32, "F32", np.float32),
    "float16": (torch.float16, "F16", np.float16),
    "bfloat16": (torch.bfloat16, "BF16", np.uint16),
}
_ALIGN = 64
#: errno values of a full disk or an exhausted quota
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def dtype_name(dtype: torch.dtype) -> str:
    for name, (t, _, _) in DTYPES.items():
        if t == dtype:
            return name
    raise WorkbenchError(f"storage dtype {dtype} is not supported; expected one of {sorted(DTYPES)}")


def itemsize(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name][0]).element_size()


def create_tensor_file(path: Path, tensor_name: str, dtype: str, shape: list[int],
                       metadata: dict | None = None) -> tuple[int, str]:
    """Create ``path`` as a safetensors file of one zero-filled (sparse) tensor; return the data offset and the
    sha256 of the header (the bytes before the data)."""
    nbytes = int(np.prod(shape)) * itemsize(dtype)
    header = {tensor_name: {"dtype": DTYPES[dtype][1], "shape": list(shape), "data_offsets": [0, nbytes]}}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % _ALIGN)  # the safetensors spec allows trailing spaces
    head = len(raw).to_bytes(8, "little") + raw
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + nbytes)
    return len(head), sha256(head)


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"bad header length {n}")
        return json.loads(fh.read(n)), 8 + n


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    view = memoryview(buf).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_range(path: Path, offset: int, nbytes: int) -> bytearray:
    """``nbytes`` bytes at ``offset`` into a fresh buffer (no mapping kept, so memory is returned on free)."""
    buf = bytearray(nbytes)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise WorkbenchError(f"{path} is truncated: expected {nbytes} bytes at offset {offset}, got {got}")
            got += n
    return buf


def buffer_tensor(buf: bytearray, dtype: str, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=DTYPES[dtype][0]).view(*shape)


def memmap_tensor(path: Path, offset: int, dtype: str, shape: list[int]) -> torch.Tensor:
    """A lazily paged, copy-on-write memory map of the tensor at ``offset`` (writes never reach the file)."""
    torch_dtype, _, np_dtype = DTYPES[dtype]
    arr = np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=tuple(shape))
    t = torch.from_numpy(arr)
    return t.view(torch_dtype) if torch_dtype == torch.bfloat16 else t


def hash_stream(fh, offset: int, nbytes: int, path, chunk: int = 1 << 22) -> str:
    """sha256 of ``nbytes`` bytes at ``offset`` of the open binary file ``fh``, read in ``chunk``-byte pieces into
    one reused buffer (memory stays flat whatever the size)."""
    h = hashlib.sha256()
    buf = bytearray(max(1, min(chunk, nbytes)))
    view = memoryview(buf)
    fh.seek(offset)
    left = nbytes
    while left:
        n = fh.readinto(view[:min(left, len(buf))])
        if not n:
            raise WorkbenchError(f"{path} is truncated: expected {nbytes} bytes at offset {offset}, got {nbytes - left}")
        h.update(view[:n])
        left -= n
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories; a full disk is no such refusal
        if exc.errno in DISK_FULL:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` via a temporary sibling, fsync and ``os.replace``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal...: no half-written temporary left behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is an OSError of a full disk or quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False

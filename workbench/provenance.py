"""Provenance: the versions of the software that produced an artifact.

Every ``summary.json``, store manifest, Direction and controller artifact records :func:`versions`, and stage
reuse is keyed on them, so an upgraded runtime recomputes instead of serving stale results.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

#: The distributions whose versions are recorded (distribution name -> key in the record).
PACKAGES = {"torch": "torch", "transformers": "transformers", "transformer-lens": "transformer_lens",
            "workbench": "workbench"}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source checkout this package runs from (``+dirty`` with local edits), else ``None``."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """``{"python", "torch", "transformers", "transformer_lens", "workbench", "git_commit"}`` of this process."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist, key in PACKAGES.items():
        out[key] = _dist_version(dist)
    out["git_commit"] = git_commit()
    return out


def runtime_versions() -> dict[str, str | None]:
    """:func:`versions` without the git commit: what decides whether a computed result can be reused."""
    return {k: v for k, v in versions().items() if k != "git_commit"}


def describe_versions() -> str:
    """``"python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0, ..."`` for error messages."""
    return ", ".join(f"{k} {v}" for k, v in versions().items() if k != "git_commit" and v is not None)

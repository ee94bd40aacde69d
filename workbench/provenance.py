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
def _runtime() -> tuple[tuple[str, str | None], ...]:
    return (("python", platform.python_version()),
            *((key, _dist_version(dist)) for dist, key in PACKAGES.items()))


def runtime_versions() -> dict[str, str | None]:
    """``{"python", "torch", "transformers", "transformer_lens", "workbench"}``: what decides whether a computed
    result can be reused (no git call: store keys ask for it on every request)."""
    return dict(_runtime())


def versions() -> dict[str, str | None]:
    """:func:`runtime_versions` and the ``git_commit`` of the checkout, as recorded in every artifact."""
    return {**runtime_versions(), "git_commit": git_commit()}


def describe_versions() -> str:
    """``"python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0, ..."`` for error messages."""
    return ", ".join(f"{k} {v}" for k, v in runtime_versions().items() if v is not None)

"""Prompt sets: the organism's splits (JSONL under ``workbench/organism/data/prompts``) and validation."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import WorkbenchError
from .models import organism_dir
from .vocab import CATEGORIES, SPLITS  # noqa: F401 - re-exported (the names live in workbench.vocab)


def parse_jsonl(lines: Iterable[str], source: str | Path) -> list:
    """The JSON value of every non-blank line; a bad line is one error naming ``source:line``. The one JSONL
    parser of the package (prompt files, pair files, benchmark copies)."""
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"{source}:{i} is not valid JSON: {exc.msg}") from exc
    return rows


def read_jsonl(path: str | Path, what: str = "prompt file") -> list:
    """Rows of a JSONL file (UTF-8), with a clear error for a missing file or a bad line."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{what} {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_jsonl(fh, path)
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise WorkbenchError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def write_jsonl(path: str | Path, rows: Iterable) -> None:
    """Write ``rows`` as JSONL (one sorted-key JSON object per line, UTF-8), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def organism_rows(split: str = "test") -> list[dict]:
    """All rows of one organism split (``train``, ``val`` or ``test``)."""
    if split not in SPLITS:
        raise WorkbenchError(f"unknown split {split!r}; expected one of {SPLITS}")
    return read_jsonl(organism_dir() / "prompts" / f"{split}.jsonl")


def organism_prompts(split: str = "test", category: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts of the organism split, optionally of one category (``harmful``, ``benign``...)."""
    rows = organism_rows(split)
    if category is not None:
        known = sorted({r["category"] for r in rows})
        if category not in known:
            raise WorkbenchError(f"unknown category {category!r} in split {split!r}; expected one of {known}")
        rows = [r for r in rows if r["category"] == category]
    prompts = [r["prompt"] for r in rows]
    return prompts[:limit] if limit is not None else prompts


def organism_splits(split: str = "test", categories=CATEGORIES, limit: int | None = None) -> dict[str, list[str]]:
    """``{category: prompts}`` for the categories of one organism split."""
    return {c: organism_prompts(split, c, limit) for c in categories}

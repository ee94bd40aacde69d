"""Progress bars for long work; every public function that loops takes ``progress: bool``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str = "", enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled``; a plain iterator otherwise."""
    if not enabled:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)

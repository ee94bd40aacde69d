"""Fallbacks are never silent: each one is logged at warning level and collected into the command's JSON.

Library code calls :func:`warn_fallback` when it takes a slower or different path than asked for (the patching
engine's hooks fallback, an out-of-memory batch back-off...). Whoever reports a result wraps the work in
:func:`recording_fallbacks` and adds the collected events to its JSON (``workbench`` commands and
``summary.json`` of the main job do).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

_ROOT = "workbench"


def warn_fallback(logger: logging.Logger, kind: str, message: str, *args) -> None:
    """Log ``message % args`` at warning level, tagged as a fallback of ``kind`` (e.g. ``"patching_engine"``)."""
    logger.warning(message, *args, extra={"wb_fallback": kind})


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.events: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        kind = getattr(record, "wb_fallback", None)
        if kind is not None:
            self.events.append({"kind": kind, "message": record.getMessage()})


@contextmanager
def recording_fallbacks() -> Iterator[list[dict]]:
    """``with recording_fallbacks() as events:`` collects ``{"kind", "message"}`` of every fallback inside."""
    rec = _Recorder()
    logger = logging.getLogger(_ROOT)
    logger.addHandler(rec)
    try:
        yield rec.events
    finally:
        logger.removeHandler(rec)

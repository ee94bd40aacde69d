"""Prompts of the benchmarks on a named model (``--model NAME``): short real prompts, else the synthetic ones.

The real prompts are the harmful and benign prompts of the test split of ``load_data("real")`` (not the jailbreaks:
those are ~1,000-token prompts) of at most :data:`MAX_WORDS` words. Where the real data files cannot be loaded
(``workbench data fetch`` not run, no network) the benchmark falls back to its synthetic prompts; the fallback is
logged (it reaches the command's ``fallbacks``) and recorded in the benchmark's ``prompts`` field.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from ..errors import WorkbenchError
from ..fallbacks import warn_fallback

logger = logging.getLogger(__name__)

#: Longest real prompt (in words) a benchmark uses: keeps the prompts short (about 35-70 chat tokens on SmolLM2).
MAX_WORDS = 32

#: How the real prompts were chosen (the ``prompts`` field of a benchmark's JSON).
REAL_SOURCE = f"real: load_data('real'), test split, harmful and benign, at most {MAX_WORDS} words"


def real_prompts(max_words: int = MAX_WORDS) -> tuple[list[str], list[str]]:
    """``(harmful, benign)``: the test-split prompts of ``load_data("real")`` of at most ``max_words`` words.

    Raises:
        WorkbenchError: the real data cannot be loaded, or has no short harmful or benign test prompt.
    """
    from ..promptsets import load_data

    data = load_data("real")
    harmful, benign = ([p for p in data.prompts("test", c) if len(p.split()) <= max_words]
                       for c in ("harmful", "benign"))
    if not harmful or not benign:
        raise WorkbenchError(f"{data.source} has {len(harmful)} harmful and {len(benign)} benign test prompts of at "
                             f"most {max_words} words; the benchmark needs both")
    return harmful, benign


def fell_back(exc: WorkbenchError, what: str = "synthetic prompts") -> dict:
    """Log the fallback to ``what`` and return the ``prompts`` record saying why."""
    warn_fallback(logger, "bench_prompts", "benchmark: the real prompts are unavailable (%s); using %s", exc, what)
    return {"source": what, "fallback": f"real prompts unavailable: {exc}"}


def model_prompts(n: int, fallback: Callable[[int], list[str]]) -> tuple[list[str], dict]:
    """``n`` prompts for a named model and their ``prompts`` record: the short real prompts, harmful and benign
    alternating (repeated when fewer than ``n``), or ``fallback(n)`` when the real data cannot be loaded."""
    try:
        harmful, benign = real_prompts()
    except WorkbenchError as exc:
        return fallback(n), fell_back(exc)
    mixed = [p for pair in itertools.zip_longest(harmful, benign) for p in pair if p is not None]
    prompts = list(itertools.islice(itertools.cycle(mixed), n))
    is_harmful = set(harmful)
    n_harmful = sum(p in is_harmful for p in prompts)
    return prompts, {"source": REAL_SOURCE, "harmful": n_harmful, "benign": len(prompts) - n_harmful}

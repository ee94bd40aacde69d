"""Statistics for reported rates: Wilson intervals, exact McNemar tests on paired verdicts, summaries over seeds.

Every refusal rate the workbench reports is a proportion ``k / n`` over prompts; :func:`wilson_interval` gives its
95 % interval. Two methods evaluated on the same prompts give paired verdicts; :func:`mcnemar_exact` tests whether
they refuse at different rates using only the prompts where they disagree. :func:`seed_summary` condenses one
metric measured under several training seeds. Pure Python (``math`` and ``statistics``), no SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import WorkbenchError


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise WorkbenchError(f"confidence must be in (0, 1), got {confidence!r}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n`` (Wilson 1927, JASA 22:209-212; Newcombe 1998, method 3).

    The interval is the set of ``p`` the score test does not reject, ``|p̂ - p| <= z sqrt(p (1 - p) / n)`` with
    ``p̂ = k / n`` and ``z`` the ``(1 + confidence) / 2`` normal quantile; solving the quadratic gives

        centre = (p̂ + z² / 2n) / (1 + z² / n)
        half   = z / (1 + z² / n) * sqrt(p̂ (1 - p̂) / n + z² / 4n²)

    Unlike the Wald interval it stays inside [0, 1] and is not empty at ``k = 0`` or ``k = n``: there the
    lower (upper) bound is exactly 0 (1).

    Returns:
        ``(lo, hi)``, with ``lo <= k / n <= hi``.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise WorkbenchError(f"wilson_interval needs integer counts, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise WorkbenchError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class RateInterval:
    """A proportion with its Wilson interval: ``k`` of ``n``, ``rate = k / n``, ``lo <= rate <= hi``."""

    k: int
    n: int
    rate: float
    lo: float
    hi: float

    def to_dict(self, digits: int = 4) -> dict:
        return {"k": self.k, "n": self.n, "rate": round(self.rate, digits), "lo": round(self.lo, digits),
                "hi": round(self.hi, digits)}


def rate_interval(flags: Sequence[bool], confidence: float = 0.95) -> RateInterval:
    """The share of true ``flags`` (e.g. per-prompt refusal verdicts) with its :func:`wilson_interval`."""
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson_interval(k, n, confidence)
    return RateInterval(k, n, k / n, lo, hi)


def interval_from_rate(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """:func:`wilson_interval` for a rate already rounded (``k = round(rate * n)``; exact while ``rate`` keeps 4
    decimals and ``n < 5000``), for summaries that stored rates and counts but not the verdicts."""
    return wilson_interval(round(float(rate) * int(n)), int(n), confidence)


@dataclass(frozen=True)
class McNemar:
    """An exact McNemar test on paired verdicts ``a`` (reference) and ``b`` (other) over the same items.

    ``b``: items where ``a`` is true and ``b`` false; ``c``: ``a`` false and ``b`` true; ``n``: paired items;
    ``p``: two-sided exact p-value (:func:`mcnemar_exact`).
    """

    b: int
    c: int
    n: int
    p: float

    def to_dict(self, digits: int = 6) -> dict:
        return {"b": self.b, "c": self.c, "n": self.n, "p": round(self.p, digits)}


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact (binomial) McNemar test of paired booleans (McNemar 1947, Psychometrika 12:153-157).

    Only discordant pairs carry information: ``b`` = #(a true, b false), ``c`` = #(a false, b true). Under the
    null hypothesis (the two rates are equal) each discordant pair goes either way with probability 1/2, so
    ``c ~ Binomial(b + c, 1/2)`` and the two-sided exact p-value is

        p = min(1, 2 * sum_{i=0}^{min(b, c)} C(b + c, i) / 2^(b + c))

    (``p = 1`` when there are no discordant pairs). Computed in exact integer arithmetic.

    Args:
        a, b: one verdict per item, in the same item order (e.g. per-prompt ``refused`` of two methods on the
            same test prompts).
    """
    if len(a) != len(b):
        raise WorkbenchError(f"mcnemar_exact needs paired verdicts of equal length, got {len(a)} and {len(b)}")
    b_ = sum(1 for x, y in zip(a, b) if bool(x) and not bool(y))
    c_ = sum(1 for x, y in zip(a, b) if not bool(x) and bool(y))
    m = b_ + c_
    tail = sum(math.comb(m, i) for i in range(min(b_, c_) + 1))
    p = 1.0 if m == 0 else min(1.0, 2 * tail / 2 ** m)
    return McNemar(b_, c_, len(a), p)


def seed_summary(values: Sequence[float] | Mapping[object, float], digits: int = 4) -> dict:
    """Mean and spread of one metric over seeds: ``{"mean", "std", "min", "max", "n"}``.

    ``std`` is the sample standard deviation (``n - 1`` in the denominator), ``None`` for a single seed.
    ``values``: the metric per seed (a sequence, or ``{seed: value}``).
    """
    vals = [float(v) for v in (values.values() if isinstance(values, Mapping) else values)]
    if not vals:
        raise WorkbenchError("seed_summary needs at least one value")
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": round(statistics.fmean(vals), digits), "std": None if std is None else round(std, digits),
            "min": round(min(vals), digits), "max": round(max(vals), digits), "n": len(vals)}


__all__ = ["McNemar", "RateInterval", "interval_from_rate", "mcnemar_exact", "rate_interval", "seed_summary",
           "wilson_interval"]

"""Wilson intervals, exact McNemar tests and seed summaries against published values and independent computations."""

import itertools
import math

import pytest

from workbench.errors import WorkbenchError
from workbench.stats import (interval_from_rate, mcnemar_exact, rate_interval, seed_summary, wilson_interval)

Z95 = 1.959963984540054


# Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no continuity correction)
NEWCOMBE = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611)),
            ((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize("counts,published", NEWCOMBE)
def test_wilson_matches_newcombe_1998(counts, published):
    lo, hi = wilson_interval(*counts)
    assert (round(lo, 4), round(hi, 4)) == published


def _score_bound(k, n, z, upper):
    """The Wilson bound by bisection on the score statistic |p̂ - p| / sqrt(p (1 - p) / n) = z (no closed form)."""
    phat = k / n
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(phat - mid) <= z * math.sqrt(mid * (1 - mid) / n)
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(1, 3), (7, 8), (40, 78), (221, 252), (3, 240), (100, 100), (0, 1)])
def test_wilson_inverts_the_score_test(k, n):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(_score_bound(k, n, Z95, upper=False), abs=1e-9)
    assert hi == pytest.approx(_score_bound(k, n, Z95, upper=True), abs=1e-9)
    assert lo <= k / n <= hi


def test_wilson_edges_symmetry_and_confidence():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # k = n: the upper bound is 1 and the lower one n / (n + z^2) (the quadratic's root at p̂ = 1)
    assert wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + Z95 ** 2), abs=1e-12)
    lo, hi = wilson_interval(3, 11)
    lo2, hi2 = wilson_interval(8, 11)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2), abs=1e-12)
    # wider at 99 %, narrower at 80 % (z = 2.5758 and 1.2816)
    assert wilson_interval(3, 11, 0.99)[0] < lo < wilson_interval(3, 11, 0.80)[0]
    assert wilson_interval(0, 20, 0.99)[1] == pytest.approx(2.5758293035489 ** 2 / (20 + 2.5758293035489 ** 2))


def test_rate_interval_and_interval_from_a_rounded_rate():
    r = rate_interval([True] * 221 + [False] * 31)
    assert (r.k, r.n, r.rate) == (221, 252, 221 / 252)
    assert (r.lo, r.hi) == wilson_interval(221, 252)
    assert r.to_dict() == {"k": 221, "n": 252, "rate": 0.877, "lo": round(r.lo, 4), "hi": round(r.hi, 4)}
    assert interval_from_rate(round(221 / 252, 4), 252) == wilson_interval(221, 252)
    assert interval_from_rate(round(3 / 4999, 4), 4999) == wilson_interval(3, 4999)


def test_wilson_bad_input():
    for k, n in ((1, 0), (-1, 4), (5, 4), (1.5, 4)):
        with pytest.raises(WorkbenchError, match="wilson_interval needs"):
            wilson_interval(k, n)
    with pytest.raises(WorkbenchError, match="confidence must be in"):
        wilson_interval(1, 4, 95)


def _brute_mcnemar_p(b, c):
    """Two-sided exact p by enumerating every way the b + c discordant pairs can fall (each 1/2): the share of
    outcomes at least as far from an even split as the observed one."""
    m = b + c
    far = sum(1 for signs in itertools.product((0, 1), repeat=m) if abs(sum(signs) - m / 2) >= abs(c - m / 2))
    return far / 2 ** m


@pytest.mark.parametrize("b,c", [(1, 9), (9, 1), (0, 5), (3, 3), (2, 7), (0, 1), (4, 12), (6, 5)])
def test_mcnemar_exact_matches_enumeration(b, c):
    concordant_yes, concordant_no = 4, 3
    a = [True] * b + [False] * c + [True] * concordant_yes + [False] * concordant_no
    other = [False] * b + [True] * c + [True] * concordant_yes + [False] * concordant_no
    res = mcnemar_exact(a, other)
    assert (res.b, res.c, res.n) == (b, c, b + c + 7)
    assert res.p == pytest.approx(_brute_mcnemar_p(b, c), rel=1e-12)


def test_mcnemar_hand_values_and_edges():
    # b = 1, c = 9: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert mcnemar_exact([1] + [0] * 9, [0] + [1] * 9).p == 22 / 1024
    assert mcnemar_exact([0] * 5, [1] * 5).p == 2 / 32
    same = mcnemar_exact([True, False, True], [True, False, True])
    assert (same.b, same.c, same.p) == (0, 0, 1.0)
    assert mcnemar_exact([], []).p == 1.0
    # many discordant pairs: exact big-integer arithmetic stays finite (b = 400, c = 600)
    big = mcnemar_exact([True] * 400 + [False] * 600, [False] * 400 + [True] * 600)
    assert 0 < big.p < 1e-9 and big.to_dict()["b"] == 400
    with pytest.raises(WorkbenchError, match="equal length, got 2 and 3"):
        mcnemar_exact([True, False], [True, False, True])


def test_seed_summary():
    s = seed_summary([0.5, 0.75, 1.0])
    assert s == {"mean": 0.75, "std": 0.25, "min": 0.5, "max": 1.0, "n": 3}
    assert seed_summary({0: 0.875, 1: 0.875})["std"] == 0.0
    assert seed_summary([0.3]) == {"mean": 0.3, "std": None, "min": 0.3, "max": 0.3, "n": 1}
    with pytest.raises(WorkbenchError, match="at least one value"):
        seed_summary([])

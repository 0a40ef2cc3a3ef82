"""Stats on known samples with hand-computed values, plus properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.core.timing_stats import Stats, median_ci_ranks, summarize


def test_five_samples_literal():
    s = summarize([5, 1, 4, 2, 3])
    assert s.rounds == 5
    assert (s.median, s.mean, s.min, s.max) == (3.0, 3.0, 1.0, 5.0)
    assert (s.q1, s.q3, s.iqr) == (2.0, 4.0, 2.0)
    assert s.stdev == pytest.approx(math.sqrt(2.5))  # sample stdev: sum sq dev 10 / 4
    # n=5 is too small for a 95% order-statistic interval (P(B=0)=1/32 > 0.025): none is
    # claimed; min..max would cover only 1 - 2/32 = 0.9375
    assert (s.ci_low, s.ci_high) == (None, None) and not s.has_ci
    assert s.ci_coverage == pytest.approx(0.9375)
    assert s.confidence == 0.95


def test_even_n_median_and_quartiles_interpolate():
    s = summarize([1, 2, 3, 4])
    assert s.median == 2.5
    assert s.q1 == 1.75  # linear: position 0.75 between 1 and 2
    assert s.q3 == 3.25
    assert s.iqr == 1.5


def test_single_sample():
    s = summarize([7.5])
    assert (s.rounds, s.median, s.mean, s.stdev, s.iqr) == (1, 7.5, 7.5, 0.0, 0.0)
    assert (s.ci_low, s.ci_high, s.ci_coverage) == (None, None, 0.0)


def test_constant_samples_zero_spread():
    s = summarize([2.0] * 30)
    assert s.iqr == 0.0 and s.stdev == 0.0
    assert s.ci_low == s.ci_high == s.median == 2.0


def test_ci_n20_from_binomial_table():
    # Binom(20, 1/2): P(B<=5) = 21700/2^20 = 0.0207 <= 0.025 < P(B<=6) = 0.0577,
    # so the 95% interval is [x_(6), x_(15)] with coverage 1 - 2*0.0207 = 0.9586.
    assert median_ci_ranks(20) == (6, 15)
    samples = [float(10 * i) for i in range(1, 21)]  # x_(i) = 10 i
    s = summarize(samples[::-1])
    assert (s.ci_low, s.ci_high) == (60.0, 150.0)
    assert s.ci_coverage == pytest.approx(1 - 2 * 21700 / 2**20)  # 0.9586
    assert s.median == 105.0


@pytest.mark.parametrize(
    ("n", "ranks"),
    [(5, None), (6, (1, 6)), (9, (2, 8)), (10, (2, 9)), (11, (2, 10)), (100, (40, 61))],
)
def test_ci_ranks_match_tables(n, ranks):
    assert median_ci_ranks(n, 0.95) == ranks


def test_lower_confidence_narrows():
    # 80%: P(B<=6) = 0.0577 <= 0.1 < P(B<=7) = 0.1316 -> ranks (7, 14).
    assert median_ci_ranks(20, 0.80) == (7, 14)


def test_as_row_keys_and_values():
    row = summarize([1, 2, 3, 4, 5]).as_row("route")
    assert row == {
        "route.median_ms": 3.0,
        "route.mean_ms": 3.0,
        "route.iqr_ms": 2.0,
        "route.min_ms": 1.0,
        "route.max_ms": 5.0,
        "route.ci_low_ms": None,
        "route.ci_high_ms": None,
        "route.ci_coverage": pytest.approx(0.9375),
        "route.rounds": 5,
        "route.q1_ms": 2.0,
        "route.q3_ms": 4.0,
        "route.stdev_ms": pytest.approx(1.5811388300841898),
    }


def test_errors():
    with pytest.raises(ValueError, match="no samples"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        summarize([1.0, 2.0], confidence=1.5)


def test_stats_is_frozen():
    s = summarize([1.0])
    assert isinstance(s, Stats)
    with pytest.raises(AttributeError):
        s.median = 2.0  # type: ignore[misc]


samples_st = st.lists(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(samples_st, st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_ci_contains_median_and_order(samples, confidence):
    s = summarize(samples, confidence)
    assert s.has_ci == (median_ci_ranks(len(samples), confidence) is not None)
    if not s.has_ci:  # too few samples: no interval claimed, and (min, max) falls short
        assert s.ci_coverage < confidence
        return
    assert s.ci_coverage >= confidence
    assert s.min <= s.ci_low <= s.median <= s.ci_high <= s.max
    assert s.min <= s.q1 <= s.median <= s.q3 <= s.max
    assert s.iqr >= 0.0
    assert s.rounds == len(samples)
    assert s.median == pytest.approx(float(np.median(samples)))
    assert s.ci_low in samples and s.ci_high in samples


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=6, max_value=400), st.sampled_from([0.9, 0.95, 0.99]))
def test_ci_ranks_reach_confidence(n, confidence):
    from scipy.stats import binom

    ranks = median_ci_ranks(n, confidence)
    if ranks is None:
        assert 1.0 - 2 * 0.5**n < confidence  # even (min, max) falls short
        return
    j, k = ranks
    assert j + k == n + 1
    coverage = binom.cdf(k - 1, n, 0.5) - binom.cdf(j - 1, n, 0.5)
    assert coverage >= confidence - 1e-9
    # and j is the tightest symmetric choice: one rank further in falls short
    if j + 1 <= k - 1:
        assert binom.cdf(k - 2, n, 0.5) - binom.cdf(j, n, 0.5) < confidence


@pytest.mark.parametrize(("n", "coverage"), [(2, 0.5), (3, 0.75), (4, 0.875), (5, 0.9375), (6, 0.96875)])
def test_min_max_coverage_literal(n, coverage):
    # [x_(1), x_(n)] misses the median only when all n samples fall on one side: 2 / 2^n
    from moebench.core.timing_stats import order_statistic_coverage

    assert order_statistic_coverage(n, 1, n) == pytest.approx(coverage)
    s = summarize([float(i) for i in range(n)])
    assert s.has_ci == (n >= 6)
    assert s.ci_coverage == pytest.approx(coverage)  # n = 6: the interval is min..max itself
    if n >= 6:
        assert (s.ci_low, s.ci_high) == (0.0, float(n - 1))


def test_coverage_n9_literal():
    # Binom(9, 1/2): P(B<=1) = 10/512; (2, 8) covers P(2 <= B <= 7) = 1 - 20/512 = 0.9609
    from moebench.core.timing_stats import order_statistic_coverage

    s = summarize([float(i) for i in range(9)])
    assert (s.ci_low, s.ci_high) == (1.0, 7.0)
    assert s.ci_coverage == pytest.approx(1 - 20 / 512) == order_statistic_coverage(9, 2, 8)
    with pytest.raises(ValueError):
        order_statistic_coverage(9, 5, 5)


def test_coverage_is_real_by_simulation():
    # the claimed coverage is what happens: 4000 samples of n = 9 from a skewed distribution
    rng = np.random.default_rng(0)
    draws = np.sort(rng.lognormal(0.0, 1.0, size=(4000, 9)), axis=1)
    inside = (draws[:, 1] <= 1.0) & (1.0 <= draws[:, 7])  # lognormal(0, 1) median = 1
    assert abs(inside.mean() - (1 - 20 / 512)) < 0.01  # 3 standard errors

"""Summary statistics of timing samples (pure: numpy and scipy, no torch).

All times are milliseconds.  The confidence interval is of the *median* and is
distribution-free: it comes from order statistics and the binomial distribution, so it
holds for skewed, heavy-tailed timing samples where a normal-theory interval would not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


@dataclass(frozen=True)
class Stats:
    """Summary of ``rounds`` timing samples, in milliseconds.

    stdev is the sample standard deviation (ddof=1; 0.0 for one sample).  q1/q3 are the
    25th/75th percentiles (numpy's linear interpolation) and iqr = q3 - q1.
    [ci_low, ci_high] is a distribution-free interval for the median at ``confidence``
    (see :func:`median_ci`), or None when ``rounds`` is too small for any order-statistic
    interval to reach it (n <= 5 at 95%). ci_coverage is the interval's actual coverage
    (>= confidence), or, without an interval, the most any would have: that of (min, max).
    """

    rounds: int
    median: float
    mean: float
    stdev: float
    min: float
    max: float
    q1: float
    q3: float
    iqr: float
    ci_low: float | None
    ci_high: float | None
    confidence: float
    ci_coverage: float = float("nan")

    @property
    def has_ci(self) -> bool:
        """Whether enough rounds were timed for an interval of the median at ``confidence``."""
        return self.ci_low is not None and self.ci_high is not None

    def as_row(self, prefix: str) -> dict:
        """Flat row columns ``{prefix}.median_ms`` ... ``{prefix}.stdev_ms`` (e.g. prefix "route")."""
        return {
            f"{prefix}.median_ms": self.median,
            f"{prefix}.mean_ms": self.mean,
            f"{prefix}.iqr_ms": self.iqr,
            f"{prefix}.min_ms": self.min,
            f"{prefix}.max_ms": self.max,
            f"{prefix}.ci_low_ms": self.ci_low,
            f"{prefix}.ci_high_ms": self.ci_high,
            f"{prefix}.ci_coverage": self.ci_coverage,
            f"{prefix}.rounds": self.rounds,
            f"{prefix}.q1_ms": self.q1,
            f"{prefix}.q3_ms": self.q3,
            f"{prefix}.stdev_ms": self.stdev,
        }


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """1-based order-statistic ranks (j, k) bounding the median of n samples.

    Chooses the symmetric pair k = n + 1 - j with the largest j such that
    P(j <= B < k) >= confidence for B ~ Binomial(n, 1/2), i.e. P(B <= j - 1) <= (1 - c)/2.
    Then [x_(j), x_(k)] covers the population median with probability >= confidence for
    any continuous distribution.  Returns None when even (1, n) is too short (tiny n:
    n <= 5 at 95%).
    """
    if n < 1:
        raise ValueError(f"median_ci_ranks: n must be >= 1, got {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0
    cdf = binom.cdf(np.arange(n + 1), n, 0.5)
    # Number of m in 0.. with P(B <= m) <= tail; the tolerance absorbs float rounding of cdf.
    j = int(np.count_nonzero(cdf <= tail * (1.0 + 1e-9)))
    if j == 0:
        return None
    return j, n + 1 - j


def order_statistic_coverage(n: int, j: int, k: int) -> float:
    """P(x_(j) <= median <= x_(k)) for n iid continuous samples: P(j <= B < k), B ~ Binomial(n, 1/2).

    (The median lies between the j-th and k-th smallest exactly when j to k - 1 samples fall
    below it.) For (1, n): 1 - 2 * 0.5**n, e.g. 0.75 for n = 3 and 0.9375 for n = 5.
    """
    if not 1 <= j < k <= n:
        raise ValueError(f"order_statistic_coverage: need 1 <= j < k <= n, got j={j}, k={k}, n={n}")
    return float(binom.cdf(k - 1, n, 0.5) - binom.cdf(j - 1, n, 0.5))


def median_ci(sorted_ms: np.ndarray, confidence: float = 0.95) -> tuple[float | None, float | None, float]:
    """Distribution-free confidence interval of the median of *sorted* samples <float>[n]:
    (low, high, coverage), coverage being the interval's actual coverage (>= ``confidence``).

    When n is too small for any order-statistic interval to reach ``confidence`` the interval
    is undefined: (None, None, coverage of (min, max)), the best a sample of n can give
    (n = 1: 0.0).
    """
    n = len(sorted_ms)
    ranks = median_ci_ranks(n, confidence)
    if ranks is None:
        return None, None, (order_statistic_coverage(n, 1, n) if n > 1 else 0.0)
    j, k = ranks
    return float(sorted_ms[j - 1]), float(sorted_ms[k - 1]), order_statistic_coverage(n, j, k)


def summarize(samples_ms: Sequence[float], confidence: float = 0.95) -> Stats:
    """Summarize timing samples (milliseconds) into :class:`Stats`.

    Raises ValueError on empty input or non-finite samples.
    """
    x = np.sort(np.asarray(samples_ms, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("summarize: no samples (need at least one timing round)")
    if not np.all(np.isfinite(x)):
        raise ValueError("summarize: samples must be finite numbers of milliseconds")
    q1, median, q3 = (float(v) for v in np.percentile(x, [25.0, 50.0, 75.0]))
    ci_low, ci_high, coverage = median_ci(x, confidence)
    return Stats(
        rounds=int(x.size),
        median=median,
        mean=float(x.mean()),
        stdev=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        min=float(x[0]),
        max=float(x[-1]),
        q1=q1,
        q3=q3,
        iqr=q3 - q1,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        ci_coverage=coverage,
    )

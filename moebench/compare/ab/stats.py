"""Statistics of the A/B gate: Hodges-Lehmann shift of paired log-ratios, its Wilcoxon
signed-rank interval, the verdict rules and the error budget of many cells and many looks.

Pure numpy (no torch, no scipy): the exact null distribution of the signed-rank statistic is
built by dynamic programming, so the tiny error rates that a family of cells times several
looks asks for (1e-5 and below) are exact, not a normal approximation's tail.

Conventions: a *pair* is one block of calls timed on side A and one on side B of the same
cell (case, router, phase) back to back (interleaved) or at the same time (duet); its value is
``d = log(B / A)`` of the two blocks' medians, so ``exp(d)`` is the ratio B/A and a shift in
``d`` is a relative speed change that does not care how long the phase takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Sequence

import numpy as np

EXACT_MAX_N = 300  # above this the signed-rank null is replaced by its normal approximation
VERDICTS = ("slower", "undecided", "faster", "same")  # by severity, most severe first


def walsh_averages(d: Sequence[float]) -> np.ndarray:
    """(d_i + d_j) / 2 for every i <= j, sorted: n(n+1)/2 values for n samples."""
    x = np.asarray(d, dtype=float)
    i, j = np.triu_indices(len(x))
    return np.sort((x[i] + x[j]) / 2)


def hodges_lehmann(d: Sequence[float]) -> float:
    """The Hodges-Lehmann estimate of the centre of ``d``: the median of its Walsh averages."""
    if len(d) == 0:
        raise ValueError("hodges_lehmann: no samples")
    return float(np.median(walsh_averages(d)))


@lru_cache(maxsize=64)
def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(T+ <= t) for t = 0 .. n(n+1)/2 under the null (no ties): T+ is the sum of a random
    subset of the ranks 1..n, each rank in with probability 1/2."""
    p = np.zeros(n * (n + 1) // 2 + 1)
    p[0] = 1.0
    top = 0
    for rank in range(1, n + 1):
        # the subsets that include `rank` shift the distribution up by rank (halved: P = 1/2)
        p[rank: top + rank + 1] += p[: top + 1].copy()
        top += rank
        p[: top + 1] *= 0.5
    return np.cumsum(p)


def signed_rank_depth(n: int, alpha: float) -> int:
    """The depth C of the two-sided (1 - alpha) interval: the C-th smallest and C-th largest
    Walsh averages bound it. 0 when no interval reaches that level with n samples (then
    2^-n > alpha/2: too few pairs)."""
    if n < 1:
        return 0
    if n <= EXACT_MAX_N:
        cdf = _signed_rank_cdf(n)
        # largest C with P(T+ <= C - 1) <= alpha/2; cdf is increasing
        return int(np.searchsorted(cdf, alpha / 2 * (1 + 1e-12), side="right"))
    m = n * (n + 1) / 2
    sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return max(0, int(math.floor(m / 2 - z * sd + 0.5)))


def signed_rank_coverage(n: int, depth: int) -> float:
    """Exact coverage of the interval of depth ``depth`` with n samples (n <= EXACT_MAX_N)."""
    if depth < 1:
        return 1.0
    return float(1 - 2 * _signed_rank_cdf(n)[depth - 1])


def min_pairs(alpha: float) -> int:
    """The fewest pairs for which any signed-rank interval reaches level 1 - alpha:
    2^-n <= alpha/2 (all n pairs on one side is the least likely outcome)."""
    return max(1, math.ceil(math.log2(2 / alpha)))


@dataclass(frozen=True)
class Interval:
    """Hodges-Lehmann estimate of the shift of ``n`` paired log-ratios with its Wilcoxon
    signed-rank interval at level ``1 - alpha`` (``low``/``high`` -inf/inf when ``n`` is too
    small for that level). ``ratio``/``ratio_low``/``ratio_high``: the same as B/A ratios."""

    n: int
    estimate: float
    low: float
    high: float
    alpha: float

    @property
    def ratio(self) -> float:
        return math.exp(self.estimate)

    @property
    def ratio_low(self) -> float:
        return math.exp(self.low) if math.isfinite(self.low) else 0.0

    @property
    def ratio_high(self) -> float:
        return math.exp(self.high) if math.isfinite(self.high) else math.inf


def shift_interval(d: Sequence[float], alpha: float = 0.05) -> Interval:
    """Hodges-Lehmann shift of ``d`` and its (1 - alpha) Wilcoxon signed-rank interval:
    [W_(C), W_(M+1-C)] of the M sorted Walsh averages, C = `signed_rank_depth`."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x = np.asarray(d, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, -math.inf, math.inf, alpha)
    w = walsh_averages(x)
    depth = signed_rank_depth(n, alpha)
    est = float(np.median(w))
    if depth < 1:
        return Interval(n, est, -math.inf, math.inf, alpha)
    return Interval(n, est, float(w[depth - 1]), float(w[len(w) - depth]), alpha)


def verdict(iv: Interval, min_effect: float) -> str:
    """`slower` when the ratio interval lies wholly above 1 + min_effect, `faster` wholly
    below 1 - min_effect, `same` wholly inside [1 - min_effect, 1 + min_effect], else
    `undecided` (it straddles a bound, or there are too few pairs for any interval)."""
    lo, hi = iv.ratio_low, iv.ratio_high
    if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        return "undecided"
    if lo > 1 + min_effect:
        return "slower"
    if hi < 1 - min_effect:
        return "faster"
    if lo >= 1 - min_effect and hi <= 1 + min_effect:
        return "same"
    return "undecided"


FINAL_SHARE = 0.5  # of alpha kept for the look at the end (budget spent), where the pairs are most


def look_alpha(alpha: float, look: int, tests: int, final: bool = False) -> float:
    """The error each test may spend at interim look ``look`` (1, 2, ...) or, ``final``, at
    the one look made when the budget ends: Bonferroni over ``tests`` tests; FINAL_SHARE of
    alpha goes to the final look, the rest over the interim looks as share/(k(k+1)) at look k
    (a sum of at most the rest, however many looks there are). So stopping at the first
    settled look keeps the family's false-alarm rate at most ``alpha``, and the end of the
    budget -- where most gates end -- is not judged at a level shrunk by every earlier look."""
    if look < 1 or tests < 1:
        raise ValueError("look and tests must be >= 1")
    if final:
        return alpha * FINAL_SHARE / tests
    return alpha * (1 - FINAL_SHARE) / tests / (look * (look + 1))


def look_schedule(first: int, growth: float = 1.4, limit: int = 100_000) -> list[int]:
    """Pair counts at which the verdicts are looked at: first, then growing by ``growth``."""
    out, n = [], max(1, first)
    while n <= limit:
        out.append(n)
        n = max(n + 1, int(round(n * growth)))
    return out


def severity_key(verdict_name: str, ratio: float) -> tuple:
    """Sort key: slower first (largest ratio first), then undecided, faster, same."""
    r = ratio if math.isfinite(ratio) else 1.0
    return (VERDICTS.index(verdict_name), -r if verdict_name in ("slower", "undecided") else r)

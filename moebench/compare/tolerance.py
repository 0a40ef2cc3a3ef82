"""Cross-machine tolerance for training rows (docs/training.md, "Reproducible across machines").

A trained router's final metrics are bit-for-bit reproducible on one machine for a seed, but
not across CPUs: a last-bit float difference (a different BLAS kernel or summation order) can
flip a tie in a BASE assignment or in the capacity cut (which tokens an over-full expert
keeps), and training amplifies a flipped decision into a visibly different end value. So
``moebench compare`` judges a training row's metric with this rule:

    A metric that carries a 95% interval over seeds (``<m>_ci_low``/``<m>_ci_high``) on both
    sides is ``unchanged`` when the two means differ by no more than the wider half-width
    of the two intervals (each mean lies within the other side's seed spread); its detail
    says "within seed spread". Otherwise the exact rule (rel 1e-6) stands.

The rule only relaxes: it never turns an unchanged verdict into a change, and it leaves
measured times and rows that are not training rows (``kind`` != train) alone.
"""

from __future__ import annotations

import math

SEED_SPREAD = "within seed spread (training rows: cross-machine rule, docs/training.md)"


def _half_width(row: dict, metric: str) -> float | None:
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        return None
    if math.isnan(low) or math.isnan(high) or high < low:
        return None
    return (high - low) / 2


def within_seed_spread(metric: str, a: float | None, b: float | None, row_a: dict, row_b: dict) -> bool:
    """True when training rows ``row_a``/``row_b`` agree on ``metric`` under the rule above."""
    if a is None or b is None or row_a.get("kind") != "train" or row_b.get("kind") != "train":
        return False
    halves = [h for h in (_half_width(row_a, metric), _half_width(row_b, metric)) if h is not None]
    if len(halves) < 2:
        return False
    return abs(b - a) <= max(halves)


def tolerate_training(verdict, row_a: dict, row_b: dict) -> None:
    """Set a deterministic verdict on a training row to unchanged when the cross-machine rule
    holds (``verdict`` has ``metric``, ``a``, ``b``, ``verdict``, ``detail``)."""
    if verdict.verdict in ("worse", "better", "changed") and within_seed_spread(
            verdict.metric, verdict.a, verdict.b, row_a, row_b):
        verdict.verdict, verdict.detail = "unchanged", SEED_SPREAD

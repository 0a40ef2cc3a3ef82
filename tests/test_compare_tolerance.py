"""The cross-machine rule for training rows (moebench/compare/tolerance.py, docs/training.md)."""

from __future__ import annotations

from types import SimpleNamespace

from moebench.compare.tolerance import SEED_SPREAD, tolerate_training, within_seed_spread


def train_row(mean, low, high, kind="train"):
    return {"kind": kind, "eval_loss": mean, "eval_loss_ci_low": low, "eval_loss_ci_high": high}


def test_within_the_wider_half_width_is_unchanged():
    a, b = train_row(1.00, 0.90, 1.10), train_row(1.08, 1.03, 1.13)  # halves 0.10 and 0.05
    assert within_seed_spread("eval_loss", 1.00, 1.08, a, b)
    assert not within_seed_spread("eval_loss", 1.00, 1.11, a, train_row(1.11, 1.06, 1.16))


def test_only_training_rows_with_intervals_on_both_sides():
    a, b = train_row(1.0, 0.9, 1.1), train_row(1.01, 0.9, 1.1, kind=None)
    assert not within_seed_spread("eval_loss", 1.0, 1.01, a, b)
    assert not within_seed_spread("eval_loss", 1.0, 1.01, a, {"kind": "train"})
    assert not within_seed_spread("eval_loss", None, 1.01, a, a)


def test_verdict_relaxed_never_tightened():
    a, b = train_row(1.00, 0.90, 1.10), train_row(1.05, 0.95, 1.15)
    worse = SimpleNamespace(metric="eval_loss", a=1.00, b=1.05, verdict="worse", detail="")
    tolerate_training(worse, a, b)
    assert (worse.verdict, worse.detail) == ("unchanged", SEED_SPREAD)
    far = SimpleNamespace(metric="eval_loss", a=1.00, b=1.50, verdict="worse", detail="")
    tolerate_training(far, a, train_row(1.5, 1.45, 1.55))
    assert far.verdict == "worse"
    same = SimpleNamespace(metric="eval_loss", a=1.0, b=1.0, verdict="unchanged", detail="")
    tolerate_training(same, a, a)
    assert same.detail == ""

"""Routing metrics (docs/spec.md §4) and the direction of every column a row can carry.

`routing_metrics(routing)` is pure over a Routing: balance, drops, losses and router
behaviour. Every metric declares whether higher or lower is better (or neither) so that
comparisons never guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Iterator

import torch

from moebench.core import kinds
from moebench.core.errors import MoebenchError
from moebench.core.kinds import Direction, Metric  # noqa: F401  (Metric and Direction are read from here)
from moebench.core.routing import Routing
from moebench.core.rows import PHASES  # noqa: F401 (read from here by most callers)


_ROUTING_METRICS = [
    Metric("imbalance", "lower", True, "max_e c_e / mean_e c_e (1.0 is perfect; sets the straggler)"),
    Metric("cv", "lower", True, "std(c)/mean(c), population std"),
    Metric("entropy", "higher", True, "H(c/sum c)/ln E (1.0 is perfect)"),
    Metric("gini", "lower", True, "Gini coefficient of the loads c"),
    Metric("idle_experts", "lower", True, "#{e : c_e = 0}"),
    Metric("min_load", "higher", True, "smallest expert load"),
    Metric("max_load", "lower", True, "largest expert load"),
    Metric("drop_rate", "lower", True, "(sum d - sum c)/sum d over assignments"),
    Metric("token_drop_rate", "lower", True, "fraction of tokens with no kept assignment"),
    Metric("experts_per_token_min", "none", True, "fewest kept experts of any token"),
    Metric("experts_per_token_mean", "none", True, "mean kept experts per token"),
    Metric("experts_per_token_max", "none", True, "most kept experts of any token"),
    Metric("expert_usage", "higher", True, "sum c/(E*C); dropless: C is the max load (padding cost)"),
    Metric("aux_loss", "lower", True,
           "E * sum_e f_e P_e, f_e = d_e/(k T) (gshard: 1st choices / T), P_e = mean_t p_te (1.0 balanced)"),
    Metric("z_loss", "lower", True, "mean_t logsumexp(x_t)^2"),
    Metric("importance_cv2", "lower", True, "CV^2 of per-expert sums of gate weights (Shazeer 2017)"),
    Metric("load_cv2", "lower", True, "CV^2 of per-expert demand d (Shazeer 2017, hard counts)"),
    Metric("router_confidence", "none", True, "mean over tokens of the sum of kept combine weights"),
    Metric("gate_entropy", "none", True, "mean_t H(p_t) in nats"),
]

_PHASE_FIELDS = [
    Metric("median_ms", "lower", False, "median time of one call"),
    Metric("mean_ms", "lower", False, "mean time of one call"),
    Metric("iqr_ms", "lower", False, "interquartile range of the call times"),
    Metric("min_ms", "lower", False, "fastest call"),
    Metric("max_ms", "lower", False, "slowest call"),
    Metric("ci_low_ms", "lower", False, "lower end of the 95% CI of the median"),
    Metric("ci_high_ms", "lower", False, "upper end of the 95% CI of the median"),
    Metric("ci_coverage", "none", False,
           "actual coverage of [ci_low, ci_high]; with too few rounds for a 95% CI (then null), that of min-max"),
    Metric("rounds", "none", False, "timed calls"),
    Metric("q1_ms", "lower", False, "25th percentile of the call times"),
    Metric("q3_ms", "lower", False, "75th percentile of the call times"),
    Metric("stdev_ms", "lower", False, "sample standard deviation of the call times"),
    Metric("tokens_per_s", "higher", False, "tokens / median time"),
    Metric("peak_mem_bytes", "lower", False, "extra peak memory of one call (where measurable)"),
    Metric("x_memcopy", "lower", False,
           "median / median of a clone of the phase's input in the same case (logits for route, hidden for dispatch/combine)"),
]


ROUTING_METRICS: dict[str, Metric] = {m.name: m for m in _ROUTING_METRICS}
PHASE_METRICS: dict[str, Metric] = {
    f"{phase}.{f.name}": Metric(f"{phase}.{f.name}", f.direction, False, f"{phase}: {f.description}")
    for phase in PHASES for f in _PHASE_FIELDS}

_ALL: tuple[dict, dict[str, Metric], list[Metric]] | None = None  # (the kinds they come from, exact, patterns)


def _tables() -> tuple[dict[str, Metric], list[Metric]]:
    global _ALL
    found = kinds.kinds()
    if _ALL is None or _ALL[0] is not found:  # built again when the kinds registry is
        exact: dict[str, Metric] = dict(ROUTING_METRICS)
        for kind in found.values():
            for m in kind.metrics:
                seen = exact.get(m.name) or PHASE_METRICS.get(m.name)
                if seen is not None and (seen.direction, seen.deterministic) != (m.direction, m.deterministic):
                    raise MoebenchError(f"kind {kind.name!r}: metric {m.name!r} is {m.direction}/"
                                        f"{'deterministic' if m.deterministic else 'measured'}, but it is already "
                                        f"{seen.direction}/{'deterministic' if seen.deterministic else 'measured'}")
                exact.setdefault(m.name, m)
        exact.update(PHASE_METRICS)
        _ALL = (found, exact, [m for m in exact.values() if "*" in m.name])
    return _ALL[1], _ALL[2]


def all_metrics() -> dict[str, Metric]:
    """name -> Metric for every column a row of any kind can carry: the routing metrics, each
    kind's metrics (in kind order), then the phase times. A name with ``*`` stands for a
    family of columns (see `metric`)."""
    return dict(_tables()[0])


def metric(column: str) -> Metric | None:
    """The Metric of a row column: by its name, else that of the first family (``*`` name) it
    matches, named ``column``; None for a column that is no metric (an axis, a label, JSON)."""
    exact, patterns = _tables()
    found = exact.get(column)
    if found is None:
        family = next((m for m in patterns if fnmatchcase(column, m.name)), None)
        found = replace(family, name=column) if family else None
    return found


def direction(column: str) -> Direction:
    """Which way is better for a row column ('none' for columns that are not metrics)."""
    found = metric(column)
    return found.direction if found else "none"


class _AllMetrics(Mapping):
    """`METRICS`: a read-only view of `all_metrics()`, filled on first use (the kinds load
    then), so every reader sees each kind's metrics."""

    def __getitem__(self, name: str) -> Metric:
        return _tables()[0][name]

    def __iter__(self) -> Iterator[str]:
        return iter(_tables()[0])

    def __len__(self) -> int:
        return len(_tables()[0])

    def __repr__(self) -> str:
        return f"METRICS({len(self)} metrics)"


METRICS: Mapping[str, Metric] = _AllMetrics()


def _cv(x: torch.Tensor) -> float:
    mean = x.mean()
    return float(x.std(unbiased=False) / mean) if mean > 0 else math.nan


def _gini(x: torch.Tensor) -> float:
    total = x.sum()
    if total <= 0:
        return math.nan
    s, _ = torch.sort(x)
    n = s.numel()
    i = torch.arange(1, n + 1, dtype=s.dtype, device=s.device)
    return float(((2 * i - n - 1) * s).sum() / (n * total))


def _entropy(dist: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(dist * torch.log(dist.clamp_min(1e-30))).sum(dim)


def expert_loads(routing: Routing) -> torch.Tensor:
    """<float64>[E]: the load c each expert processes.

    Sparse routers: kept assignments. Soft MoE: each expert takes S slots, so counts are equal by
    construction; its load is the combine-weight mass each expert's output receives instead.
    """
    if routing.soft is not None:
        mass = torch.zeros(routing.num_experts, dtype=torch.float64, device=routing.weight.device)
        return mass.index_add_(0, routing.expert_index, routing.weight.double())
    return routing.load().double()


def routing_metrics(routing: Routing) -> dict[str, float]:
    """All routing metrics of one batch as plain floats (see ROUTING_METRICS for their meaning)."""
    e, t, k = routing.num_experts, routing.num_tokens, routing.top_k
    c = expert_loads(routing)
    d = routing.demand().double()
    total = float(c.sum())
    per_token = routing.kept_experts_per_token()
    probs = routing.probs.double()
    logits = routing.logits.double()
    capacity = routing.capacity if routing.capacity is not None else float(c.max())
    gates = torch.zeros(e, dtype=torch.float64, device=c.device).index_add_(
        0, routing.expert_index, routing.weight.double()
    )
    if routing.aux_counts == "first":  # GShard Algorithm 1: 1st choices only, before capacity
        first = routing.choice == 0
        f = torch.bincount(routing.expert_index[first], minlength=e).double() / t
    else:
        f = d / (k * t)
    return {
        "imbalance": float(c.max() / c.mean()) if total > 0 else math.nan,
        "cv": _cv(c),
        "entropy": float(_entropy(c / total) / math.log(e)) if total > 0 else math.nan,
        "gini": _gini(c),
        "idle_experts": int((c == 0).sum()),
        "min_load": float(c.min()),
        "max_load": float(c.max()),
        "drop_rate": float((d.sum() - routing.load().sum()) / d.sum()) if d.sum() > 0 else 0.0,
        "token_drop_rate": float((per_token == 0).double().mean()),
        "experts_per_token_min": int(per_token.min()),
        "experts_per_token_mean": float(per_token.double().mean()),
        "experts_per_token_max": int(per_token.max()),
        "expert_usage": total / (e * capacity) if capacity > 0 else math.nan,
        "aux_loss": float(e * (f * probs.mean(0)).sum()),
        "z_loss": float((torch.logsumexp(logits, dim=-1) ** 2).mean()),
        "importance_cv2": _cv(gates) ** 2,
        "load_cv2": _cv(d) ** 2,
        "router_confidence": float(routing.kept_weight_per_token().double().mean()),
        "gate_entropy": float(_entropy(probs).mean()),
    }


def mean_over_batches(per_batch: list[dict]) -> dict:
    """Each metric's mean over a stream's batches (``routing_metrics`` of each), ignoring the
    batches where it is undefined (None or NaN); NaN where it is undefined in all."""
    out = {}
    for key in per_batch[0]:
        values = [m[key] for m in per_batch if m[key] is not None and not math.isnan(m[key])]
        out[key] = sum(values) / len(values) if values else math.nan
    return out

"""Routing metrics (docs/spec.md §4) and the direction of every column a row can carry.

`routing_metrics(routing)` is pure over a Routing: balance, drops, losses and router
behaviour. Every metric declares whether higher or lower is better (or neither) so that
comparisons never guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from moebench.core.routing import Routing

Direction = Literal["lower", "higher", "none"]


@dataclass(frozen=True)
class Metric:
    """name, direction (which way is better), whether the value is reproducible bit-for-bit
    from the seed (deterministic) or a measurement (timing), and what it means."""

    name: str
    direction: Direction
    deterministic: bool
    description: str


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

# Final-row columns of trained routers (moebench/kinds/train/; end of training, mean over seeds).
# Each also has <name>_ci_low/_ci_high (95% interval over seeds, direction none).
_TRAIN_METRICS = [
    Metric("train_loss", "lower", True, "task loss on the training batches of the last eval interval"),
    Metric("eval_loss", "lower", True, "task loss on the held-out set"),
    Metric("perplexity", "lower", True, "exp(eval_loss) on a language task"),
    Metric("maxvio_batch", "lower", True, "(max c - mean c)/mean c per held-out batch, mean over batches"),
    Metric("maxvio_global", "lower", True, "(max c - mean c)/mean c over the whole held-out set"),
    Metric("maxvio_batch_worst", "lower", True, "largest maxvio_batch at any evaluation of any seed"),
    Metric("train_maxvio_batch", "lower", True, "maxvio of the training batches of the last eval interval"),
    Metric("dead_experts", "lower", True, "experts receiving no token over the held-out set"),
    Metric("nmi", "higher", True, "normalised mutual information of ground-truth group and chosen expert"),
    Metric("fluctuation", "lower", True, "share of probe tokens whose top-1 expert changed in the last interval"),
    Metric("settle_step", "lower", True, "mean over probe tokens of the last step their top-1 expert changed"),
    Metric("bias_flip_rate", "none", True,
           "share of experts whose expert-bias update reversed direction from one step to the next (last interval)"),
    Metric("maxvio_global_floor", "none", True,
           "expected maxvio_global of an ideal balanced token-choice router: each held-out token on k uniform random experts"),
    Metric("maxvio_batch_floor", "none", True, "the same floor for one batch of the case's tokens"),
    Metric("seeds_trained", "none", True, "training seeds aggregated in the row"),
    Metric("train.step_ms", "lower", False, "median wall time of one training step (last interval)"),
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

PHASES = ("route", "dispatch", "combine")

METRICS: dict[str, Metric] = {m.name: m for m in _ROUTING_METRICS}
for _m in _TRAIN_METRICS:
    METRICS[_m.name] = _m
for _name in ("train_loss", "eval_loss", "perplexity", "maxvio_batch", "maxvio_global", "train_maxvio_batch",
              "imbalance", "drop_rate", "dead_experts", "gate_entropy", "aux_loss", "z_loss", "nmi",
              "fluctuation", "settle_step", "bias_flip_rate"):  # = moebench.kinds.train.aggregate.FINAL
    for _end in ("ci_low", "ci_high"):
        METRICS[f"{_name}_{_end}"] = Metric(f"{_name}_{_end}", "none", True, f"95% interval over seeds of {_name}: {_end}")
for _phase in PHASES:
    for _f in _PHASE_FIELDS:
        METRICS[f"{_phase}.{_f.name}"] = Metric(f"{_phase}.{_f.name}", _f.direction, False, f"{_phase}: {_f.description}")


# Columns of parallel rows (moebench/kinds/parallel/rows.py). Engine rows measure times on the
# ranks (not reproducible); the rank loads and traffic shares follow from the routing. Model rows
# carry ``model.ep<N>.<field>``, all predicted by the cost model from the routing: reproducible.
_PARALLEL_METRICS = [
    Metric("rank_imbalance", "lower", True, "max / mean of the rows each rank's experts process"),
    Metric("rank_imbalance_contiguous", "lower", True, "rank_imbalance of the same routing on the contiguous layout"),
    Metric("remote_fraction", "lower", True, "share of dispatched rows that leave their rank"),
    Metric("inter_node_fraction", "lower", True, "share of dispatched rows that cross nodes"),
    Metric("straggler_ratio", "lower", False, "slowest rank's layer time / mean over ranks"),
    Metric("expert_straggler_ratio", "lower", False, "slowest rank's expert time / mean over ranks"),
    *(Metric(f"{p}_ms", "lower", False, f"{p}: max over ranks of each rank's median")
      for p in ("layer", "a2a", "expert", "permute", "dispatch", "combine", "unpermute")),
]
_MODEL_FIELDS = {f: "lower" for f in ("dispatch_ms", "combine_ms", "expert_ms", "layer_ms", "rank_imbalance",
                                      "straggler_ratio", "remote_fraction")}


def all_metrics() -> dict[str, Metric]:
    """Every metric with a fixed column name, by name (routing, training, phase, parallel). Model
    rows' ``model.ep<N>.<field>`` columns are found by :func:`metric`."""
    return {**METRICS, **{m.name: m for m in _PARALLEL_METRICS}}


def metric(column: str) -> Metric | None:
    """The Metric of a row column, or None when the column is not a metric (an axis, a label)."""
    found = METRICS.get(column) or next((m for m in _PARALLEL_METRICS if m.name == column), None)
    if found:
        return found
    head, _, field = column.rpartition(".")
    if head.startswith("model.ep") and head[8:].isdigit() and field in _MODEL_FIELDS:
        return Metric(column, _MODEL_FIELDS[field], True, f"cost model at EP {head[8:]}: {field}")
    return None


def direction(column: str) -> Direction:
    """Which way is better for a row column ('none' for columns that are not metrics)."""
    found = metric(column)
    return found.direction if found else "none"


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
    """All routing metrics of one batch as plain floats (see METRICS for their meaning)."""
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

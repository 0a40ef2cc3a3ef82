"""Drop policies (docs/spec.md §2): which assignments keep a slot when demand exceeds capacity.

Every policy is a *priority*: a total order over assignments (lower value = served first).
One function, `keep_within_capacity`, then keeps the first C assignments of each expert in
that order, so the policies differ only in how they rank.
"""

from __future__ import annotations

from typing import Callable

import torch

from moebench.core import kernels
from moebench.core.case import DROP_POLICY_NAMES
from moebench.core.errors import UnknownNameError

# priority(expert <int64>[k, T], scores <float32>[k, T], generator) -> <int64>[k, T]
PriorityFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]


def stable_rank(values: torch.Tensor) -> torch.Tensor:
    """<int64>[N]: position of each value in a stable ascending sort (ties keep input order)."""
    order = torch.sort(values, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(values.numel(), device=values.device)
    return ranks


def position_priority(expert, scores, generator=None):
    """GShard/Switch: all 1st choices in token order, then all 2nd choices, ..."""
    k, t = expert.shape
    return torch.arange(k * t, device=expert.device).view(k, t)


def probs_priority(expert, scores, generator=None):
    """Megatron-Core `probs`: highest score first within each expert (ties: position order)."""
    return stable_rank(-scores.float().reshape(-1)).view_as(expert)


def bpr_priority(expert, scores, generator=None):
    """V-MoE Batch Prioritized Routing: choice rank first, then the token's max score, descending.

    `TokenChoiceRouter.finish` passes it the token's top router probability max_e p_{t,e}
    (before renormalisation) repeated over the k choices, so the max here is that (RANKED_BY).
    """
    k, t = expert.shape
    token_order = stable_rank(-scores.float().max(dim=0).values)  # [T]
    return (torch.arange(k, device=expert.device)[:, None] * t + token_order[None, :])


def random_priority(expert, scores, generator=None):
    """Random Token Selection (DeepSpeed): choice rank first, then a seeded random token order."""
    k, t = expert.shape
    token_order = torch.randperm(t, generator=generator, device=expert.device)
    return torch.arange(k, device=expert.device)[:, None] * t + token_order[None, :]


DROP_POLICIES: dict[str, PriorityFn] = {
    "position": position_priority,
    "probs": probs_priority,
    "bpr": bpr_priority,
    "random": random_priority,
}
if tuple(DROP_POLICIES) != DROP_POLICY_NAMES:  # the suite validator knows the names without torch
    raise TypeError(f"DROP_POLICIES {tuple(DROP_POLICIES)} do not match core/case.py DROP_POLICY_NAMES {DROP_POLICY_NAMES}")


# What a policy's ``scores`` argument holds (built by `TokenChoiceRouter.finish`): "weight",
# each assignment's combine weight (the default); "top_prob", the token's largest router
# probability max_e p_{t,e} before any renormalisation over the k chosen, repeated over its
# k choices (V-MoE BPR ranks by that, not by the possibly renormalised weight: docs/spec.md §2).
RANKED_BY: dict[str, str] = {"bpr": "top_prob"}


def ranked_by(name: str) -> str:
    """"weight" or "top_prob": what policy ``name`` ranks assignments by (see RANKED_BY)."""
    return RANKED_BY.get(name, "weight")


# keep(expert <int64>[k, T], scores <float32>[k, T], capacity, num_experts) -> <bool>[k*T]
KeepFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _keep_position_kernel(expert, scores, capacity, num_experts):
    return kernels.keep_position(expert, capacity, num_experts)  # position ignores the scores


# Exact numba forms of `keep_within_capacity(expert, priority(...), ...)`, each registered
# with the priority it reproduces: a policy whose priority is replaced loses its fast form.
FAST_KEEP: dict[str, tuple[PriorityFn, KeepFn]] = {
    "position": (position_priority, _keep_position_kernel),
    "probs": (probs_priority, kernels.keep_by_score),
}


def fast_keep(name: str) -> KeepFn | None:
    """The numba capacity kernel that computes exactly what policy ``name`` keeps, or None."""
    entry = FAST_KEEP.get(name)
    if entry is None or DROP_POLICIES.get(name) is not entry[0]:
        return None
    return entry[1]


def get_drop_policy(name: str) -> PriorityFn:
    try:
        return DROP_POLICIES[name]
    except KeyError:
        raise UnknownNameError("drop policy", name, list(DROP_POLICIES)) from None


def keep_within_capacity(
    expert: torch.Tensor, priority: torch.Tensor, capacity: int, num_experts: int, span: int | None = None
) -> torch.Tensor:
    """<bool>[A]: True for the first ``capacity`` assignments of each expert by priority.

    expert   <int64>[A]: expert of each assignment.
    priority <int64>[A]: distinct values in [0, span) (lower is served first); span defaults to A.
    Cost is one sort of A keys, independent of E beyond a bincount: no [T, E, C] tensors.
    """
    a = expert.numel()
    span = a if span is None else span
    order = torch.argsort(expert * span + priority)  # keys are unique: no stability needed
    sorted_expert = expert[order]
    counts = torch.bincount(sorted_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(a, device=expert.device) - starts[sorted_expert]
    kept = torch.empty(a, dtype=torch.bool, device=expert.device)
    kept[order] = position < capacity
    return kept

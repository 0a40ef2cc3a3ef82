"""What a training run records at each evaluation: balance (MaxVio), specialisation (NMI),
routing fluctuation on a fixed probe set. Pure functions over Routings and tensors.

- MaxVio = (max_e c_e - mean_e c_e) / mean_e c_e (Wang et al. 2024, "Auxiliary-Loss-Free Load
  Balancing"), over the loads c of one batch (MaxVio_batch) or of the whole held-out set
  (MaxVio_global). The loads are `balance_loads`: assignments each expert is asked for before
  capacity (what the balancing mechanism controls); for routers that send every token to
  every expert (dense softmax, Soft MoE) the combine-weight mass each expert receives.
- NMI(truth, expert) = I / ((H(truth) + H(expert)) / 2) (arithmetic normalisation, as
  scikit-learn's default); expert = the expert with the largest kept combine weight of the
  token, or "none" (label E) for a token no expert kept.
- Fluctuation (StableMoE, Dai et al. 2022): the share of probe tokens whose top-1 expert (largest
  combine weight over all its assignments, before capacity) changed since the last evaluation,
  and for each probe token the last step at which it changed.
"""

from __future__ import annotations

import math

import torch

from moebench.routing import Routing


def weight_matrix(routing: Routing, kept_only: bool) -> torch.Tensor:
    """<float32>[T, E]: each token's combine weight per expert (0 where it has no assignment);
    entries of tokens with no assignment at all are -1 so they can be told apart."""
    t, e = routing.num_tokens, routing.num_experts
    mask = routing.kept if kept_only else torch.ones_like(routing.kept)
    w = torch.full((t, e), -1.0, device=routing.weight.device)
    has = torch.zeros(t, dtype=torch.bool, device=w.device)
    has[routing.token_index[mask]] = True
    w[has] = 0.0
    w[routing.token_index[mask], routing.expert_index[mask]] = routing.weight.detach().float()[mask]
    return w


def chosen_expert(routing: Routing, kept_only: bool = True) -> torch.Tensor:
    """<int64>[T]: the expert with the largest (kept) combine weight of each token; E for a token
    with none (ties: lowest index)."""
    w = weight_matrix(routing, kept_only)
    top = w.argmax(dim=1)
    return torch.where(w.max(dim=1).values < 0, routing.num_experts, top)


def is_all_to_all(routing: Routing) -> bool:
    """Every token goes to every expert (dense softmax, Soft MoE): counts say nothing."""
    return routing.soft is not None or (
        routing.capacity is None and routing.expert_index.numel() == routing.num_tokens * routing.num_experts
        and bool((routing.demand() == routing.num_tokens).all()))


def balance_loads(routing: Routing) -> torch.Tensor:
    """<float64>[E]: demand per expert (assignments asked for, before capacity), or the
    combine-weight mass for all-to-all routers (see the module docstring)."""
    if is_all_to_all(routing):
        mass = torch.zeros(routing.num_experts, dtype=torch.float64, device=routing.weight.device)
        return mass.index_add_(0, routing.expert_index, routing.weight.detach().double())
    return routing.demand().double()


def maxvio(loads: torch.Tensor) -> float:
    """(max c - mean c) / mean c; nan for no load."""
    mean = float(loads.double().mean())
    return (float(loads.max()) - mean) / mean if mean > 0 else math.nan


def dead_experts(loads: torch.Tensor, all_to_all: bool) -> int:
    """Experts that receive nothing over the held-out set (all-to-all: under 1% of the mean mass)."""
    if all_to_all:
        return int((loads < 0.01 * loads.double().mean()).sum())
    return int((loads == 0).sum())


def contingency(truth: torch.Tensor, expert: torch.Tensor, groups: int, labels: int) -> torch.Tensor:
    """<int64>[groups, labels]: counts of (truth, expert) pairs."""
    flat = truth.long() * labels + expert.long()
    return torch.bincount(flat, minlength=groups * labels).view(groups, labels)


def nmi(table: torch.Tensor) -> float:
    """Normalised mutual information of a contingency table (arithmetic mean of the entropies);
    1.0 when either variable is constant and so is the other, 0.0 when only one is."""
    p = table.double() / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    h = lambda q: float(-(q[q > 0] * q[q > 0].log()).sum())  # noqa: E731
    ha, hb = h(pa), h(pb)
    if ha == 0 and hb == 0:
        return 1.0
    if ha == 0 or hb == 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    return max(0.0, mi / ((ha + hb) / 2))


class Fluctuation:
    """Tracks the probe set's top-1 experts across evaluations."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.last_change: torch.Tensor | None = None

    def update(self, top1: torch.Tensor, step: int) -> float | None:
        """The share of probe tokens whose top-1 changed since the last call (None on the first)."""
        top1 = top1.cpu()
        if self.previous is None:
            self.previous, self.last_change = top1, torch.zeros_like(top1)
            return None
        changed = top1 != self.previous
        self.last_change[changed] = step
        self.previous = top1
        return float(changed.double().mean())

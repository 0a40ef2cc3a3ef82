"""What a training run records at each evaluation: balance (MaxVio), specialisation (NMI),
routing fluctuation on a fixed probe set. Pure functions over Routings and tensors.

- MaxVio = (max_e c_e - mean_e c_e) / mean_e c_e (Wang et al. 2024, "Auxiliary-Loss-Free Load
  Balancing"), over the loads c of one batch (MaxVio_batch) or of the whole held-out set
  (MaxVio_global). The loads are `balance_loads`: assignments each expert is asked for before
  capacity (what the balancing mechanism controls); for routers that send every token to
  every expert (dense softmax, Soft MoE) the combine-weight mass each expert receives.
- MaxVio floor (`maxvio_floor`): the expected MaxVio of an ideal balanced router whose loads are
  pure sampling noise: each of n tokens goes to k distinct experts drawn uniformly at random
  (k = 1: the loads are Multinomial(n, 1/E)). A router whose expected loads are exactly equal
  still shows this MaxVio on n held-out tokens (n = 1024, E = 8, k = 1: 0.128), so a measured
  MaxVio_global near it is as balanced as n tokens can show. k = 1 is exact up to n = 200000: with Poisson
  pmf p_j (mean n/E), P(max <= m) = (p_{<=m} convolved E times)[n] / Poisson(n; n), and
  E[max] = sum_m P(max > m); k > 1 is a fixed-seed Monte Carlo (2^14 draws of the C(E, k)
  subsets' multinomial counts: standard error 0.1-0.3% of the value; with more subsets, tokens
  drawn one by one; where that would take over 2*10^8 random numbers, a Gaussian with the
  loads' exact covariance, 1.5-3% low).
- NMI(truth, expert) = I / ((H(truth) + H(expert)) / 2) (arithmetic normalisation, as
  scikit-learn's default); expert = the expert with the largest kept combine weight of the
  token, or "none" (label E) for a token no expert kept.
- Fluctuation (StableMoE, Dai et al. 2022): the share of probe tokens whose top-1 expert (largest
  combine weight over all its assignments, before capacity) changed since the last evaluation,
  and for each probe token the last step at which it changed.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from scipy import stats

from moebench.core.routing import Routing


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


FLOOR_DRAWS = 1 << 14  # Monte Carlo draws of the k > 1 floor (standard error 0.1-0.3% of it)
FLOOR_SEED = 20240801
FLOOR_EXACT_TOKENS = 200_000  # the exact k = 1 floor up to here (~1 s); beyond, the Gaussian
FLOOR_SUBSETS = 4096  # up to this many k-subsets, draw the subsets' counts; beyond, token by token
FLOOR_TOKEN_BUDGET = 50_000_000  # random numbers the token-by-token draw may use


@functools.lru_cache(maxsize=256)
def maxvio_floor(tokens: int, experts: int, k: int = 1) -> float:
    """Expected MaxVio of the loads when each of ``tokens`` tokens picks ``k`` distinct experts of
    ``experts`` uniformly at random (module docstring); 0.0 when k = E, nan for no token."""
    if tokens < 0 or experts < 1 or not 1 <= k <= experts:
        raise ValueError(f"maxvio_floor: need tokens >= 0 and 1 <= k <= experts, got {tokens}, {experts}, {k}")
    if tokens == 0:
        return math.nan
    if k == experts or experts == 1:
        return 0.0
    if k == 1 and tokens <= FLOOR_EXACT_TOKENS:
        return _multinomial_floor(tokens, experts)
    if k == 1:
        return _gaussian_floor(tokens, experts, 1)
    return _subset_floor(tokens, experts, k)


def _multinomial_floor(n: int, e: int) -> float:
    """Exact E[(max c - mean c)/mean c] for c ~ Multinomial(n, uniform over e)."""
    lam = n / e
    low = max(0, math.floor(lam - 12 * math.sqrt(lam) - 2))  # below: Poisson mass < 1e-31
    reference = float(stats.poisson.pmf(n, n))
    m = -(-n // e)  # the largest load is at least ceil(n / e): P(max > m) = 1 below it
    expected_max = float(m)
    while m < n:
        bound = e * float(stats.binom.sf(m, n, 1 / e))  # union bound on P(max > m)
        if bound < 1e-13:
            break
        pmf = stats.poisson.pmf(np.arange(low, m + 1), lam)
        size = 1 << (e * (len(pmf) - 1)).bit_length()
        at_most = float(np.fft.irfft(np.fft.rfft(pmf, size) ** e, size)[n - e * low]) / reference
        expected_max += min(bound, max(0.0, 1.0 - at_most))
        m += 1
    return (expected_max - lam) / lam


def _subset_floor(n: int, e: int, k: int) -> float:
    """Fixed-seed Monte Carlo of E[MaxVio] for n tokens each on a uniform k-subset of e experts."""
    rng = np.random.default_rng(FLOOR_SEED)
    mean = n * k / e
    if math.comb(e, k) <= FLOOR_SUBSETS:
        members = np.zeros((math.comb(e, k), e))
        for row, subset in enumerate(itertools.combinations(range(e), k)):
            members[row, list(subset)] = 1.0
        total, done = 0.0, 0
        while done < FLOOR_DRAWS:  # chunks keep the count matrix small
            chunk = min(FLOOR_DRAWS - done, max(1, FLOOR_TOKEN_BUDGET // (10 * len(members))))
            loads = rng.multinomial(n, np.full(len(members), 1 / len(members)), size=chunk) @ members
            total += float(((loads.max(axis=1) - mean) / mean).sum())
            done += chunk
        return total / done
    if 256 * n * e > 4 * FLOOR_TOKEN_BUDGET:
        return _gaussian_floor(n, e, k)
    draws = max(256, min(FLOOR_DRAWS, FLOOR_TOKEN_BUDGET // (n * e)))
    total = 0.0
    for _ in range(draws):
        picks = np.argpartition(rng.random((n, e)), k - 1, axis=1)[:, :k]
        loads = np.bincount(picks.ravel(), minlength=e)
        total += (loads.max() - mean) / mean
    return total / draws


def _gaussian_floor(n: int, e: int, k: int) -> float:
    """The k > 1 floor where drawing every token is too costly: loads as a Gaussian with the
    subset counts' exact covariance. Each token's indicator has variance v = p(1-p), p = k/e,
    and the loads sum to n*k, so Cov = n*v*e/(e-1) * (I - J/e): a centred standard normal
    scaled. It reads 1.5-3% low at mean loads 100-1000 (the binomial's right skew)."""
    p = k / e
    z = np.random.default_rng(FLOOR_SEED).standard_normal((FLOOR_DRAWS, e))
    z -= z.mean(axis=1, keepdims=True)
    scale = math.sqrt(n * p * (1 - p) * e / (e - 1)) / (n * k / e)
    return float((z.max(axis=1) * scale).mean())


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

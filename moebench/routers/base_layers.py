"""BASE Layers: Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models".

Training-time routing is a *balanced assignment*: every expert receives T/E tokens (floor or
ceil when E does not divide T) and the assignment maximises the total affinity
sum_t x[t, a(t)]. This is a transportation problem (T tokens supplying one unit each, E
experts with quotas), solved here exactly by `balanced_assignment`:

1. Warm start (approximate, only for speed): a few damped Jacobi steps on the E expert prices
   v (each price moves towards the value that would give its expert its quota if the others
   stayed put). Any v yields a valid start, so this never affects optimality.
2. Exact phase: a(t) = argmax_e (x[t, e] - v_e) is an optimal flow for its own loads (all
   reduced costs are >= 0); successive shortest paths then move the surplus of overloaded
   experts to underloaded ones. Paths run on the *compressed* residual graph of E expert
   nodes (edge e -> e' costs min over tokens s on e of x[s, e] - x[s, e']) plus one node X
   that hands out the T mod E "ceil" slots, one per expert at most. Dijkstra with the prices
   as potentials keeps every step optimal, so the final assignment is an exact optimum
   (up to float64 rounding, like scipy's linear_sum_assignment).

Complexity: memory O(T*E) (no [T, T] matrix); time O(I*T*E) for I <= 50 warm steps plus
O(A*(E^2 + T)) for A augmentations, A = surplus left by the warm start (typically a handful;
worst case T); about 0.2-0.7 s at T=8192, E=64 on two CPU cores. Which T mod E experts
get the extra token is chosen by the optimiser (it is part of the maximisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moebench.routers.base import RouteContext, RouteInputs, Router
from moebench.routers.registry import register
from moebench.core.routing import Routing

_WARM_STEPS = 50
_WARM_DAMPING = 0.7
_WARM_STOP_SURPLUS = 8


def _warm_prices(x: np.ndarray, floor: int, ceil: int) -> np.ndarray:
    """<float64>[E]: approximate dual prices v (damped Jacobi quantile steps)."""
    t, e = x.shape
    rows = np.arange(t)
    v = np.zeros(e)
    xt = np.ascontiguousarray(x.T)
    kth = sorted({t - ceil, t - floor - 1} & set(range(t)))
    last = np.inf
    for _ in range(_WARM_STEPS):
        y = x - v
        best = y.argmax(1)
        first = y[rows, best]
        y[rows, best] = -np.inf
        second = y.max(1)
        surplus = np.maximum(np.bincount(best, minlength=e) - ceil, 0).sum()
        # stop when the rest is cheaper as augmentations (one step costs about E/2 of them)
        if surplus <= _WARM_STOP_SURPLUS or last - surplus < max(_WARM_STOP_SURPLUS, e // 2):
            break
        last = surplus
        # margin[e, t]: the price below which token t would prefer expert e, others fixed
        other = np.where(np.arange(e)[:, None] == best[None, :], second[None, :], first[None, :])
        part = np.partition(xt - other, kth, axis=1)
        hi = part[:, t - ceil]
        lo = part[:, t - floor - 1] if floor < t else hi - 1.0
        v += _WARM_DAMPING * ((hi + lo) / 2.0 - v)
    return v


def balanced_assignment(x: np.ndarray) -> np.ndarray:
    """Exact balanced assignment maximising sum_t x[t, a(t)].

    x <float64>[T, E] -> a <int64>[T]: every expert gets floor(T/E) or ceil(T/E) tokens
    (exactly T mod E of them get the ceil). See the module docstring for the algorithm.
    """
    x = np.asarray(x, dtype=np.float64)
    t, e = x.shape
    if not np.isfinite(x).all():
        raise ValueError("balanced_assignment: logits must be finite")
    if t == 0 or e == 1:
        return np.zeros(t, dtype=np.int64)
    floor, extra = divmod(t, e)
    ceil = floor + (extra > 0)
    prices = _warm_prices(x, floor, ceil)
    a = np.argmax(x - prices, axis=1)
    n = e + 1  # node e is X, the pool of the `extra` ceil slots
    uses_extra = np.zeros(e, dtype=bool)
    pot = np.append(prices, prices.max())  # potentials; reduced costs >= 0 on every edge
    w = np.full((n, n), np.inf)  # residual edge costs of the compressed graph
    arg = np.zeros((e, e), dtype=np.int64)  # token realising w[i, j]
    cols = np.arange(e)

    def refresh(i: int) -> None:
        members = np.flatnonzero(a == i)
        if members.size == 0:
            w[i, :e] = np.inf
            return
        loss = x[members, i][:, None] - x[members]  # [n_i, E]
        best = loss.argmin(0)
        w[i, :e] = loss[best, cols]
        w[i, i] = np.inf
        arg[i] = members[best]

    for i in range(e):
        refresh(i)
    surplus = np.append(np.bincount(a, minlength=e) - floor, -extra).astype(np.int64)
    while (surplus > 0).any():
        w[:e, e] = np.where(uses_extra, np.inf, 0.0)
        w[e, :e] = np.where(uses_extra, 0.0, np.inf)
        reduced = np.maximum(w - pot[:, None] + pot[None, :], 0.0)
        dist = np.where(surplus > 0, 0.0, np.inf)
        prev = np.full(n, -1)
        settled = np.zeros(n, dtype=bool)
        while True:  # Dijkstra from all surplus nodes to the nearest deficit node
            open_dist = np.where(settled, np.inf, dist)
            i = int(open_dist.argmin())
            if not np.isfinite(open_dist[i]):
                raise RuntimeError("balanced_assignment: no augmenting path (non-finite logits?)")
            settled[i] = True
            if surplus[i] < 0:
                break
            cand = dist[i] + reduced[i]
            better = (cand < dist) & ~settled
            dist[better] = cand[better]
            prev[better] = i
        pot -= np.minimum(dist, dist[i])
        sink, changed = i, set()
        while prev[i] != -1:
            j, i = i, prev[i]
            if j == e:
                uses_extra[i] = True
            elif i == e:
                uses_extra[j] = False
            else:
                a[arg[i, j]] = j
                changed.update((i, j))
        surplus[i] -= 1
        surplus[sink] += 1
        for i in changed:
            refresh(i)
    return a.astype(np.int64)


@register("base")
@dataclass(frozen=True)
class BaseLayers(Router):
    """BASE Layers (Lewis et al. 2021): exact balanced assignment of tokens to experts.

    Training (default): a(t) from `balanced_assignment` on x <float32>[T, E]; every expert gets
    floor(T/E) or ceil(T/E) tokens. BASE sets its own quota, so the case's capacity is ignored:
    nothing is dropped and Routing.capacity = ceil(T/E).
    inference: greedy a(t) = argmax_e x[t, e] with no balancing (what BASE does at test time);
        loads are then unbounded and Routing.capacity is None (dropless).
    Combine weight: sigmoid(x[t, a(t)]). probs = softmax(x) (for the losses). top_k must be 1.
    The solver runs on CPU in float64; the result is moved back to the logits' device.
    """

    inference: bool = False

    fixed_top_k = 1
    paper = "Lewis et al. 2021, BASE Layers: Simplifying Training of Large, Sparse Models"
    capture_reason = "the balanced assignment is solved on the CPU (numpy, float64) and copied back"

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        problem = self.applicable(ctx.top_k, inputs.logits.shape[1])
        if problem:  # one choice per token: a caller that asks for k > 1 must not read a 2nd (#23)
            raise ValueError(problem)
        logits = inputs.logits.float()
        t, e = logits.shape
        device = logits.device
        probs = torch.softmax(logits, dim=-1)
        if self.inference:
            expert = logits.argmax(dim=1)
            capacity = None
        else:
            x = logits.detach().to("cpu", torch.float64).numpy()
            expert = torch.from_numpy(balanced_assignment(x)).to(device)
            capacity = math.ceil(t / e)
        return Routing(
            token_index=torch.arange(t, device=device),
            expert_index=expert,
            choice=torch.zeros(t, dtype=torch.int64, device=device),
            weight=torch.sigmoid(logits.gather(1, expert[:, None]))[:, 0],
            kept=torch.ones(t, dtype=torch.bool, device=device),
            probs=probs,
            logits=logits,
            top_k=1,
            capacity=capacity,
        )

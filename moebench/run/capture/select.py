"""Static-shape, sync-free top-k selection and capacity: what `TokenChoiceRouter.choose` and
`finish` compute, with no ``.item()``, ``nonzero``, ``bincount``, boolean indexing or Python
branch on a tensor value, so a CUDA graph can capture them.

The eager `top_k_experts` redoes tied rows with a stable sort, found by ``nonzero`` (a host
sync); here ties are broken inside one ``topk`` over integer keys that already encode the
tie rule. The eager `keep_within_capacity` counts with ``bincount`` (its output size is the
largest expert id + 1, read on the host); here counts are a ``scatter_add_`` into [E].
Results are the eager ones bit for bit (tests/test_capture_equal.py).
"""

from __future__ import annotations

import torch

from moebench.core.drop_policies import get_drop_policy, ranked_by
from moebench.routers.base import RouteContext, TokenChoiceRouter, normalize_weights
from moebench.core.routing import Routing

# Drop policies whose priority is itself static (sorts, scatters, aranges): capacity under
# them is capturable. `random` draws a permutation (randperm), which is capturable too when
# the generator is registered with the graph; the runner registers the route's generator.
CAPTURABLE_POLICIES = ("position", "probs", "bpr", "random")

_LOW32 = 1 << 32


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """<int64>[T, E]: distinct keys ordered like scores <float32>[T, E] (NaN-free) with ties
    broken towards the lower expert index: key > key' iff score > score', or equal scores
    and a lower index.

    High 32 bits: the float's bits as an integer of the same order (a negative float, whose
    int32 bits are -2^31 + magnitude, becomes -magnitude, so -0.0 and +0.0 both map to 0, as
    they compare equal); low 32 bits: E-1-index. Built in place on one int64 buffer.
    """
    e = scores.shape[-1]
    key = scores.float().contiguous().view(torch.int32).long()
    key = torch.where(key < 0, -(2**31) - key, key)
    return key.mul_(_LOW32).add_((e - 1) - torch.arange(e, device=scores.device))


def top_k_static(scores: torch.Tensor, k: int) -> torch.Tensor:
    """<int64>[T, k]: `moebench.routers.base.top_k_experts` (k largest per row, highest first,
    ties -> lowest index) for scores <float32>[T, E], without a host sync."""
    if k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # first maximal index, on CPU and CUDA
    if k >= scores.shape[-1]:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.topk(order_keys(scores), k, dim=-1).indices  # keys are distinct: one order


def choose_static(router: TokenChoiceRouter, scores: torch.Tensor, k: int, ctx: RouteContext,
                  normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert <int64>[T, k], weight <float32>[T, k]): `TokenChoiceRouter.choose`."""
    expert = top_k_static(router.selection_scores(scores, ctx), k)
    weight = scores.gather(1, expert)
    return expert, normalize_weights(weight) if normalize else weight


def keep_static(expert: torch.Tensor, priority: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """<bool>[A]: `moebench.core.drop_policies.keep_within_capacity` (the first ``capacity``
    assignments of each expert by priority) for expert <int64>[A] in [0, E) and distinct
    priority <int64>[A] in [0, A).

    One sort of expert * A + priority; each assignment's rank within its expert is its sorted
    position minus its expert's start, the starts an exclusive cumsum of scatter_add_ counts.
    """
    a = expert.numel()
    order = torch.argsort(expert * a + priority)  # keys are distinct: no stability needed
    sorted_expert = expert.gather(0, order)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert.device)
    counts.scatter_add_(0, sorted_expert, torch.ones_like(sorted_expert))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(a, device=expert.device) - starts.gather(0, sorted_expert)
    return torch.empty(a, dtype=torch.bool, device=expert.device).scatter_(0, order, rank < capacity)


def finish_static(router: TokenChoiceRouter, expert: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor,
                  logits: torch.Tensor, ctx: RouteContext, scores: torch.Tensor | None = None) -> Routing:
    """`TokenChoiceRouter.finish` without ``active`` or ``priority_scores``: capacity under
    ``ctx.drop_policy`` (one of CAPTURABLE_POLICIES), the optional renormalisation after drops,
    and the Routing of the k*T rank-major assignments.

    expert <int64>[T, k], weight <float>[T, k]; probs, logits <float32>[T, E]; scores
    <float32>[T, E] or None: what policies ranked by the token's top probability read
    (`moebench.core.drop_policies.ranked_by`), default probs.
    """
    t, k = expert.shape
    device = expert.device
    expert_kt = expert.t().contiguous()  # [k, T]: rank-major, the `position` order
    weight_kt = weight.float().t().contiguous()
    token_kt = torch.arange(t, device=device).expand(k, t)
    choice_kt = torch.arange(k, device=device)[:, None].expand(k, t)
    if ctx.capacity is None:
        kept_kt = torch.ones(k, t, dtype=torch.bool, device=device)
    else:
        ranked = weight_kt
        if ranked_by(ctx.drop_policy) == "top_prob":
            top = (probs if scores is None else scores).float().max(dim=1).values  # [T]
            ranked = top[None, :].expand(k, t)
        priority = get_drop_policy(ctx.drop_policy)(expert_kt, ranked, ctx.generator).reshape(-1)
        kept_kt = keep_static(expert_kt.reshape(-1), priority, ctx.capacity, probs.shape[1]).view(k, t)
        if router.renormalize_after_drop:
            kept_sum = torch.where(kept_kt, weight_kt, 0.0).sum(0, keepdim=True)
            scale = torch.where(kept_sum > 0, weight_kt.sum(0, keepdim=True) / kept_sum.clamp_min(1e-20), 1.0)
            weight_kt = torch.where(kept_kt, weight_kt * scale, weight_kt)
    return Routing(
        token_index=token_kt.reshape(-1),
        expert_index=expert_kt.reshape(-1),
        choice=choice_kt.reshape(-1),
        weight=weight_kt.reshape(-1),
        kept=kept_kt.reshape(-1),
        probs=probs,
        logits=logits,
        top_k=k,
        capacity=ctx.capacity,
    )

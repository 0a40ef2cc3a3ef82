"""Megatron-Core's router functions (megatron.core.transformer.moe) as moebench routers.

`peer:megatron.topk`: ``moe_utils.topk_routing_with_score_function`` then, when the case has a
capacity, ``moe_utils.apply_router_token_dropping`` with the case's drop policy (`probs` or
`position`) — the two calls ``TopKRouter.routing`` makes.

`peer:megatron.sinkhorn`: ``TopKRouter.sinkhorn_load_balancing`` (``moe_utils.sinkhorn`` on
fp32 logits, top-k of the plan, then sigmoid (k = 1) or softmax (k > 1) weights), called
unbound with a stand-in ``self`` carrying ``topk``, ``training`` and
``config.moe_aux_loss_coeff = 0``, then the same token dropping.

Megatron returns [T, E] maps (``routing_map``) and [T, E] probabilities without the order of a
token's choices; the conversion orders a token's experts by their weight. Assignments are the
top-k selection before dropping; ``kept`` is the map after dropping. Capacity: Megatron's
``get_capacity(T * k, E, cf) = ceil(T * k / E * cf)`` in float64, no minimum, no drops at all
when it exceeds T. By default the adapter hands Megatron a factor for which that formula gives
the case's capacity (see `moebench.peers.base.factor_for_capacity`); the option
``capacity_factor`` makes Megatron use its own formula on a given factor instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch

from moebench.peers.base import PeerRouter, PeerSkip, factor_for_capacity, order_choices, rank_major
from moebench.routers.base import RouteContext, RouteInputs
from moebench.routers.registry import register
from moebench.core.routing import Routing

MEGATRON_POLICIES = ("probs", "position")


def megatron_capacity(mu: Any, tokens: int, experts: int, top_k: int, factor: float) -> int:
    """What apply_router_token_dropping computes: get_capacity(T * k, E, cf)."""
    return int(mu.get_capacity(num_tokens=tokens * top_k, num_experts=experts, capacity_factor=factor))


@dataclass(frozen=True)
class _Prepared:
    mu: Any
    fn: Any  # the routing call: logits -> (probs [T, E], routing_map [T, E])
    logits: torch.Tensor
    top_k: int
    factor: float | None
    capacity: int | None
    drop_policy: str
    full_probs: Any  # logits -> <float32>[T, E] score over all experts (for losses)


@dataclass(frozen=True)
class _MegatronBase(PeerRouter):
    package = "megatron-core"
    module = "megatron.core.transformer.moe.router"
    system = "Megatron-Core"

    def _capacity(self, mu, logits: torch.Tensor, ctx: RouteContext) -> tuple[float | None, int | None]:
        t, e = logits.shape
        if ctx.capacity is None:
            return None, None
        if ctx.drop_policy not in MEGATRON_POLICIES:
            raise PeerSkip(
                f"Megatron-Core has no {ctx.drop_policy!r} drop policy (moe_token_drop_policy: probs or position)"
            )
        if self.capacity_factor is not None:
            factor = float(self.capacity_factor)
        else:
            factor = factor_for_capacity(
                lambda cf: megatron_capacity(mu, t, e, ctx.top_k, cf), ctx.capacity, ctx.capacity * e / (t * ctx.top_k)
            )
        return factor, megatron_capacity(mu, t, e, ctx.top_k, factor)

    def call(self, p: _Prepared):
        probs, routing_map = p.fn(p.logits)
        if p.factor is None:
            return probs, routing_map, probs, routing_map
        kept_probs, kept_map = p.mu.apply_router_token_dropping(
            probs, routing_map, router_topk=p.top_k, capacity_factor=p.factor, drop_policy=p.drop_policy
        )
        return probs, routing_map, kept_probs, kept_map

    def convert(self, native, p: _Prepared) -> Routing:
        probs, routing_map, _, kept_map = native
        expert = order_choices(routing_map, probs, p.top_k)
        weight = probs.float().gather(1, expert)
        kept = kept_map.gather(1, expert)
        return rank_major(expert, weight, kept, p.full_probs(p.logits), p.logits, p.capacity)


@register("peer:megatron.topk")
@dataclass(frozen=True)
class MegatronTopK(_MegatronBase):
    """Megatron-Core topk_routing_with_score_function + apply_router_token_dropping.

    score_function: softmax or sigmoid (moe_router_score_function).
    use_pre_softmax: softmax over all experts, then top-k (weights not renormalised); off
        (Megatron's default): top-k of the logits, then softmax over the k (Mixtral).
    scaling_factor: moe_router_topk_scaling_factor.  num_groups/group_topk: group-limited top-k.
    capacity_factor: give Megatron this factor (its own capacity formula) instead of the case's capacity.
    """

    score_function: Literal["softmax", "sigmoid"] = "softmax"
    use_pre_softmax: bool = False
    scaling_factor: float | None = None
    num_groups: int | None = None
    group_topk: int | None = None
    capacity_factor: float | None = None

    paper = "Megatron-Core moe_utils.topk_routing_with_score_function + apply_router_token_dropping (needs megatron-core)"

    def check(self) -> str | None:
        if (self.num_groups is None) != (self.group_topk is None):
            return "num_groups and group_topk go together"
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            return f"capacity_factor must be > 0, got {self.capacity_factor}"
        return None

    def applicable(self, top_k: int, num_experts: int) -> str | None:
        if self.num_groups is not None:
            if num_experts % self.num_groups:
                return f"num_groups={self.num_groups} does not divide experts={num_experts}"
            if top_k % self.group_topk:
                return f"Megatron's group-limited top-k needs group_topk={self.group_topk} to divide top_k={top_k}"
        return super().applicable(top_k, num_experts)

    def prepare(self, inputs: RouteInputs, ctx: RouteContext, lib) -> _Prepared:
        from megatron.core.transformer.moe import moe_utils as mu

        logits = inputs.logits
        factor, capacity = self._capacity(mu, logits, ctx)
        k = ctx.top_k

        def fn(x):
            return mu.topk_routing_with_score_function(
                x, k, use_pre_softmax=self.use_pre_softmax, num_groups=self.num_groups, group_topk=self.group_topk,
                scaling_factor=self.scaling_factor, score_function=self.score_function,
            )

        def full_probs(x):
            x = x.float()
            if self.score_function == "softmax":
                return torch.softmax(x, dim=-1)
            s = torch.sigmoid(x)
            return s / s.sum(-1, keepdim=True).clamp_min(1e-20)

        return _Prepared(mu, fn, logits, k, factor, capacity, ctx.drop_policy, full_probs)


@register("peer:megatron.sinkhorn")
@dataclass(frozen=True)
class MegatronSinkhorn(_MegatronBase):
    """Megatron-Core TopKRouter.sinkhorn_load_balancing (+ apply_router_token_dropping).

    training: Sinkhorn selection (Megatron in training); off: top-k of the activation (eval).
    capacity_factor: give Megatron this factor instead of the case's capacity.
    """

    training: bool = True
    capacity_factor: float | None = None

    paper = ("Megatron-Core TopKRouter.sinkhorn_load_balancing (moe_utils.sinkhorn) + apply_router_token_dropping "
             "(needs megatron-core)")

    def check(self) -> str | None:
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            return f"capacity_factor must be > 0, got {self.capacity_factor}"
        return None

    def prepare(self, inputs: RouteInputs, ctx: RouteContext, lib) -> _Prepared:
        from megatron.core.transformer.moe import moe_utils as mu

        logits = inputs.logits
        factor, capacity = self._capacity(mu, logits, ctx)
        stand_in = SimpleNamespace(
            topk=ctx.top_k, training=self.training, config=SimpleNamespace(moe_aux_loss_coeff=0)
        )
        method = lib.TopKRouter.sinkhorn_load_balancing

        def fn(x):
            return method(stand_in, x)

        return _Prepared(mu, fn, logits, ctx.top_k, factor, capacity, ctx.drop_policy,
                         lambda x: torch.softmax(x.float(), dim=-1))

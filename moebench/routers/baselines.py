"""Baselines that ignore the logits: random routing and forced round-robin balance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.routers.base import CAPTURE_ALL, RouteContext, RouteInputs, TokenChoiceRouter, uniform_probs
from moebench.routers.registry import register
from moebench.core.routing import Routing


@register("random")
@dataclass(frozen=True)
class RandomRouter(TokenChoiceRouter):
    """k distinct experts uniformly at random per token (seeded by the case); weights 1/k."""

    paper = "baseline"
    capturable_phases = CAPTURE_ALL
    baseline = True

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits
        t, e = logits.shape
        noise = torch.rand(t, e, generator=ctx.generator, device=logits.device)
        expert = torch.topk(noise, ctx.top_k, dim=1).indices  # k distinct experts, uniform
        weight = torch.full(expert.shape, 1.0 / ctx.top_k, device=logits.device)
        return self.finish(expert, weight, uniform_probs(logits), logits.float(), ctx)


@register("round_robin")
@dataclass(frozen=True)
class RoundRobin(TokenChoiceRouter):
    """Token t goes to experts (t*k + j) mod E, j < k: forced perfect balance; weights 1/k.

    Megatron-Core `moe_router_force_load_balancing`, MegaBlocks `uniform_expert_assignment`.
    """

    paper = "baseline (Megatron-Core force_load_balancing, MegaBlocks uniform_expert_assignment)"
    capturable_phases = CAPTURE_ALL
    baseline = True

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits
        t, e = logits.shape
        k = ctx.top_k
        device = logits.device
        expert = (torch.arange(t, device=device)[:, None] * k + torch.arange(k, device=device)[None, :]) % e
        weight = torch.full(expert.shape, 1.0 / k, device=device)
        return self.finish(expert, weight, uniform_probs(logits), logits.float(), ctx)

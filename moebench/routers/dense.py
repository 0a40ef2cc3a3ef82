"""Dense softmax gating: Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive Mixtures of Local Experts"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.routers.base import CAPTURE_ALL, RouteContext, RouteInputs, Router
from moebench.routers.registry import register
from moebench.core.routing import Routing


@register("softmax_dense")
@dataclass(frozen=True)
class SoftmaxDense(Router):
    """Every token goes to every expert with weight g = softmax(x); no capacity, no drops.

    top_k and capacity do not apply: the Routing has A = T*E assignments, all kept.
    """

    paper = "Jacobs, Jordan, Nowlan, Hinton 1991, Adaptive Mixtures of Local Experts"
    capturable_phases = CAPTURE_ALL  # its own route is static
    baseline = True
    case_notes = {"capacity": "dense softmax sends every token to every expert: top_k and the capacity factor do "
                              "not apply, it never drops, and its balance is that of the uniform split"}

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        t, e = logits.shape
        probs = torch.softmax(logits, dim=-1)
        device = logits.device
        return Routing(
            token_index=torch.arange(t, device=device).repeat_interleave(e),
            expert_index=torch.arange(e, device=device).repeat(t),
            choice=torch.argsort(torch.argsort(probs, dim=1, descending=True, stable=True), dim=1).reshape(-1),
            weight=probs.reshape(-1),
            kept=torch.ones(t * e, dtype=torch.bool, device=device),
            probs=probs,
            logits=logits,
            top_k=e,
            capacity=None,
        )

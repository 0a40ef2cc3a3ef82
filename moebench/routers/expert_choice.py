"""Expert Choice routing: Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moebench.routers.base import CAPTURE_ALL, RouteContext, RouteInputs, Router
from moebench.routers.registry import register
from moebench.core.routing import Routing


@register("expert_choice")
@dataclass(frozen=True)
class ExpertChoice(Router):
    """Each expert takes the C tokens with the highest p[t, e], p = softmax(x) over experts.

    logits <float>[T, E] -> E*C assignments, expert-major: expert e's C tokens by descending
    p[t, e] (choice = that rank; order among equal p is torch.topk's). Cost: per expert an
    O(T) selection over its column and an O(C log C) sort of the chosen, O(T*E + cf*k*T*log C).

    C is the case's capacity (ceil(cf * k * T / E): the same slots token choice gets, i.e.
    docs/spec.md §1's EC capacity with cf_EC = cf * k mean experts per token). Dropless cases use
    cf = 1 per choice, C = ceil(k * T / E). Combine weight of (t, e) is p[t, e].
    Nothing is dropped by construction; tokens chosen by no expert are the 'dropped tokens'.
    """

    paper = "Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing"
    capturable_phases = CAPTURE_ALL  # its own route is static
    case_notes = {"dropless": "expert choice has its own capacity (each expert takes ceil(k*T/E) tokens when the "
                              "case is dropless): tokens no expert picks are dropped, so 'dropless' does not apply"}

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        t, e = logits.shape
        probs = torch.softmax(logits, dim=-1)
        c = ctx.capacity if ctx.capacity is not None else min(t, math.ceil(ctx.top_k * t / e))
        # [E, C]: each expert's chosen tokens. On CPU from a contiguous [E, T] copy: topk reads
        # each expert's column as a row, and a strided column read pulls a cache line per token
        # (E times the data at large T); the copy reads probs once. Same values, same order.
        pt = probs.t().contiguous() if probs.device.type == "cpu" else probs.t()
        top = torch.topk(pt, c, dim=1)
        device = logits.device
        return Routing(
            token_index=top.indices.reshape(-1),
            expert_index=torch.arange(e, device=device).repeat_interleave(c),
            choice=torch.arange(c, device=device).repeat(e),
            weight=top.values.reshape(-1),
            kept=torch.ones(e * c, dtype=torch.bool, device=device),
            probs=probs,
            logits=logits,
            top_k=ctx.top_k,
            capacity=c,
        )

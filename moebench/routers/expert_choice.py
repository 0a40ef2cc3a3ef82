"""Expert Choice routing: Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from moebench.core import kernels

from moebench.routers.base import CAPTURE_ALL, RouteContext, RouteInputs, Router
from moebench.routers.registry import register
from moebench.core.routing import Routing


@register("expert_choice")
@dataclass(frozen=True)
class ExpertChoice(Router):
    """Each expert takes the C tokens with the highest p[t, e], p = softmax(x) over experts.

    logits <float>[T, E] -> E*C assignments, expert-major: expert e's C tokens by descending
    p[t, e] (choice = that rank). Among equal p the lower token comes first on the numba path;
    on the torch path the order among equal p is torch.topk's (unspecified).

    impl: numba (CPU float32; `moebench.core.kernels.expert_choice_select`, a sampled then
        exact radix select per expert: O(T*E) in all, probs read once, row-major), torch
        (`torch.topk` per expert over a [E, T] copy on CPU: O(T*E + cf*k*T*log C)), or auto
        (numba where it applies and pays: T >= 8192; below, the two are level).

    C is the case's capacity (ceil(cf * k * T / E): the same slots token choice gets, i.e.
    docs/spec.md §1's EC capacity with cf_EC = cf * k mean experts per token). Dropless cases use
    cf = 1 per choice, C = ceil(k * T / E). Combine weight of (t, e) is p[t, e].
    Nothing is dropped by construction; tokens chosen by no expert are the 'dropped tokens'.
    """

    impl: Literal["auto", "torch", "numba"] = "auto"

    paper = "Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing"
    capturable_phases = CAPTURE_ALL  # its own route is static
    case_notes = {"dropless": "expert choice has its own capacity (each expert takes ceil(k*T/E) tokens when the "
                              "case is dropless): tokens no expert picks are dropped, so 'dropless' does not apply"}

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        t, e = logits.shape
        probs = torch.softmax(logits, dim=-1)
        c = ctx.capacity if ctx.capacity is not None else min(t, math.ceil(ctx.top_k * t / e))
        if 0 < c <= t and kernels.use_numba(self.impl, probs) and (self.impl == "numba"
                                                                   or kernels.expert_choice_pays(t)):
            token, weight = kernels.expert_choice_select(probs.detach(), c)  # [E, C] each
            if probs.requires_grad:  # a trained gate: the same values, through autograd
                weight = probs.t().gather(1, token)
        else:
            # On CPU from a contiguous [E, T] copy: topk reads each expert's column as a row,
            # and a strided column read pulls a cache line per token (E times the data at
            # large T); the copy reads probs once. Same values, same order.
            pt = probs.t().contiguous() if probs.device.type == "cpu" else probs.t()
            weight, token = torch.topk(pt, c, dim=1)
        device = logits.device
        return Routing(
            token_index=token.reshape(-1),
            expert_index=torch.arange(e, device=device).repeat_interleave(c),
            choice=torch.arange(c, device=device).repeat(e),
            weight=weight.reshape(-1),
            kept=torch.ones(e * c, dtype=torch.bool, device=device),
            probs=probs,
            logits=logits,
            top_k=ctx.top_k,
            capacity=c,
        )

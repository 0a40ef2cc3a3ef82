"""Sinkhorn routing: Clark et al. 2022 (S-BASE), as in Megatron-Core's `sinkhorn` router.

BASE's balanced assignment relaxed to entropic optimal transport: exp(x) is scaled to the
transport plan P = diag(d0) exp(x) diag(d1) with row sums 1/T and column sums 1/E (uniform
expert marginals), and each token takes the top-k experts of its row of P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.routers.base import RouteContext, RouteInputs, TokenChoiceRouter
from moebench.routers.registry import register
from moebench.routing import Routing

_TINY = torch.finfo(torch.float64).tiny


def sinkhorn(logits: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> tuple[torch.Tensor, int]:
    """Megatron-Core's Sinkhorn iteration on exp(x), made safe for large logits.

    logits <float>[T, E] -> (plan <float64>[T, E], iterations). plan = d1 * exp(x) * d0[:, None]
    has column sums 1/E (exact after the final d1 step) and row sums -> 1/T.

    Megatron's loop: d0 = 1/T / (exp(x) @ d1); d1 = 1/E / (d0 @ exp(x)); stop when
    mean|d1_old - d1| <= tol (here also after max_iters). Each row of x is first shifted by
    its maximum: the shift is absorbed by d0, so d1, the stopping error and the plan are
    unchanged, but exp never overflows whatever the logits' scale. Work is in float64, so only
    experts more than ~700 below a token's best logit underflow to 0; an expert for which that
    holds on every row keeps a zero column (Megatron's eps guard, here a tiny clamp).
    """
    x = logits.detach().double()
    t, e = x.shape
    kernel = torch.exp(x - x.max(dim=1, keepdim=True).values)  # [T, E], entries in (0, 1]
    d1 = torch.ones(e, dtype=torch.float64, device=x.device)
    iters = 0
    while iters < max_iters:
        d0 = (1.0 / t) / (kernel @ d1).clamp_min(_TINY)
        d1_new = (1.0 / e) / (d0 @ kernel).clamp_min(_TINY)
        error = (d1 - d1_new).abs().mean().item()
        d1 = d1_new
        iters += 1
        if not error > tol:  # Megatron's `while error > tol` (a NaN error also stops)
            break
    return kernel * d1 * d0[:, None], iters


@register("sinkhorn")
@dataclass(frozen=True)
class Sinkhorn(TokenChoiceRouter):
    """S-BASE (Clark et al. 2022) / Megatron-Core `sinkhorn`: top-k of the Sinkhorn plan.

    Selection: the top-k experts of each token's row of `sinkhorn(x)` (row-normalised to sum
    1 so that an expert bias, when carried, is on the scale of a probability).
    Combine weights (Megatron convention): k = 1: sigmoid(x[t, e]); k > 1: softmax(x)[t, e]
    at the chosen experts (not renormalised). probs = softmax(x). Capacity and drops through
    `TokenChoiceRouter.finish`; the `probs` drop policy ranks by the combine weight.

    tol: Megatron's stopping error mean|d1_old - d1| (Megatron's default 1e-4).
    max_iters: a safety cap Megatron does not have; the tol criterion normally stops after
        2-25 iterations, so the default 1000 only ends runaway cases.
    inference: skip Sinkhorn and select on the activation itself (Megatron at eval time).
    """

    tol: float = 1e-4
    max_iters: int = 1000
    inference: bool = False

    paper = "Clark et al. 2022, Unified Scaling Laws for Routed Language Models (S-BASE); Megatron-Core sinkhorn"

    def check(self) -> str | None:
        if self.tol <= 0:
            return f"tol must be > 0, got {self.tol}"
        if self.max_iters < 1:
            return f"max_iters must be >= 1, got {self.max_iters}"
        return None

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        probs = torch.softmax(logits, dim=-1)
        activation = torch.sigmoid(logits) if ctx.top_k == 1 else probs
        if self.inference:
            select = activation
        else:
            plan, _ = sinkhorn(logits, self.tol, self.max_iters)
            select = plan / plan.sum(dim=1, keepdim=True).clamp_min(_TINY)  # float64
        expert = torch.topk(self.selection_scores(select, ctx), ctx.top_k, dim=-1).indices
        return self.finish(expert, activation.gather(1, expert), probs, logits, ctx)


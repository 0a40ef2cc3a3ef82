"""Sinkhorn routing: Clark et al. 2022 (S-BASE), as in Megatron-Core's `sinkhorn` router.

BASE's balanced assignment relaxed to entropic optimal transport: exp(x) is scaled to the
transport plan P = diag(d0) exp(x) diag(d1) with row sums 1/T and column sums 1/E (uniform
expert marginals), and each token takes the top-k experts of its row of P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.core import kernels
from moebench.routers.base import RouteContext, RouteInputs, TokenChoiceRouter, top_k_experts
from moebench.routers.registry import register
from moebench.core.routing import Routing

_TINY = torch.finfo(torch.float64).tiny
# Largest spread max(x) - min(x) within a token for which the kernel is stored in float32:
# exp(-80) ~ 2e-35 is still a normal float32, so every entry keeps float32's relative precision.
FP32_SPREAD = 80.0
# The iteration walks the kernel in row blocks of this many elements (2 MiB of float32, 4 MiB
# as float64), so both products of a block read it from cache: one pass over memory per iteration.
BLOCK_ELEMENTS = 1 << 19


def sinkhorn_scaling(
    logits: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000, impl: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Megatron-Core's Sinkhorn iteration on exp(x), made safe for large logits.

    logits <float>[T, E] -> (kernel <float32 or float64>[T, E], d0 <float64>[T],
    d1 <float64>[E], iterations), with the plan P = d1 * kernel * d0[:, None] (see `sinkhorn`).
    kernel = exp(x - max_e x[t, e]): each row shifted by its maximum, which d0 absorbs (d1,
    the stopping error and P are unchanged) and which keeps exp from overflowing whatever the
    logits' scale.

    Megatron's loop: d0 = 1/T / (kernel @ d1); d1 = 1/E / (d0 @ kernel); stop when
    mean|d1_old - d1| <= tol (here also after max_iters). The iteration count depends on the
    logits, not on T; each iteration is two [T, E] matrix-vector products.

    Precision: the arithmetic is float64. (In float32, rounding noise puts a floor under the
    error, ~7e-5 already where d1 reaches ~80: the stop would depend on rounding, and for
    larger d1 never come.) The kernel is stored in float32 (half the memory traffic; each
    block is widened in cache) when the logits are not float64 and every token's logits span
    at most FP32_SPREAD, else in float64, where only experts more than ~700 below a token's
    best logit underflow to 0 (an expert for which that holds on every row keeps a zero
    column: Megatron's eps guard, here a tiny clamp).

    impl: the iteration in torch ops (this function's loop), or in one numba kernel call
    (`moebench.core.kernels.sinkhorn_scale`: the same iteration and stop, float64 sums in
    another order, so d0 and d1 agree to ~1e-15 relative), or auto (numba on CPU).
    """
    x = logits.detach()
    t, e = x.shape
    device = x.device
    xf = x.float()
    hi = xf.amax(dim=1, keepdim=True)  # (torch.aminmax over dim 1 is ~10x slower on CPU)
    if x.dtype != torch.float64 and bool(((hi - xf.amin(dim=1, keepdim=True)) <= FP32_SPREAD).all()):
        kernel = torch.sub(xf, hi).exp_()  # exp in place: a single [T, E] allocation
    else:
        xd = x.double()
        kernel = torch.sub(xd, xd.amax(dim=1, keepdim=True)).exp_()
    if t and kernels.use_numba(impl, kernel, float32=False):
        d0, d1, iters = kernels.sinkhorn_scale(kernel, tol, max_iters)
        return kernel, d0, d1, iters
    rows = max(1, min(t, BLOCK_ELEMENTS // max(e, 1)))
    wide = torch.empty(rows, e, dtype=torch.float64, device=device) if kernel.dtype != torch.float64 else None
    # CPU: widen through numpy views, a plain loop on this thread. torch's copy_ is an OpenMP
    # parallel region, and many short regions each wait out a time slice when the cores are busy.
    views = (kernel.numpy(), wide.numpy()) if wide is not None and device.type == "cpu" else None
    d0 = torch.empty(t, dtype=torch.float64, device=device)
    d1 = torch.ones(e, dtype=torch.float64, device=device)
    iters = 0
    while iters < max_iters:
        colsum = torch.zeros(e, dtype=torch.float64, device=device)
        for i in range(0, t, rows):
            kb, db = kernel[i:i + rows], d0[i:i + rows]
            if views is not None:
                views[1][:kb.shape[0]] = views[0][i:i + rows]
                kb = wide[:kb.shape[0]]
            elif wide is not None:
                kb = wide[:kb.shape[0]].copy_(kb)
            torch.mv(kb, d1, out=db)
            db.clamp_(min=_TINY).reciprocal_().mul_(1.0 / t)
            colsum.addmv_(kb.t(), db)
        d1_new = (1.0 / e) / colsum.clamp_min(_TINY)
        error = (d1 - d1_new).abs().mean().item()
        d1 = d1_new
        iters += 1
        if not error > tol:  # Megatron's `while error > tol` (a NaN error also stops)
            break
    return kernel, d0, d1, iters


def sinkhorn(logits: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> tuple[torch.Tensor, int]:
    """The Sinkhorn plan of `sinkhorn_scaling`.

    logits <float>[T, E] -> (plan <float64>[T, E], iterations). plan = d1 * kernel * d0[:, None]
    has column sums 1/E (exact after the final d1 step) and row sums -> 1/T.
    """
    kernel, d0, d1, iters = sinkhorn_scaling(logits, tol, max_iters)
    return kernel.double() * d1 * d0[:, None], iters


@register("sinkhorn")
@dataclass(frozen=True)
class Sinkhorn(TokenChoiceRouter):
    """S-BASE (Clark et al. 2022) / Megatron-Core `sinkhorn`: top-k of the Sinkhorn plan.

    Selection: the top-k experts of each token's row of the plan P = d1 * kernel * d0[:, None]
    of `sinkhorn_scaling` (ties -> lowest expert index). d0[t] scales a whole row, so the
    order is that of kernel * d1, which is what is ranked; when an expert bias is carried the
    row is first normalised to sum 1, so that the bias is on the scale of a probability.
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
    capture_reason = "the iteration stops once mean|d1_old - d1| <= tol, an error read on the host every iteration"

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
            kernel, _, d1, _ = sinkhorn_scaling(logits, self.tol, self.max_iters, self.impl)
            select = kernel.mul_(d1.to(kernel.dtype))  # in place: kernel is ours
            if ctx.state is not None and ctx.state.bias is not None:
                select.div_(select.sum(dim=1, keepdim=True).clamp_min(torch.finfo(select.dtype).tiny))
        if select.dtype == torch.float32:
            expert, _ = self.choose(select, ctx.top_k, ctx)
        else:  # the float64 kernel: the numba selection takes float32 only
            expert = top_k_experts(self.selection_scores(select, ctx), ctx.top_k)
        return self.finish(expert, activation.gather(1, expert), probs, logits, ctx)

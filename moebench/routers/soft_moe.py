"""Soft MoE: Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts".

Every expert has S slots; slot logits are L = h · Phi (Phi <float32>[d, E*S], one column per
slot, slot s of expert e at column e*S + s). Dispatch D = softmax of L over tokens (each slot
is a convex mix of all tokens); combine C = softmax of L over slots (each token is a convex
mix of all slot outputs). Nothing is dropped; no token is routed away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moebench.errors import WorkloadMismatchError
from moebench.routers.base import RouteContext, RouteInputs, Router
from moebench.routers.registry import register
from moebench.routing import Routing, SoftSlots


def make_phi(dim: int, slots: int, seed: int) -> torch.Tensor:
    """<float32>[d, slots]: fixed slot parameters with unit-norm columns, drawn on CPU from
    N(0, 1) with a generator seeded by `seed` (so every device gets the same Phi)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(dim, slots, generator=g, dtype=torch.float32)
    return phi / phi.norm(dim=0, keepdim=True).clamp_min(1e-12)


def soft_slots(slot_logits: torch.Tensor, slots_per_expert: int) -> tuple[SoftSlots, torch.Tensor]:
    """Dispatch and combine from slot logits.

    slot_logits <float32>[T, E*S] -> (SoftSlots(dispatch [T, E*S], combine [T, E*S], S),
    expert_weight <float32>[T, E]): the combine weight of each expert's S slots summed, so
    each token's expert weights sum to 1.
    """
    t, n = slot_logits.shape
    dispatch = torch.softmax(slot_logits, dim=0)  # each column (slot) sums to 1 over tokens
    combine = torch.softmax(slot_logits, dim=1)  # each row (token) sums to 1 over slots
    weight = combine.view(t, n // slots_per_expert, slots_per_expert).sum(dim=-1)
    return SoftSlots(dispatch, combine, slots_per_expert), weight


@register("soft_moe")
@dataclass(frozen=True)
class SoftMoE(Router):
    """Soft MoE (Puigcerver et al. 2023): dense soft dispatch of tokens to E*S slots.

    hidden <float>[T, d] -> slot logits [T, E*S] = normalize(h) · (scale * Phi) when
    `normalize` (the paper's l2-normalisation of the inputs and of Phi's columns, with a
    scalar scale, for stable training at large d), else scale * (h · Phi). Phi has unit-norm
    columns drawn from `phi_seed` and is cached in the stream's RouterState.

    slots_per_expert: S. When None, S comes from the case: S = max(1, capacity // top_k)
        with the case's capacity ceil(cf*k*T/E), i.e. about round(cf*T/E) (ROUTERS.md §1);
        for dropless cases (capacity None) S = ceil(T/E) (cf = 1).
    The Routing has one assignment per (token, expert) pair (A = T*E), token-major, weight =
    the token's combine weight summed over the expert's S slots, all kept, choice = the
    expert's rank in the token's weights; probs = those [T, E] weights; logits = the inputs'
    router logits as given; capacity = S; soft = the dispatch/combine matrices.
    """

    slots_per_expert: int | None = None
    phi_seed: int = 0
    normalize: bool = True
    scale: float = 1.0

    needs = ("hidden",)
    paper = "Puigcerver et al. 2023, From Sparse to Soft Mixtures of Experts"

    def check(self) -> str | None:
        if self.slots_per_expert is not None and self.slots_per_expert < 1:
            return f"slots_per_expert must be >= 1, got {self.slots_per_expert}"
        if self.scale <= 0:
            return f"scale must be > 0, got {self.scale}"
        return None

    def slots(self, tokens: int, experts: int, ctx: RouteContext) -> int:
        """S: the option, else derived from the case's capacity (see the class docstring)."""
        if self.slots_per_expert is not None:
            return self.slots_per_expert
        if ctx.capacity is None:
            return math.ceil(tokens / experts)
        return max(1, ctx.capacity // max(1, ctx.top_k))

    def _phi(self, dim: int, n: int, device: torch.device, ctx: RouteContext) -> torch.Tensor:
        key = (dim, n, self.phi_seed, str(device))
        extra = ctx.state.extra if ctx.state is not None else None
        cached = extra.get("soft_moe_phi") if extra is not None else None
        if cached is not None and cached[0] == key:
            return cached[1]
        phi = make_phi(dim, n, self.phi_seed).to(device)
        if extra is not None:
            extra["soft_moe_phi"] = (key, phi)
        return phi

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        if inputs.hidden is None:
            raise WorkloadMismatchError("soft_moe needs hidden states; the workload provides none")
        logits = inputs.logits.float()
        t, e = logits.shape
        h = inputs.hidden.float().to(logits.device)
        s = self.slots(t, e, ctx)
        phi = self._phi(h.shape[1], e * s, logits.device, ctx)
        if self.normalize:
            h = h * torch.rsqrt(h.square().sum(dim=1, keepdim=True) + 1e-6)  # the paper's normalize()
        soft, weight = soft_slots(self.scale * (h @ phi), s)
        device = logits.device
        rank = torch.argsort(torch.argsort(weight, dim=1, descending=True, stable=True), dim=1)
        return Routing(
            token_index=torch.arange(t, device=device).repeat_interleave(e),
            expert_index=torch.arange(e, device=device).repeat(t),
            choice=rank.reshape(-1),
            weight=weight.reshape(-1),
            kept=torch.ones(t * e, dtype=torch.bool, device=device),
            probs=weight,
            logits=logits,
            top_k=ctx.top_k,
            capacity=s,
            soft=soft,
        )

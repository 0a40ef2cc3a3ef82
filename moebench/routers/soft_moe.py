"""Soft MoE: Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts".

Every expert has S slots; slot logits are L = h · Phi (Phi <float32>[d, E*S], one column per
slot, slot s of expert e at column e*S + s). Dispatch D = softmax of L over tokens (each slot
is a convex mix of all tokens); combine C = softmax of L over slots (each token is a convex
mix of all slot outputs). Nothing is dropped; no token is routed away.

The paper applies this per sequence: each sequence's tokens are mixed into its own slots, so
the cost is linear in the number of sequences. With `sequence_length` n the T tokens are
T / n sequences routed so, as [B, n, E*S] blocks; without it the whole batch is one sequence
and, with S ~ cf*T/E, the [T, E*S] matrices grow as T^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moebench.core.errors import WorkloadMismatchError
from moebench.routers.base import CAPTURE_ALL, RouteContext, RouteInputs, Router
from moebench.routers.registry import register
from moebench.core.routing import Routing, SoftSlots


def make_phi(dim: int, slots: int, seed: int) -> torch.Tensor:
    """<float32>[d, slots]: fixed slot parameters with unit-norm columns, drawn on CPU from
    N(0, 1) with a generator seeded by `seed` (so every device gets the same Phi)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(dim, slots, generator=g, dtype=torch.float32)
    return phi / phi.norm(dim=0, keepdim=True).clamp_min(1e-12)


def soft_slots(slot_logits: torch.Tensor, slots_per_expert: int,
               sequence_length: int | None = None) -> tuple[SoftSlots, torch.Tensor]:
    """Dispatch and combine from slot logits.

    slot_logits <float32>[T, E*S] (row t: token t's logits for the slots of its own sequence;
    sequence_length n must divide T) -> (SoftSlots(dispatch [T, E*S], combine [T, E*S], S, n),
    expert_weight <float32>[T, E]): the combine weight of each expert's S slots summed, so
    each token's expert weights sum to 1. Dispatch is a softmax over the tokens of each
    sequence ([T/n, n, E*S] blocks; one block of all T when n is None).
    """
    t, width = slot_logits.shape
    b = 1 if sequence_length is None or t == 0 else t // sequence_length
    dispatch = torch.softmax(slot_logits.view(b, t // b, width), dim=1).view(t, width)  # columns sum to 1 per sequence
    combine = torch.softmax(slot_logits, dim=1)  # each row (token) sums to 1 over its slots
    weight = combine.view(t, width // slots_per_expert, slots_per_expert).sum(dim=-1)
    return SoftSlots(dispatch, combine, slots_per_expert, sequence_length), weight


@register("soft_moe")
@dataclass(frozen=True)
class SoftMoE(Router):
    """Soft MoE (Puigcerver et al. 2023): dense soft dispatch of tokens to E*S slots per sequence.

    hidden <float>[T, d] -> slot logits [T, E*S] = normalize(h) · (scale * Phi) when
    `normalize` (the paper's l2-normalisation of the inputs and of Phi's columns, with a
    scalar scale, for stable training at large d), else scale * (h · Phi). Phi has unit-norm
    columns drawn from `phi_seed` and is cached in the stream's RouterState; every sequence
    uses the same Phi.

    sequence_length: n. When set, the T tokens are B = T / n sequences of n consecutive tokens,
        each dispatched to and combined from its own E*S slots (the paper's per-sequence Soft
        MoE: dispatch and combine are [B, n, E*S], cost linear in T); a case where n does
        not divide T is skipped. None: the whole batch is one sequence (B = 1, n = T).
    slots_per_expert: S, per sequence. When None, S comes from the case: the case's capacity
        ceil(cf*k*T/E) per choice and sequence, S = max(1, capacity // (k*B)), i.e. about
        round(cf*n/E) (docs/spec.md §1's round(cf*T/E) for one sequence); for dropless cases
        (capacity None) S = ceil(n/E) (cf = 1).
    The Routing has one assignment per (token, expert) pair (A = T*E), token-major, weight =
    the token's combine weight summed over the expert's S slots of its sequence, all kept,
    choice = the expert's rank in the token's weights; probs = those [T, E] weights; logits =
    the inputs' router logits as given; capacity = B*S (each expert's slots in the batch);
    soft = the dispatch/combine matrices.
    """

    slots_per_expert: int | None = None
    phi_seed: int = 0
    normalize: bool = True
    scale: float = 1.0
    sequence_length: int | None = None

    needs = ("hidden",)
    paper = "Puigcerver et al. 2023, From Sparse to Soft Mixtures of Experts"
    capturable_phases = CAPTURE_ALL  # its own route is static

    def check(self) -> str | None:
        if self.slots_per_expert is not None and self.slots_per_expert < 1:
            return f"slots_per_expert must be >= 1, got {self.slots_per_expert}"
        if self.scale <= 0:
            return f"scale must be > 0, got {self.scale}"
        if self.sequence_length is not None and self.sequence_length < 1:
            return f"sequence_length must be >= 1, got {self.sequence_length}"
        return None

    def sequences(self, tokens: int) -> int:
        """B: the number of sequences T tokens form (WorkloadMismatchError when n does not divide T)."""
        n = self.sequence_length
        if n is None:
            return 1
        if tokens % n:
            raise WorkloadMismatchError(f"soft_moe sequence_length={n} does not divide the batch's {tokens} tokens")
        return max(1, tokens // n)

    def slots(self, tokens: int, experts: int, ctx: RouteContext) -> int:
        """S per sequence: the option, else derived from the case's capacity (see the class docstring)."""
        if self.slots_per_expert is not None:
            return self.slots_per_expert
        b = self.sequences(tokens)
        if ctx.capacity is None:
            return math.ceil(tokens // b / experts)
        return max(1, ctx.capacity // (max(1, ctx.top_k) * b))

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
        b = self.sequences(t)
        s = self.slots(t, e, ctx)
        phi = self._phi(h.shape[1], e * s, logits.device, ctx)
        if self.normalize:
            h = h * torch.rsqrt(h.square().sum(dim=1, keepdim=True) + 1e-6)  # the paper's normalize()
        soft, weight = soft_slots(self.scale * (h @ phi), s, self.sequence_length)
        device = logits.device
        # rank of each expert in its token's weights: one stable argsort, inverted by a scatter
        order = torch.argsort(weight, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(e, device=device).expand(t, e))
        return Routing(
            token_index=torch.arange(t, device=device).repeat_interleave(e),
            expert_index=torch.arange(e, device=device).repeat(t),
            choice=rank.reshape(-1),
            weight=weight.reshape(-1),
            kept=torch.ones(t * e, dtype=torch.bool, device=device),
            probs=weight,
            logits=logits,
            top_k=ctx.top_k,
            capacity=b * s,
            soft=soft,
        )

"""The dispatch and combine phases: moving hidden states to experts and back.

dispatch gathers the hidden rows of kept assignments into expert-contiguous order (what an
expert-parallel all-to-all or a grouped GEMM consumes); combine scatters weighted rows back
to their tokens. Experts themselves are the identity here: moebench times the data movement
a router implies, not the expert FFNs. Soft MoE instead mixes tokens into slots (D^T h) and
slots back into tokens (C · slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.core import kernels
from moebench.core.routing import Routing


@dataclass(frozen=True)
class Dispatched:
    """Hidden rows in expert-contiguous order.

    rows        <dtype>[N, d]: N kept assignments (Soft MoE: the E*B*S slots of B sequences,
                expert-contiguous).
    token_index <int64>[N]: the token each row came from (unused for Soft MoE).
    weight      <dtype>[N]: its combine weight.
    counts      <int64>[E]: rows per expert (expert e's rows start at sum(counts[:e])).
    """

    rows: torch.Tensor
    token_index: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor


def dispatch(routing: Routing, hidden: torch.Tensor, impl: kernels.Impl = "auto") -> Dispatched:
    """Gather hidden <dtype>[T, d] into expert-contiguous rows for ``routing``.

    impl: "torch", "numba" (`moebench.core.kernels.dispatch_rows`: a counting pass and one parallel
    pass that writes every row, token and weight to its slot, instead of a stable sort and
    three gathers; the same Dispatched bit for bit, any dtype) or "auto" (numba on CPU when
    it imports).
    """
    if routing.soft is not None:
        soft, e = routing.soft, routing.num_experts
        b, s = soft.num_sequences, soft.slots_per_expert
        mix = soft.dispatch.to(hidden.dtype)
        if b == 1:
            slots = mix.t() @ hidden  # [E*S, d]
        else:  # each sequence's D^T h: [B, E*S, d]; then expert-contiguous [E, B, S, d] -> [E*B*S, d]
            slots = soft.blocks(mix).transpose(1, 2) @ hidden.view(b, -1, hidden.shape[1])
            slots = slots.view(b, e, s, -1).transpose(0, 1).reshape(e * b * s, -1)
        counts = torch.full((e,), b * s, dtype=torch.int64, device=hidden.device)
        return Dispatched(slots, routing.token_index[:0], routing.weight[:0], counts)
    if hidden.dim() == 2 and kernels.use_numba(impl, hidden, routing.kept, float32=False):
        rows, tokens, weight, counts = kernels.dispatch_rows(
            routing.kept, routing.expert_index, routing.token_index, routing.weight, hidden, routing.num_experts)
        return Dispatched(rows, tokens, weight.to(hidden.dtype), counts)
    kept = routing.kept.nonzero().squeeze(1)
    experts = routing.expert_index[kept]
    order = torch.sort(experts, stable=True).indices  # stable: within an expert, choice rank then token order
    picked = kept[order]
    tokens = routing.token_index[picked]
    return Dispatched(
        rows=hidden.index_select(0, tokens),
        token_index=tokens,
        weight=routing.weight[picked].to(hidden.dtype),
        counts=torch.bincount(experts, minlength=routing.num_experts),
    )


def combine(routing: Routing, dispatched: Dispatched, expert_out: torch.Tensor,
            impl: kernels.Impl = "auto") -> torch.Tensor:
    """Scatter expert outputs <dtype>[N, d] back to tokens: <dtype>[T, d] = sum of weighted rows.

    Tokens with no kept assignment get zeros (they pass through the residual outside the layer).
    impl: "torch", "numba" (`moebench.core.kernels.combine_rows`, float32 only: one parallel pass
    over tokens, each output row written once, no [N, d] temporary; the same floats bit for
    bit) or "auto" (numba for float32 CPU tensors when it imports).
    """
    if routing.soft is not None:
        soft, combine_w = routing.soft, routing.soft.combine.to(expert_out.dtype)
        b, s = soft.num_sequences, soft.slots_per_expert
        if b == 1:
            return combine_w @ expert_out
        # rows are expert-contiguous [E, B, S, d]: back to [B, E*S, d], then each sequence's C · slots
        slots = expert_out.view(routing.num_experts, b, s, -1).transpose(0, 1).reshape(b, -1, expert_out.shape[1])
        return (soft.blocks(combine_w) @ slots).view(routing.num_tokens, -1)
    if expert_out.dim() == 2 and kernels.use_numba(impl, expert_out, dispatched.weight):
        return kernels.combine_rows(dispatched.token_index, dispatched.weight, expert_out, routing.num_tokens)
    out = torch.zeros(routing.num_tokens, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, dispatched.token_index, expert_out * dispatched.weight[:, None])

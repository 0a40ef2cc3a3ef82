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

from moebench import kernels
from moebench.routing import Routing


@dataclass(frozen=True)
class Dispatched:
    """Hidden rows in expert-contiguous order.

    rows        <dtype>[N, d]: N kept assignments (Soft MoE: E*S slots).
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

    impl: "torch", "numba" (`moebench.kernels.dispatch_order`: a counting sort instead of a
    stable sort; the same Dispatched bit for bit) or "auto" (numba on CPU when it imports).
    """
    if routing.soft is not None:
        slots = routing.soft.dispatch.to(hidden.dtype).t() @ hidden  # [E*S, d]
        s = routing.soft.slots_per_expert
        counts = torch.full((routing.num_experts,), s, dtype=torch.int64, device=hidden.device)
        return Dispatched(slots, routing.token_index[:0], routing.weight[:0], counts)
    if hidden.dim() == 2 and kernels.use_numba(impl, hidden, routing.kept, float32=False):
        picked, counts = kernels.dispatch_order(routing.kept, routing.expert_index, routing.num_experts)
        tokens = routing.token_index[picked]
        return Dispatched(hidden.index_select(0, tokens), tokens, routing.weight[picked].to(hidden.dtype), counts)
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
    impl: "torch", "numba" (float32 only: one parallel pass per token, no [N, d] temporary;
    the same floats bit for bit) or "auto" (numba for float32 CPU tensors when it imports).
    """
    if routing.soft is not None:
        return routing.soft.combine.to(expert_out.dtype) @ expert_out
    if expert_out.dim() == 2 and kernels.use_numba(impl, expert_out, dispatched.weight):
        return kernels.combine_rows(dispatched.token_index, dispatched.weight, expert_out, routing.num_tokens)
    out = torch.zeros(routing.num_tokens, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, dispatched.token_index, expert_out * dispatched.weight[:, None])

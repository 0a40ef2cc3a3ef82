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


def dispatch(routing: Routing, hidden: torch.Tensor) -> Dispatched:
    """Gather hidden <dtype>[T, d] into expert-contiguous rows for ``routing``."""
    if routing.soft is not None:
        slots = routing.soft.dispatch.to(hidden.dtype).t() @ hidden  # [E*S, d]
        s = routing.soft.slots_per_expert
        counts = torch.full((routing.num_experts,), s, dtype=torch.int64, device=hidden.device)
        return Dispatched(slots, routing.token_index[:0], routing.weight[:0], counts)
    kept = routing.kept.nonzero().squeeze(1)
    experts = routing.expert_index[kept]
    order = torch.sort(experts, stable=True).indices  # stable: token order within an expert
    picked = kept[order]
    tokens = routing.token_index[picked]
    return Dispatched(
        rows=hidden.index_select(0, tokens),
        token_index=tokens,
        weight=routing.weight[picked].to(hidden.dtype),
        counts=torch.bincount(experts, minlength=routing.num_experts),
    )


def combine(routing: Routing, dispatched: Dispatched, expert_out: torch.Tensor) -> torch.Tensor:
    """Scatter expert outputs <dtype>[N, d] back to tokens: <dtype>[T, d] = sum of weighted rows.

    Tokens with no kept assignment get zeros (they pass through the residual outside the layer).
    """
    if routing.soft is not None:
        return routing.soft.combine.to(expert_out.dtype) @ expert_out
    out = torch.zeros(routing.num_tokens, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, dispatched.token_index, expert_out * dispatched.weight[:, None])

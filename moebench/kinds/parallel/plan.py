"""The expert-parallel dispatch plan of one rank: pure functions from a Routing and a Placement.

Each rank routes its own shard of the global batch. For every kept assignment the placement
names a slot (a replica of the expert) and so a destination rank. The rank permutes its
rows into slot order, so the rows bound for rank j are one contiguous chunk and within it
sorted by j's local slot: the layout Megatron-Core's all-to-all token dispatcher sends, with
``input_splits`` the rows per destination rank. The same functions give the byte matrix of
the whole layer, so the engine's measured exchange can be checked against the Routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.kinds.parallel.placement import Placement
from moebench.core.routing import Routing


@dataclass(frozen=True)
class RankPlan:
    """How one rank's kept assignments travel.

    order       <int64>[N]: kept assignment indices in send (slot) order: the permutation.
    tokens      <int64>[N]: the local token of each sent row (hidden rows to gather).
    slot_counts <int64>[ep, L]: rows this rank sends to (rank j, j's local slot l); L slots per rank.
    unpermute   <int64>[N]: for the n-th kept assignment in expert order (the order
                `moebench.core.dispatch.dispatch` uses), the index of its row among the sent rows.
    ref_tokens  <int64>[N]: the local token of each kept assignment in expert order.
    ref_weight  <float32>[N]: its combine weight, in expert order.
    """

    order: torch.Tensor
    tokens: torch.Tensor
    slot_counts: torch.Tensor
    unpermute: torch.Tensor
    ref_tokens: torch.Tensor
    ref_weight: torch.Tensor

    @property
    def input_splits(self) -> torch.Tensor:
        """<int64>[ep]: rows sent to each rank."""
        return self.slot_counts.sum(1)


def rank_plan(routing: Routing, placement: Placement, token_offset: int) -> RankPlan:
    """The plan of a rank whose local token t is global token ``token_offset + t``."""
    kept = routing.kept.nonzero().squeeze(1).cpu()
    experts = routing.expert_index.cpu()[kept]
    tokens = routing.token_index.cpu()[kept]
    slot = placement.slot_of(experts, tokens + token_offset)
    order_in_kept = torch.sort(slot, stable=True).indices  # by slot: dest rank, then its local slot
    counts = torch.bincount(slot, minlength=placement.num_slots).view(placement.ep, placement.slots_per_rank)
    ref = torch.sort(experts, stable=True).indices  # moebench.core.dispatch's order of kept assignments
    position = torch.empty_like(order_in_kept)
    position[order_in_kept] = torch.arange(order_in_kept.numel())
    return RankPlan(
        order=kept[order_in_kept],
        tokens=tokens[order_in_kept],
        slot_counts=counts,
        unpermute=position[ref],
        ref_tokens=tokens[ref],
        ref_weight=routing.weight.cpu()[kept][ref],
    )


def row_matrix(plans: list[RankPlan]) -> torch.Tensor:
    """<int64>[ep, ep]: rows rank i sends to rank j in the dispatch (the combine sends the transpose)."""
    return torch.stack([p.input_splits for p in plans])


def byte_matrix(plans: list[RankPlan], hidden: int, element_bytes: int) -> torch.Tensor:
    """<int64>[ep, ep]: dispatch bytes from rank i to rank j (rows * hidden * element size)."""
    return row_matrix(plans) * (hidden * element_bytes)


def shard_bounds(tokens: int, ep: int, rank: int) -> tuple[int, int]:
    """[lo, hi): the global tokens of ``rank`` when ``tokens`` split evenly over ``ep`` ranks."""
    per = tokens // ep
    return rank * per, (rank + 1) * per

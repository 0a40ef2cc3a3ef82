"""Where experts live: contiguous, round-robin and EPLB placements, as pure tensor functions.

A placement maps S physical *slots* (S = E + redundant) onto ``ep`` ranks, S / ep slots per
rank: slots [r*S/ep, (r+1)*S/ep) are rank r's, and ``slot_expert[s]`` is the logical expert
slot s holds. An expert held by several slots is *replicated*; its tokens are split among
its replicas (`Placement.slot_of`).

EPLB follows the algorithm that deepseek-ai/EPLB describes (DeepSeek-V3's redundant experts):

- hierarchical (the number of nodes divides the number of expert groups): balanced packing
  of expert groups to nodes, then within each node replication of the expert with the
  largest load per replica, then balanced packing of the node's replicas to its GPUs;
- global: the same with one group and one node (replicas packed to all GPUs directly).

Balanced packing is the greedy "largest item first into the lightest pack that still has
room" rule, every pack taking the same number of items; ties go to the lower index, so the
result is deterministic.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from moebench.kinds.parallel.spec import EPLB_POLICIES, PLACEMENTS  # noqa: F401  (the validator's names)


@dataclass(frozen=True)
class Placement:
    """slot_expert <int64>[S]: the logical expert of each physical slot; ep ranks, S/ep slots each.

    policy: how it was made (contiguous, round_robin, eplb-hierarchical, eplb-global).
    """

    slot_expert: torch.Tensor
    ep: int
    num_experts: int
    policy: str = ""

    def __post_init__(self):
        s = self.slot_expert.numel()
        if s % self.ep:
            raise ValueError(f"{s} slots do not split evenly over {self.ep} ranks")
        counts = torch.bincount(self.slot_expert, minlength=self.num_experts)
        if counts.numel() != self.num_experts or bool((counts == 0).any()):
            raise ValueError("every expert needs at least one slot")

    @property
    def num_slots(self) -> int:
        return self.slot_expert.numel()

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep

    def rank_of_slot(self) -> torch.Tensor:
        """<int64>[S]: the rank holding each slot."""
        return torch.arange(self.num_slots) // self.slots_per_rank

    def replica_counts(self) -> torch.Tensor:
        """<int64>[E]: slots (replicas) of each expert."""
        return torch.bincount(self.slot_expert, minlength=self.num_experts)

    def replica_table(self) -> torch.Tensor:
        """<int64>[E, R]: the slots of each expert in slot order, padded with -1 (R: most replicas)."""
        counts = self.replica_counts()
        order = torch.sort(self.slot_expert, stable=True).indices  # slots grouped by expert, in slot order
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(self.num_slots) - starts[self.slot_expert[order]]
        table = torch.full((self.num_experts, int(counts.max())), -1, dtype=torch.int64)
        table[self.slot_expert[order], pos] = order
        return table

    def slot_of(self, expert: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """<int64>[A]: the slot serving each assignment (expert <int64>[A], global token id <int64>[A]).

        A replicated expert's tokens are split among its replicas by global token id modulo
        its replica count: deterministic, rank-independent and even to within one token.
        """
        table = self.replica_table()
        counts = self.replica_counts()
        return table[expert, token % counts[expert]]

    def rank_loads(self, expert_load: torch.Tensor) -> torch.Tensor:
        """<float64>[ep]: expected load of each rank when expert e's load <float>[E] is split
        evenly over its replicas."""
        per_slot = expert_load.double()[self.slot_expert] / self.replica_counts()[self.slot_expert]
        return per_slot.view(self.ep, self.slots_per_rank).sum(1)


def contiguous(num_experts: int, ep: int) -> Placement:
    """Experts [r*E/ep, (r+1)*E/ep) on rank r (Megatron-Core's layout)."""
    _check_divides(num_experts, ep)
    return Placement(torch.arange(num_experts), ep, num_experts, "contiguous")


def round_robin(num_experts: int, ep: int) -> Placement:
    """Expert e on rank e mod ep: rank r's slots hold experts r, r+ep, r+2*ep, ..."""
    _check_divides(num_experts, ep)
    per = num_experts // ep
    slot_expert = (torch.arange(per)[None, :] * ep + torch.arange(ep)[:, None]).reshape(-1)
    return Placement(slot_expert, ep, num_experts, "round_robin")


def _check_divides(num_experts: int, ep: int) -> None:
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts do not split evenly over {ep} ranks")


# ------------------------------------------------------------------------------------ EPLB

def balanced_packing(weight: torch.Tensor, packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n items into ``packs`` packs of n/packs items each, keeping pack weights balanced.

    weight <float>[L, n] (L independent problems). Returns (pack <int64>[L, n], rank_in_pack
    <int64>[L, n]): each item's pack and its position there (0 for the first item packed).
    Items go heaviest first (ties: lower index first) into the lightest pack with room (ties:
    lower pack index).
    """
    layers, n = weight.shape
    if n % packs:
        raise ValueError(f"{n} items do not pack evenly into {packs} packs")
    per_pack = n // packs
    pack = torch.empty(layers, n, dtype=torch.int64)
    rank = torch.empty(layers, n, dtype=torch.int64)
    order = torch.sort(weight.double(), dim=1, descending=True, stable=True).indices
    w = weight.double().tolist()
    for layer in range(layers):
        if per_pack == 1:  # nothing to balance: item i alone in pack i
            pack[layer] = torch.arange(n)
            rank[layer] = 0
            continue
        heap = [(0.0, p) for p in range(packs)]  # (pack weight, pack index): lightest, then lowest index
        filled = [0] * packs
        for item in order[layer].tolist():
            load, p = heapq.heappop(heap)
            pack[layer, item], rank[layer, item] = p, filled[p]
            filled[p] += 1
            if filled[p] < per_pack:
                heapq.heappush(heap, (load + w[layer][item], p))
    return pack, rank


def replicate(weight: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give n experts ``num_slots`` >= n slots: each extra slot goes to the expert whose load
    per replica is largest (ties: lower index).

    weight <float>[L, n]. Returns (slot_item <int64>[L, num_slots]: slots 0..n-1 are the
    experts themselves, then the extra replicas in the order they were added; counts
    <int64>[L, n]: replicas per expert).
    """
    layers, n = weight.shape
    if num_slots < n:
        raise ValueError(f"{num_slots} slots cannot hold {n} experts")
    w = weight.double()
    slot_item = torch.empty(layers, num_slots, dtype=torch.int64)
    slot_item[:, :n] = torch.arange(n)
    counts = torch.ones(layers, n, dtype=torch.int64)
    rows = torch.arange(layers)
    for s in range(n, num_slots):
        per_replica = w / counts
        best = (per_replica == per_replica.max(1, keepdim=True).values).int().argmax(1)  # first maximum
        slot_item[:, s] = best
        counts[rows, best] += 1
    return slot_item, counts


def _place_by_pack(pack: torch.Tensor, rank: torch.Tensor, per_pack: int) -> torch.Tensor:
    """<int64>[L, n]: for each position p = pack*per_pack + rank_in_pack, the item placed there."""
    position = pack * per_pack + rank
    placed = torch.empty_like(position)
    placed.scatter_(1, position, torch.arange(position.shape[1]).expand_as(position).contiguous())
    return placed


def eplb_slots(load: torch.Tensor, num_slots: int, groups: int, nodes: int, gpus: int,
               policy: str = "auto") -> tuple[torch.Tensor, str]:
    """EPLB's placement of E experts with loads <float>[L, E] (or [E]) on ``num_slots`` slots.

    groups: expert groups (experts [g*E/G, (g+1)*E/G) form group g).  nodes: server nodes.
    gpus: ranks in all (a multiple of nodes; num_slots a multiple of gpus).
    policy: hierarchical, global, or auto (hierarchical when nodes divides groups).
    Returns (slot_expert <int64>[L, num_slots] (or [num_slots]), the policy used).
    """
    squeeze = load.dim() == 1
    load = load.double().reshape(-1, load.shape[-1])
    layers, experts = load.shape
    if policy == "auto":
        policy = "hierarchical" if groups % nodes == 0 else "global"
    if policy == "global":
        groups, nodes = 1, 1
    for what, a, b in (("experts", experts, groups), ("groups", groups, nodes), ("gpus", gpus, nodes),
                       ("slots", num_slots, gpus)):
        if a % b:
            raise ValueError(f"EPLB {policy}: {what} ({a}) must be a multiple of {b}")
    group_size, per_node = experts // groups, experts // nodes
    slots_per_node, gpus_per_node = num_slots // nodes, gpus // nodes

    # 1. groups to nodes; node n's experts are its groups' experts in packing order
    group_pack, group_rank = balanced_packing(load.view(layers, groups, group_size).sum(-1), nodes)
    group_order = _place_by_pack(group_pack, group_rank, groups // nodes)  # [L, G]: groups node by node
    node_expert = (group_order[:, :, None] * group_size + torch.arange(group_size)).reshape(layers, experts)

    # 2. replicas within each node: [L * nodes, per_node] problems
    node_load = load.gather(1, node_expert).view(layers * nodes, per_node)
    slot_item, counts = replicate(node_load, slots_per_node)

    # 3. the node's replicas to its GPUs, each replica carrying load / replica count
    replica_load = (node_load / counts).gather(1, slot_item)
    pack, rank = balanced_packing(replica_load, gpus_per_node)
    placed = slot_item.gather(1, _place_by_pack(pack, rank, slots_per_node // gpus_per_node))
    # back to logical experts: node-local item i of node n is node_expert[:, n*per_node + i]
    offsets = (torch.arange(nodes) * per_node).repeat(layers)[:, None]
    slot_expert = node_expert.gather(1, (placed + offsets).view(layers, num_slots))
    return (slot_expert[0] if squeeze else slot_expert), policy


def eplb(load: torch.Tensor, ep: int, redundant: int = 0, groups: int = 1, nodes: int = 1,
         policy: str = "auto") -> Placement:
    """EPLB placement of the E experts with loads <float>[E] on ep ranks with ``redundant``
    extra slots (see `eplb_slots`)."""
    slot_expert, used = eplb_slots(load, load.numel() + redundant, groups, nodes, ep, policy)
    return Placement(slot_expert, ep, load.numel(), f"eplb-{used}")


def make_placement(kind: str, load: torch.Tensor | None, num_experts: int, ep: int, redundant: int = 0,
                   groups: int = 1, nodes: int = 1, policy: str = "auto") -> Placement:
    """The placement a suite names: contiguous, round_robin or eplb (which needs ``load`` <float>[E])."""
    if kind == "contiguous":
        return contiguous(num_experts, ep)
    if kind == "round_robin":
        return round_robin(num_experts, ep)
    if kind == "eplb":
        if load is None:
            load = torch.ones(num_experts)
        return eplb(load, ep, redundant, groups, nodes, policy)
    raise ValueError(f"unknown placement {kind!r}")


def rank_imbalance(rank_load: torch.Tensor) -> float:
    """max / mean of the ranks' loads <float>[ep] (1.0 is perfect)."""
    mean = float(rank_load.double().mean())
    return float(rank_load.max()) / mean if mean > 0 else float("nan")

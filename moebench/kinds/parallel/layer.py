"""One rank's share of an expert-parallel MoE layer, and the single-process layer it must equal.

Shared by the engine (which runs the layer under torch.distributed) and by the reference
(which runs every shard in one process through `moebench.core.dispatch`), so both shard, route and
build experts the same way:

- the global batch is the workload's batch of the case; rank r takes tokens
  [r*T/ep, (r+1)*T/ep) (`shard_inputs`), so the union of the shards is the single-process batch;
- each rank routes its shard with the case's router, its capacity computed for its T/ep
  tokens (as Megatron-Core applies capacity per rank), its randomness from its own stream;
- expert e is the identity or a SiLU MLP [d -> f -> d] whose weights are seeded by (seed, e),
  so every replica of e holds the same weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moebench.core.capacity import expert_capacity
from moebench.core.case import Case
from moebench.core.dispatch import combine, dispatch
from moebench.routers.base import RouteContext, RouteInputs, Router, RouterState
from moebench.core.routing import Routing
from moebench.run.runner import DTYPES, ROUTER_STREAM  # the runner's dtypes; router randomness starts there
from moebench.core.workloads import WORKLOADS, BatchShape, generator

RANK_STREAM = 10_007       # each rank's router stream is offset by rank * RANK_STREAM
EXPERT_STREAM = 5_000_000  # expert weights


def global_batches(case: Case, device: str) -> list[RouteInputs]:
    """The single-process batches of the case's stream."""
    workload = WORKLOADS.create(case.workload.name, case.workload.params)
    shape = BatchShape(case.tokens, case.experts, case.hidden, device, DTYPES[case.dtype])
    return [workload.batch(shape, case.seed, b) for b in range(case.batches)]


def shard_inputs(inputs: RouteInputs, lo: int, hi: int) -> RouteInputs:
    """Tokens [lo, hi) of a batch (vocabulary frequencies are the batch's, shared)."""
    pick = slice(lo, hi)
    return replace(inputs, logits=inputs.logits[pick],
                   hidden=None if inputs.hidden is None else inputs.hidden[pick],
                   token_ids=None if inputs.token_ids is None else inputs.token_ids[pick])


def route_shard(router: Router, inputs: RouteInputs, case: Case, rank: int, batch: int,
                state: RouterState | None) -> Routing:
    """One rank's Routing of its shard <...>[T/ep, E] for batch ``batch`` of the stream."""
    tokens = inputs.logits.shape[0]
    capacity = expert_capacity(case.capacity, tokens, case.experts, case.top_k)
    g = generator(str(inputs.logits.device), case.seed, ROUTER_STREAM + batch + rank * RANK_STREAM)
    return router.route(inputs, RouteContext(case.top_k, capacity, case.drop_policy, g, state))


class Experts:
    """Expert e: identity, or y = silu(x W1_e) W2_e with W1_e <dtype>[d, f], W2_e <dtype>[f, d]."""

    def __init__(self, kind: str, hidden: int, ffn_hidden: int, seed: int, dtype: torch.dtype, device: str):
        self.kind, self.hidden, self.ffn = kind, hidden, ffn_hidden
        self.seed, self.dtype, self.device = seed, dtype, device
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        if expert not in self._weights:  # drawn on CPU so every rank and device gets the same values
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + EXPERT_STREAM + expert)
            w1 = torch.randn(self.hidden, self.ffn, generator=g) / self.hidden ** 0.5
            w2 = torch.randn(self.ffn, self.hidden, generator=g) / self.ffn ** 0.5
            self._weights[expert] = (w1.to(self.device, self.dtype), w2.to(self.device, self.dtype))
        return self._weights[expert]

    def __call__(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """<dtype>[n, d] -> <dtype>[n, d]."""
        if self.kind == "identity":
            return rows
        w1, w2 = self.weights(expert)
        return torch.nn.functional.silu(rows @ w1) @ w2

    def flops_per_row(self) -> float:
        return 0.0 if self.kind == "identity" else 4.0 * self.hidden * self.ffn


def reference_layer(routing: Routing, hidden: torch.Tensor, experts: Experts) -> torch.Tensor:
    """<dtype>[T, d]: the single-process layer of one shard: moebench's dispatch (torch),
    each expert on its rows, moebench's combine (torch)."""
    d = dispatch(routing, hidden, impl="torch")
    starts = torch.cumsum(d.counts, 0) - d.counts
    out = torch.empty_like(d.rows)
    for e in torch.nonzero(d.counts).squeeze(1).tolist():
        lo, n = int(starts[e]), int(d.counts[e])
        out[lo:lo + n] = experts(e, d.rows[lo:lo + n])
    return combine(routing, d, out, impl="torch")


def concat_routings(routings: list[Routing]) -> Routing:
    """The shards' Routings as one Routing of the global batch (token indices offset)."""
    offsets, total = [], 0
    for r in routings:
        offsets.append(total)
        total += r.num_tokens
    cat = torch.cat
    return replace(  # the shards agree on top_k, capacity and aux_counts
        routings[0],
        token_index=cat([r.token_index + o for r, o in zip(routings, offsets)]),
        expert_index=cat([r.expert_index for r in routings]),
        choice=cat([r.choice for r in routings]),
        weight=cat([r.weight for r in routings]),
        kept=cat([r.kept for r in routings]),
        probs=cat([r.probs for r in routings]),
        logits=cat([r.logits for r in routings]),
    )

"""Hash routing: Roller et al. 2021, "Hash Layers For Large Sparse Models".

Each token id is sent to experts by a fixed map of the vocabulary that ignores the logits.
Two maps:

- random (default): a seeded hash of the token id. For each (id, expert) pair a 64-bit key
  h(hash_seed, id, e) is computed (splitmix64, wrapping int64 arithmetic, identical on CPU
  and GPU); the token's k experts are the k experts with the largest keys, in key order.
  So choice 0 is a uniform random map of the id, and choice j is uniform over the experts
  not taken by choices < j: collisions are re-drawn deterministically and the k experts are
  always distinct. The map does not depend on the vocabulary size.
- balanced: Roller et al.'s frequency-balanced assignment. Ids are sorted by descending
  frequency (ties: lower id first) and each is given to the expert with the least expected
  load so far (load = sum of the frequencies given to it; ties: lowest expert index). For
  k > 1 each id takes the k least-loaded experts at once (choice j = the (j+1)-th least
  loaded), each of which gains the id's frequency: the experts are distinct and the total
  expected load (all choices together) is what is balanced. Needs vocab_freq; hash_seed is
  not used.

Maps are lookup tables <int64>[V, k] cached in `RouterState.extra["hash"]`, built once per
stream (each call when there is no state).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from moebench.core.errors import WorkloadMismatchError
from moebench.routers.base import RouteContext, RouteInputs, TokenChoiceRouter, uniform_probs
from moebench.routers.registry import register
from moebench.core.routing import Routing


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def hash_experts(token_ids: torch.Tensor, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """<int64>[N, k]: the random map: per id, the k experts with the largest h(seed, id, e)."""
    ids = token_ids.long()
    seed_key = _mix(torch.tensor(seed, dtype=torch.int64, device=ids.device) * _GOLDEN + _GOLDEN)
    base = _mix(ids * _GOLDEN + seed_key)  # [N]
    experts = torch.arange(1, num_experts + 1, dtype=torch.int64, device=ids.device)
    keys = _mix(base[:, None] + experts[None, :] * _GOLDEN)  # [N, E]
    return torch.topk(keys, top_k, dim=1).indices


def balanced_map(vocab_freq: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """<int64>[V, k]: greedy frequency-balanced assignment of ids to experts (see module doc)."""
    freq = vocab_freq.detach().to("cpu", torch.float64)
    order = torch.sort(-freq, stable=True).indices.tolist()
    f = freq.tolist()
    table = [[0] * top_k for _ in range(len(f))]
    heap = [(0.0, e) for e in range(num_experts)]  # (expected load, expert): ties -> lowest index
    for token in order:
        least = [heapq.heappop(heap) for _ in range(top_k)]  # the k least-loaded, distinct
        for j, (load, e) in enumerate(least):
            table[token][j] = e
            heapq.heappush(heap, (load + f[token], e))
    return torch.tensor(table, dtype=torch.int64).view(len(f), top_k)


@register("hash")
@dataclass(frozen=True)
class HashRouter(TokenChoiceRouter):
    """Hash Layers (Roller et al. 2021): experts from a fixed map of the token id.

    token_ids <int64>[T] (the `tokens` workload) -> experts <int64>[T, k], k distinct per
    token; weights 1/k each; probs = uniform 1/E (the logits are ignored). Capacity and drops
    through `TokenChoiceRouter.finish` (the `probs` policy then falls back to position order).

    hash_seed: seed of the random map.
    balanced: frequency-balanced greedy map from vocab_freq instead of the random one.
    """

    hash_seed: int = 0
    balanced: bool = False

    needs = ("token_ids",)
    paper = "Roller et al. 2021, Hash Layers For Large Sparse Models"
    capture_reason = "token ids are checked against the vocabulary on the host (int(ids.max()))"

    def applicable(self, top_k: int, num_experts: int) -> str | None:
        if top_k > num_experts:
            return f"hash routing needs top_k <= experts (distinct experts); got top_k={top_k}, experts={num_experts}"
        return None

    def _table(
        self, inputs: RouteInputs, num_experts: int, top_k: int, ctx: RouteContext, device: torch.device
    ) -> torch.Tensor | None:
        """<int64>[V, k] map of the whole vocabulary (cached in the state), or None when V is unknown."""
        freq = inputs.vocab_freq
        if freq is None:
            if self.balanced:
                raise WorkloadMismatchError(
                    "balanced hash routing needs vocab_freq (token frequencies); use the `tokens` workload"
                )
            return None
        key = (self.balanced, self.hash_seed, num_experts, top_k, freq.numel(), str(device))
        extra = ctx.state.extra if ctx.state is not None else None
        cached = extra.get("hash") if extra is not None else None
        if cached is not None and cached[0] == key and (not self.balanced or torch.equal(cached[1], freq)):
            return cached[2]
        if self.balanced:
            table = balanced_map(freq, num_experts, top_k).to(device)
        else:
            table = hash_experts(torch.arange(freq.numel(), device=device), num_experts, top_k, self.hash_seed)
        if extra is not None:
            extra["hash"] = (key, freq.detach().clone(), table)
        return table

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        if inputs.token_ids is None:
            raise WorkloadMismatchError("hash routing needs token ids; use the `tokens` workload")
        logits = inputs.logits
        t, e = logits.shape
        ids = inputs.token_ids.long().to(logits.device)
        table = self._table(inputs, e, ctx.top_k, ctx, logits.device)
        if table is not None and ids.numel() and int(ids.max()) >= table.shape[0]:
            if self.balanced:
                raise WorkloadMismatchError(
                    f"hash routing: token id {int(ids.max())} is outside the vocabulary of {table.shape[0]} ids"
                )
            table = None  # the random map is defined for any id: hash directly
        expert = hash_experts(ids, e, ctx.top_k, self.hash_seed) if table is None else table[ids]
        weight = torch.full(expert.shape, 1.0 / ctx.top_k, device=logits.device)
        return self.finish(expert, weight, uniform_probs(logits), logits.float(), ctx)

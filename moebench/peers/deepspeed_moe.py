"""DeepSpeed's gating functions (deepspeed.moe.sharded_moe) as moebench routers.

`peer:deepspeed.topkgating`, `peer:deepspeed.top1gating`, `peer:deepspeed.top2gating` call
the function of that name on fp32 logits (what ``TopKGate.forward`` passes them), with
``sparse_routes=True`` by default: DeepSpeed then returns per-route expert indices (-1 where
capacity dropped the route), capacity locations and gates instead of the dense [T, E, C]
combine/dispatch tensors. ``sparse_routes: false`` asks for the dense tensors; above
``max_dense_elements`` (T*E*C, default 2**27: a 512 MiB fp32 tensor, ~2 GiB peak inside
DeepSpeed) the row is skipped with that reason instead of exhausting memory.

Capacity: DeepSpeed's ``_capacity`` is ``max(ceil(T / E * f), min_capacity)`` in float32 with
f = cf (top1), 2*cf (top2), k*cf (topk). By default the adapter passes ``min_capacity = 0`` and
a factor for which that formula gives the case's capacity; the options ``capacity_factor`` and
``min_capacity`` make DeepSpeed use its own formula instead. A dropless case (no capacity)
runs with ``drop_tokens=False``.

Randomness (top1's Random Token Selection, top2's Gumbel sampling of the 2nd expert) comes
from torch's global RNG; the adapter seeds it from the case's router stream (and restores
it), so rows are reproducible. top2gating adds the Gumbel noise to its input logits in place;
with sampling on the adapter passes a clone.

The assignments before dropping are recomputed from the logits exactly as DeepSpeed selects
them (argmax / top-k of the softmax; for top2 with sampling the Gumbel draw is replayed from
the same seed) and checked against the routes DeepSpeed kept. Weights: kept routes carry
DeepSpeed's gates (top1: the softmax probability; top2 and topk: renormalised over the routes
that were KEPT); a dropped route carries its weight had nothing been dropped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from moebench.peers.base import PeerRouter, PeerSkip, factor_for_capacity, rank_major, seed_from, seeded_global_rng
from moebench.routers.base import RouteContext, RouteInputs
from moebench.routers.registry import register
from moebench.core.routing import Routing

DEFAULT_MAX_DENSE = 2**27


def deepspeed_capacity(sm: Any, tokens: int, experts: int, factor: float, min_capacity: int = 0) -> int:
    """DeepSpeed's _capacity for a gate of [tokens, experts] and an (already scaled) factor."""
    gates = torch.empty((tokens, experts), device="meta")
    return int(sm._capacity(gates, torch.tensor(factor), torch.tensor(min_capacity)))


@dataclass(frozen=True)
class _Prepared:
    sm: Any
    logits: torch.Tensor  # fp32
    top_k: int
    factor: float
    min_capacity: int
    drop_tokens: bool
    drop_policy: str
    seed: int | None
    extra: dict
    sparse: bool  # sparse_routes asked for and supported by this DeepSpeed


@dataclass(frozen=True)
class _DeepSpeedBase(PeerRouter):
    """Options every DeepSpeed adapter takes:
    sparse_routes: per-route output (False: dense [T, E, C]).  max_dense_elements: skip above.
    capacity_factor/min_capacity: give DeepSpeed these instead of the case's capacity.
    """

    sparse_routes: bool = True
    max_dense_elements: int = DEFAULT_MAX_DENSE
    capacity_factor: float | None = None
    min_capacity: int = 0

    package = "deepspeed"
    module = "deepspeed.moe.sharded_moe"
    system = "DeepSpeed"
    function: ClassVar[str] = ""  # the sharded_moe function called
    factor_scale: ClassVar[str] = "k"  # the factor DeepSpeed's function multiplies cf by: "1", "2" or "k"
    policies: ClassVar[tuple[str, ...]] = ()

    def _scale(self, k: int) -> int:
        return {"1": 1, "2": 2, "k": k}[self.factor_scale]

    def _common(self, inputs: RouteInputs, ctx: RouteContext, sm: Any) -> dict:
        logits = inputs.logits.float()
        t, e = logits.shape
        k = ctx.top_k
        scale = self._scale(k)
        drop_tokens = ctx.capacity is not None
        if drop_tokens and ctx.drop_policy not in self.policies:
            raise PeerSkip(self.policy_reason(ctx.drop_policy))
        min_capacity = 0
        if not drop_tokens:
            factor = 1.0
            capacity = None
        elif self.capacity_factor is not None:
            factor, min_capacity = float(self.capacity_factor), int(self.min_capacity)
            if t < min_capacity:
                raise PeerSkip(f"DeepSpeed needs tokens >= min_capacity ({t} < {min_capacity})")
            capacity = deepspeed_capacity(sm, t, e, factor * scale, min_capacity)
        else:
            factor = factor_for_capacity(
                lambda cf: deepspeed_capacity(sm, t, e, cf * scale), ctx.capacity, ctx.capacity * e / (t * scale)
            )
            capacity = ctx.capacity
        fn = getattr(sm, self.function)
        sparse = self.sparse_routes and "sparse_routes" in inspect.signature(fn).parameters
        if not sparse:
            slots = capacity
            if slots is None:  # dropless: DeepSpeed sizes the buffers by the largest demand
                slots = int(self.preselect(logits, k).reshape(-1).bincount(minlength=e).max())
            if t * e * slots > self.max_dense_elements:
                hint = "this DeepSpeed has no sparse_routes" if self.sparse_routes else "use sparse_routes: true"
                raise PeerSkip(
                    f"dense DeepSpeed output [T, E, C] = [{t}, {e}, {slots}] exceeds "
                    f"max_dense_elements={self.max_dense_elements}; {hint}"
                )
        return dict(sm=sm, logits=logits, top_k=k, factor=factor, min_capacity=min_capacity,
                    drop_tokens=drop_tokens, drop_policy=ctx.drop_policy, sparse=sparse)

    def check(self) -> str | None:
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            return f"capacity_factor must be > 0, got {self.capacity_factor}"
        if self.min_capacity < 0:
            return f"min_capacity must be >= 0, got {self.min_capacity}"
        return None

    def preselect(self, logits: torch.Tensor, k: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def policy_reason(self, policy: str) -> str:  # pragma: no cover
        raise NotImplementedError

    # --- conversion shared by the three ----------------------------------------------------
    def _routes(self, native, p: _Prepared, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(kept expert index or -1 <[T, k]>, kept gate <[T, k]>, capacity) from either output form;
        chosen <int64>[T, k]: the selection before dropping (names the routes of the dense form)."""
        if p.sparse:
            _, capacity, _, indices, _, gates, _ = native
            return indices.t().long(), gates.t().float(), (int(capacity) if p.drop_tokens else None)
        _, combine, dispatch, _ = native
        kept_map = dispatch.any(-1)  # [T, E]
        gate_map = combine.sum(-1)
        kept = kept_map.gather(1, chosen)
        return (torch.where(kept, chosen, -1), gate_map.gather(1, chosen),
                (combine.shape[2] if p.drop_tokens else None))

    def _build(self, native, p: _Prepared, chosen: torch.Tensor, predrop_weight: torch.Tensor) -> Routing:
        routed, gates, capacity = self._routes(native, p, chosen)
        kept = routed >= 0
        if not torch.equal(routed[kept], chosen[kept]):
            raise RuntimeError(f"{self.name}: DeepSpeed's kept routes differ from the recomputed selection")
        weight = torch.where(kept, gates, predrop_weight)
        probs = torch.softmax(p.logits, dim=-1)
        return rank_major(chosen, weight, kept, probs, p.logits, capacity)


@register("peer:deepspeed.topkgating")
@dataclass(frozen=True)
class DeepSpeedTopK(_DeepSpeedBase):
    """DeepSpeed sharded_moe.topkgating: top-k of softmax; drop policy probs (ranked by the raw
    softmax probability) or position (token order); kept gates renormalised over kept routes.

    sparse_routes: per-route output (False: dense [T, E, C]).  max_dense_elements: skip above.
    capacity_factor/min_capacity: give DeepSpeed these instead of the case's capacity.
    """

    policies = ("probs", "position")
    function = "topkgating"
    paper = "DeepSpeed deepspeed.moe.sharded_moe.topkgating (needs deepspeed)"

    def policy_reason(self, policy):
        return f"DeepSpeed topkgating has no {policy!r} drop policy (probs or position)"

    def preselect(self, logits, k):
        return torch.topk(torch.softmax(logits, dim=1), k=k, dim=1).indices

    def prepare(self, inputs, ctx, lib) -> _Prepared:
        return _Prepared(seed=None, extra={}, **self._common(inputs, ctx, lib))

    def call(self, p: _Prepared):
        with torch.no_grad():
            return p.sm.topkgating(p.logits, p.top_k, p.factor, p.min_capacity, drop_tokens=p.drop_tokens,
                                   drop_policy=p.drop_policy if p.drop_tokens else "probs",
                                   **({'sparse_routes': True} if p.sparse else {}))

    def convert(self, native, p: _Prepared) -> Routing:
        gates = torch.softmax(p.logits, dim=1)
        top = torch.topk(gates, k=p.top_k, dim=1)
        predrop = top.values / top.values.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        return self._build(native, p, top.indices, predrop)


@register("peer:deepspeed.top1gating")
@dataclass(frozen=True)
class DeepSpeedTop1(_DeepSpeedBase):
    """DeepSpeed sharded_moe.top1gating: argmax of softmax, weight = its probability.

    use_rts: Random Token Selection. null (default): from the case's drop policy — `random`
        turns it on, `position` off (DeepSpeed then keeps the tokens torch.topk picks among
        equal 0/1 mask values); other policies are skipped.
    sparse_routes, max_dense_elements, capacity_factor, min_capacity: as for topkgating.
    """

    use_rts: bool | None = None
    fixed_top_k = 1
    factor_scale = "1"
    policies = ("random", "position")
    function = "top1gating"
    paper = "DeepSpeed deepspeed.moe.sharded_moe.top1gating (needs deepspeed)"

    def policy_reason(self, policy):
        return (f"DeepSpeed top1gating has no {policy!r} drop policy: it drops by Random Token Selection "
                "(use_rts, the case's 'random') or by torch.topk over its 0/1 mask ('position')")

    def preselect(self, logits, k):
        return torch.argmax(torch.softmax(logits, dim=1), dim=1, keepdim=True)

    def _common(self, inputs, ctx, sm):
        if self.use_rts is not None and ctx.capacity is not None:
            ctx = replace(ctx, drop_policy="random" if self.use_rts else "position")
        return super()._common(inputs, ctx, sm)

    def prepare(self, inputs, ctx, lib) -> _Prepared:
        common = self._common(inputs, ctx, lib)
        rts = bool(self.use_rts) if self.use_rts is not None else ctx.drop_policy == "random"
        return _Prepared(seed=seed_from(ctx) if rts else None, extra={"use_rts": rts}, **common)

    def call(self, p: _Prepared):
        with torch.no_grad(), seeded_global_rng(p.seed, p.logits.device):
            return p.sm.top1gating(p.logits, p.factor, p.min_capacity, used_token=None, noisy_gate_policy=None,
                                   drop_tokens=p.drop_tokens, use_rts=p.extra["use_rts"],
                                   **({'sparse_routes': True} if p.sparse else {}))

    def convert(self, native, p: _Prepared) -> Routing:
        gates = torch.softmax(p.logits, dim=1)
        chosen = torch.argmax(gates, dim=1, keepdim=True)
        return self._build(native, p, chosen, gates.gather(1, chosen))


@register("peer:deepspeed.top2gating")
@dataclass(frozen=True)
class DeepSpeedTop2(_DeepSpeedBase):
    """DeepSpeed sharded_moe.top2gating: GShard top-2; drops by position (all 1st choices in
    token order, then 2nd choices); the two gates renormalised over the KEPT routes.

    second_expert_sampling: DeepSpeed's top2_2nd_expert_sampling (Gumbel-max sampling of the
        2nd expert; DeepSpeed's default is on, the adapter's is off: plain top-2).
    sparse_routes, max_dense_elements, capacity_factor, min_capacity: as for topkgating.
    """

    second_expert_sampling: bool = False
    fixed_top_k = 2
    factor_scale = "2"
    policies = ("position",)
    function = "top2gating"
    paper = "DeepSpeed deepspeed.moe.sharded_moe.top2gating (needs deepspeed)"

    def policy_reason(self, policy):
        return (f"DeepSpeed top2gating has no {policy!r} drop policy: it drops by position "
                "(1st choices in token order, then 2nd choices)")

    def preselect(self, logits, k):
        return self._select(logits, None)

    def _select(self, logits: torch.Tensor, seed: int | None) -> torch.Tensor:
        """<int64>[T, 2] as top2gating selects (replaying its Gumbel draw when sampling)."""
        sm = self.library()
        gates = torch.softmax(logits, dim=1)
        first = torch.argmax(gates, dim=1)
        x = logits
        if self.second_expert_sampling:
            x = logits.clone()
            with seeded_global_rng(seed, logits.device):
                x += sm.gumbel_rsample(logits.shape, device=logits.device)
        mask1 = torch.nn.functional.one_hot(first, num_classes=logits.shape[1]).bool()
        second = torch.argmax(x.masked_fill(mask1, float("-inf")), dim=1)
        return torch.stack([first, second], dim=1)

    def prepare(self, inputs, ctx, lib) -> _Prepared:
        common = self._common(inputs, ctx, lib)
        seed = seed_from(ctx) if self.second_expert_sampling else None
        return _Prepared(seed=seed, extra={}, **common)

    def call(self, p: _Prepared):
        x = p.logits.clone() if self.second_expert_sampling else p.logits  # top2gating adds noise in place
        with torch.no_grad(), seeded_global_rng(p.seed, p.logits.device):
            return p.sm.top2gating(x, p.factor, p.min_capacity, drop_tokens=p.drop_tokens,
                                   top2_2nd_expert_sampling=self.second_expert_sampling,
                                   **({'sparse_routes': True} if p.sparse else {}))

    def convert(self, native, p: _Prepared) -> Routing:
        chosen = self._select(p.logits, p.seed)
        gates = torch.softmax(p.logits, dim=1).gather(1, chosen)
        predrop = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        return self._build(native, p, chosen, predrop)

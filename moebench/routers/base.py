"""What a router is: its inputs, its context, its state, and the token-choice pipeline.

A router is a frozen dataclass whose fields are its options (so a suite's `params` map onto
them one to one) with one method, ``route(inputs, ctx) -> Routing``, pure over its inputs.
Stateful behaviour (expert bias) lives in an explicit `RouterState` the runner carries across
the batches of a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from moebench.core import kernels
from moebench.core.drop_policies import fast_keep, get_drop_policy, keep_within_capacity, ranked_by
from moebench.core.routing import RouteContext, RouteInputs, RouterState, Routing  # noqa: F401  (the input types live in core; re-exported here)
from moebench.core.routing_check import InvalidRouting


# `Router.capturable_phases` of a router whose every timed phase can be captured.
CAPTURE_ALL: frozenset[str] = frozenset({"route", "dispatch", "combine"})


class Router:
    """Base of every router. Subclasses are frozen dataclasses registered by name.

    Class attributes describe the router to the runner and the docs:
    paper: the reference.  needs: inputs beyond logits ("hidden", "token_ids").
    fixed_top_k: the only top_k the algorithm defines (switch: 1, gshard: 2), else None.
    capturable_phases: the phases timing mode cuda_graph can capture for this router, in the
        static-shape forms of `moebench.run.capture` (route: the form registered there for the
        class, else the router's own `route`, which must then be sync-free); the others are
        skipped there with `capture_reason`. dispatch and combine only move the rows of a given
        Routing, so every router has them.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    fixed_top_k: ClassVar[int | None] = None
    capturable_phases: ClassVar[frozenset[str]] = frozenset({"dispatch", "combine"})
    capture_reason: ClassVar[str] = "its route has no static-shape, sync-free form in moebench.run.capture"
    baseline: ClassVar[bool] = False  # a reference point (reports show it, never rank it best)
    case_notes: ClassVar[dict[str, str]] = {}  # condition (dropless, capacity, single_batch, always) -> note

    def applicable(self, top_k: int, num_experts: int) -> str | None:
        """None if the router can run at this shape, else the reason it is skipped."""
        if self.fixed_top_k is not None and top_k != self.fixed_top_k:
            return f"{self.name} routes each token to exactly {self.fixed_top_k} expert(s); case has top_k={top_k}"
        return None

    def init_state(self, num_experts: int, device: torch.device) -> RouterState:
        return RouterState()

    def update_state(self, state: RouterState, routing: Routing) -> None:
        """Called after each batch of a stream; stateless routers do nothing."""

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class TokenChoiceRouter(Router):
    """Shared options and pipeline of routers where each token picks its experts.

    expert_bias: carry a per-expert bias b (DeepSeek aux-loss-free balancing) that is added to
        the scores for selection only, updated after each batch as
        b_e <- b_e + bias_update_rate * sign(mean(c) - c_e).
    renormalize_after_drop: rescale a token's kept weights to sum to what all its weights
        summed to before dropping (fairseq); off by default (docs/spec.md §2).
    impl: which code computes top-k selection (`choose`) and capacity (`position`, `probs`):
        torch, the numba CPU kernels of `moebench.core.kernels` (same results bit for bit, faster),
        or auto (numba for float32 CPU tensors when numba imports, else torch).
    """

    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    renormalize_after_drop: bool = False
    impl: Literal["auto", "torch", "numba"] = "auto"

    def init_state(self, num_experts, device):
        bias = torch.zeros(num_experts, dtype=torch.float32, device=device) if self.expert_bias else None
        return RouterState(bias=bias)

    def update_state(self, state, routing):
        if state.bias is None:
            return
        load = routing.load().float()
        state.bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def selection_scores(self, scores: torch.Tensor, ctx: RouteContext) -> torch.Tensor:
        """<float32>[T, E]: scores plus the expert bias when one is carried."""
        if ctx.state is not None and ctx.state.bias is not None:
            return scores + ctx.state.bias
        return scores

    def choose(self, scores: torch.Tensor, k: int, ctx: RouteContext,
               normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert <int64>[T, k], weight <float32>[T, k]): the k highest selection scores
        (scores + bias) of each token, highest first, ties -> lowest expert index, and
        weight = scores.gather(1, expert), passed through `normalize_weights` if asked."""
        if kernels.use_numba(self.impl, scores):
            bias = ctx.state.bias if ctx.state is not None else None
            return kernels.topk_select(scores, k, bias, normalize=normalize)
        expert = top_k_experts(self.selection_scores(scores, ctx), k)
        weight = scores.gather(1, expert)
        return expert, normalize_weights(weight) if normalize else weight

    def fused(self, scores: torch.Tensor, k: int, ctx: RouteContext, normalize: bool, probs: torch.Tensor,
              logits: torch.Tensor) -> Routing | None:
        """``finish(*choose(scores, k, ctx, normalize), probs, logits, ctx)`` in one numba call
        (`kernels.route_fused`: the same Routing, bit for bit) where that is the faster path:
        decode-size float32 CPU scores, a drop policy with a fast form, no renormalisation
        after drops. None where it does not apply (the caller takes the general path)."""
        if (self.renormalize_after_drop or scores.dtype != torch.float32 or not scores.is_contiguous()
                or (ctx.capacity is not None and fast_keep(ctx.drop_policy) is None)
                or not kernels.use_numba(self.impl, scores) or not kernels.fused_route_pays(scores)):
            return None
        bias = ctx.state.bias if ctx.state is not None else None
        expert, weight, token, choice, kept = kernels.route_fused(scores, k, bias, normalize, ctx.capacity,
                                                                  ctx.drop_policy)
        return Routing(token_index=token, expert_index=expert.view(-1), choice=choice, weight=weight.view(-1),
                       kept=kept, probs=probs, logits=logits, top_k=k, capacity=ctx.capacity)

    def finish(
        self,
        expert: torch.Tensor,
        weight: torch.Tensor,
        probs: torch.Tensor,
        logits: torch.Tensor,
        ctx: RouteContext,
        priority_scores: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> Routing:
        """Apply capacity and the drop policy to chosen experts and build the Routing.

        expert <int64>[T, k], weight <float32>[T, k]: each token's choices in choice order.
        priority_scores <float32>[T, k]: what `probs` ranks by (default: weight).
        active <bool>[T, k]: choices the router actually makes (GShard's random routing can
            decline a 2nd expert). An inactive choice still takes its place in the capacity
            order and uses up a slot (GShard Algorithm 1 advances the expert's counter either
            way), but it is never kept and is not an assignment of the Routing. Default: all.
        scores <float32>[T, E]: the router's probabilities p before bias and renormalisation,
            when they differ from ``probs`` (sigmoid scores, which ``probs`` row-normalises);
            policies ranked by the token's top probability (`bpr`) take max_e of it.
        """
        t, k = expert.shape
        # [k, T]: rank-major, the `position` order. The numba selection already stores it so
        # (then .t() is free); else stack columns (~6x faster than .t().contiguous()).
        expert_kt = _rank_major(expert)
        weight_kt = _rank_major(weight.float())
        try:
            if (priority_scores is None and active is None and not self.renormalize_after_drop
                    and expert_kt.dtype == torch.int64
                    and (ctx.capacity is None or fast_keep(ctx.drop_policy) is not None)
                    and kernels.use_numba(self.impl, expert_kt, weight_kt)):
                # one serial kernel builds token, choice and kept (capacity fused, ids bound-checked)
                token, choice, kept = kernels.assignments(expert_kt, ctx.capacity, probs.shape[1], ctx.drop_policy,
                                                          weight_kt)
                return Routing(token_index=token, expert_index=expert_kt.reshape(-1), choice=choice,
                               weight=weight_kt.reshape(-1), kept=kept, probs=probs, logits=logits, top_k=k,
                               capacity=ctx.capacity)
            return self._finish_general(expert_kt, weight_kt, probs, logits, ctx, priority_scores, active, scores)
        except kernels.ExpertOutOfRange as exc:  # a plugin's ids, stopped before any kernel wrote with them
            raise InvalidRouting(f"router {self.name!r}: {exc}") from None

    def _finish_general(self, expert_kt, weight_kt, probs, logits, ctx, priority_scores, active, scores) -> Routing:
        """`finish` for every case (any policy, active choices, renormalisation, torch tensors)."""
        k, t = expert_kt.shape
        device = expert_kt.device
        token_kt = torch.arange(t, device=device).expand(k, t)
        choice_kt = torch.arange(k, device=device)[:, None].expand(k, t)
        keep_kernel = fast_keep(ctx.drop_policy) if priority_scores is None else None
        if ctx.capacity is None:
            kept_kt = torch.ones_like(expert_kt, dtype=torch.bool)
        elif keep_kernel is not None and kernels.use_numba(self.impl, expert_kt, weight_kt):
            kept_kt = keep_kernel(expert_kt, weight_kt, ctx.capacity, probs.shape[1]).view(k, t)
        else:
            ranked = weight_kt if priority_scores is None else priority_scores.t()
            if ranked_by(ctx.drop_policy) == "top_prob":
                top = (probs if scores is None else scores).float().max(dim=1).values  # [T]
                ranked = top[None, :].expand(k, t)
            priority = get_drop_policy(ctx.drop_policy)(expert_kt, ranked, ctx.generator).reshape(-1)
            kept_kt = keep_within_capacity(expert_kt.reshape(-1), priority, ctx.capacity, probs.shape[1]).view(k, t)
        if active is not None and ctx.capacity is not None:
            kept_kt = kept_kt & active.t()  # a declined choice used its slot but is not kept
        if self.renormalize_after_drop and ctx.capacity is not None:
            mask = kept_kt if active is None else kept_kt & active.t()
            asked = weight_kt if active is None else torch.where(active.t(), weight_kt, 0.0)
            kept_sum = torch.where(mask, weight_kt, 0.0).sum(0, keepdim=True)
            scale = torch.where(kept_sum > 0, asked.sum(0, keepdim=True) / kept_sum.clamp_min(1e-20), 1.0)
            weight_kt = torch.where(kept_kt, weight_kt * scale, weight_kt)
        select = slice(None) if active is None else active.t().reshape(-1)
        return Routing(
            token_index=token_kt.reshape(-1)[select],
            expert_index=expert_kt.reshape(-1)[select],
            choice=choice_kt.reshape(-1)[select],
            weight=weight_kt.reshape(-1)[select],
            kept=kept_kt.reshape(-1)[select],
            probs=probs,
            logits=logits,
            top_k=k,
            capacity=ctx.capacity,
        )


def _rank_major(x: torch.Tensor) -> torch.Tensor:
    """<dtype>[k, T] contiguous from x <dtype>[T, k]."""
    xt = x.t()
    return xt if xt.is_contiguous() else torch.stack(x.unbind(1))


def normalize_weights(weight: torch.Tensor) -> torch.Tensor:
    """<float32>[T, k]: each token's weights divided by their sum (clamped at 1e-20).

    The sum is taken column by column in rank order, so the numba selection kernel (which
    fuses this step) computes the same floats; for the small k of routing this is also faster
    than a reduction over the last dim.
    """
    total = weight[:, 0]
    for j in range(1, weight.shape[1]):
        total = total + weight[:, j]
    return weight / total.clamp_min(1e-20)[:, None]


def top_k_experts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """<int64>[T, k]: the k largest scores of each row, highest first, ties -> lowest index.

    (= ``torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]``.)
    torch.topk orders equal values arbitrarily, so the rows where two of the k+1 largest values
    are equal (rare unless the input is built with ties) are redone with a stable sort.
    """
    if k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # first maximal index
    if k >= scores.shape[-1]:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    values, expert = torch.topk(scores, k + 1, dim=-1)
    expert = expert[:, :k].contiguous()
    tied = (values[:, 1:] == values[:, :-1]).any(dim=-1).nonzero().squeeze(1)
    if tied.numel():
        expert[tied] = torch.sort(scores[tied], dim=-1, descending=True, stable=True).indices[:, :k]
    return expert


def uniform_probs(logits: torch.Tensor) -> torch.Tensor:
    """<float32>[T, E] of 1/E: the 'score' of routers that ignore the logits (baselines, hash)."""
    t, e = logits.shape
    return torch.full((t, e), 1.0 / e, dtype=torch.float32, device=logits.device)

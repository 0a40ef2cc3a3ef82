"""Capturable route phases: each router's `route` with the static-shape selection and
capacity of `moebench.run.capture.select` in place of the eager ones.

A router declares the phases it can capture (`Router.capturable_phases`); for "route" the
form used is the one registered here for its class, else the router's own `route` (for
routers whose route is static already: expert choice, dense, Soft MoE). Every form returns
the Routing the eager route returns, field for field (tests/test_capture_equal.py), and runs
under FakeTensorMode without a data-dependent operation (tests/test_capture_static.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from moebench.run.capture.select import CAPTURABLE_POLICIES, choose_static, finish_static, top_k_static
from moebench.routers.base import RouteContext, RouteInputs, Router, TokenChoiceRouter, normalize_weights, uniform_probs
from moebench.routers.baselines import RandomRouter, RoundRobin
from moebench.routers.token_choice import DeepSeek, NoisyTopK, Switch, TopK, affinities, as_probs
from moebench.core.routing import Routing

RouteFn = Callable[[Router, RouteInputs, RouteContext], Routing]
CAPTURE_ROUTES: dict[type, RouteFn] = {}


def _capture_form(cls: type) -> Callable[[RouteFn], RouteFn]:
    def deco(fn: RouteFn) -> RouteFn:
        CAPTURE_ROUTES[cls] = fn
        return fn
    return deco


@_capture_form(TopK)
def route_topk(router: TopK, inputs: RouteInputs, ctx: RouteContext) -> Routing:
    logits = inputs.logits.float()
    scores = affinities(logits, router.score)
    normalizations = int(router.softmax_after_topk) + int(router.renormalize)
    expert, weight = choose_static(router, scores, ctx.top_k, ctx, normalize=normalizations > 0)
    if normalizations == 2:
        weight = normalize_weights(weight)
    if router.route_scale != 1.0:
        weight = weight * router.route_scale
    return finish_static(router, expert, weight, as_probs(scores, router.score), logits, ctx, scores)


@_capture_form(Switch)
def route_switch(router: Switch, inputs: RouteInputs, ctx: RouteContext) -> Routing:
    logits = inputs.logits.float()
    probs = torch.softmax(logits, dim=-1)
    top, weight = choose_static(router, probs, 1, ctx)
    return finish_static(router, top, weight, probs, logits, ctx)


@_capture_form(DeepSeek)
def route_deepseek(router: DeepSeek, inputs: RouteInputs, ctx: RouteContext) -> Routing:
    logits = inputs.logits.float()
    t, e = logits.shape
    scores = torch.sigmoid(logits)
    if router.num_groups == 1:
        expert, weight = choose_static(router, scores, ctx.top_k, ctx, normalize=True)
    else:
        g = router.num_groups
        select = router.selection_scores(scores, ctx)
        group_score = select.view(t, g, e // g).topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.topk(group_score, router.topk_groups, dim=-1).indices
        group_mask = torch.zeros(t, g, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        select = select.masked_fill(~group_mask.repeat_interleave(e // g, dim=1), float("-inf"))
        expert = top_k_static(select, ctx.top_k)
        weight = normalize_weights(scores.gather(1, expert))
    if router.route_scale != 1.0:
        weight = weight * router.route_scale
    return finish_static(router, expert, weight, as_probs(scores, "sigmoid"), logits, ctx, scores)


@_capture_form(NoisyTopK)
def route_noisy_topk(router: NoisyTopK, inputs: RouteInputs, ctx: RouteContext) -> Routing:
    # the noisy choice is already static (randn, topk, gather); only capacity differs
    return finish_static(router, *router.choose(inputs, ctx), ctx)


@_capture_form(RandomRouter)
def route_random(router: RandomRouter, inputs: RouteInputs, ctx: RouteContext) -> Routing:
    logits = inputs.logits
    t, e = logits.shape
    noise = torch.rand(t, e, generator=ctx.generator, device=logits.device)
    expert = torch.topk(noise, ctx.top_k, dim=1).indices
    weight = torch.full(expert.shape, 1.0 / ctx.top_k, device=logits.device)
    return finish_static(router, expert, weight, uniform_probs(logits), logits.float(), ctx)


@_capture_form(RoundRobin)
def route_round_robin(router: RoundRobin, inputs: RouteInputs, ctx: RouteContext) -> Routing:
    logits = inputs.logits
    t, e = logits.shape
    k, device = ctx.top_k, logits.device
    expert = (torch.arange(t, device=device)[:, None] * k + torch.arange(k, device=device)[None, :]) % e
    weight = torch.full(expert.shape, 1.0 / k, device=device)
    return finish_static(router, expert, weight, uniform_probs(logits), logits.float(), ctx)


def route_problem(router: Router, ctx: RouteContext) -> str | None:
    """None if ``router``'s route can be captured for ``ctx``, else why not."""
    if "route" not in router.capturable_phases:
        return f"{router.name}: {router.capture_reason}"
    if isinstance(router, TokenChoiceRouter) and ctx.capacity is not None \
            and ctx.drop_policy not in CAPTURABLE_POLICIES:
        return f"drop policy {ctx.drop_policy!r} has no capturable form (capturable: {', '.join(CAPTURABLE_POLICIES)})"
    return None


def capture_route(router: Router) -> Callable[[RouteInputs, RouteContext], Routing]:
    """The capturable route of ``router``: the form registered for the class whose `route` it
    runs (so a subclass that keeps TopK's route gets TopK's form, one that overrides it does
    not), else its own `route`."""
    owner = next(c for c in type(router).__mro__ if "route" in vars(c))
    form = CAPTURE_ROUTES.get(owner)
    if form is None:
        return router.route
    return lambda inputs, ctx: form(router, inputs, ctx)

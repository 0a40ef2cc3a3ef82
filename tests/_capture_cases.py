"""Shared cases of the capture tests: router configurations, drop policies, adversarial logits."""

from __future__ import annotations

import itertools

import torch

from moebench.routers import RouteContext, RouteInputs, RouterState, create_router

# Every router option that changes the route's code path, for each router whose route is
# declared capturable (tests/test_capture_static.py checks that list is complete).
TOPK_OPTIONS = [
    dict(score=score, softmax_after_topk=sat, renormalize=ren, route_scale=scale)
    for score, sat, ren, scale in itertools.product(["softmax", "sigmoid"], [False, True], [False, True], [1.0, 2.5])
    if not (sat and score == "sigmoid")
]
ROUTER_CONFIGS = [("topk", o) for o in TOPK_OPTIONS] + [
    ("topk", dict(expert_bias=True)),
    ("topk", dict(renormalize=True, renormalize_after_drop=True)),
    ("switch", {}),
    ("switch", dict(expert_bias=True)),
    ("deepseek", {}),
    ("deepseek", dict(route_scale=2.5)),
    ("deepseek", dict(num_groups=4, topk_groups=2)),
    ("expert_choice", {}),
    ("round_robin", {}),
    ("random", {}),
    ("noisy_topk", {}),
    ("noisy_topk", dict(noise_gate=True)),
    ("softmax_dense", {}),
    ("soft_moe", {}),
]
POLICIES = ("position", "probs", "bpr", "random")


def config_id(config) -> str:
    name, params = config
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def adversarial_logits(t: int, e: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named logits [T, E] that stress ties and extremes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "normal": torch.randn(t, e, generator=g),
        "all_equal": torch.zeros(t, e),
        "few_values": torch.randint(0, 3, (t, e), generator=g).float(),
        "extremes": torch.randint(-1, 2, (t, e), generator=g).float() * 1e4,
        "huge_spread": torch.randn(t, e, generator=g) * 1e3,
        "near_ties": 1.0 + torch.randint(0, 2, (t, e), generator=g).float() * 1.2e-7,
        "signed_zeros": torch.where(torch.rand(t, e, generator=g) < 0.5, -0.0, 0.0),
    }


def make_case(name: str, params: dict, logits: torch.Tensor, top_k: int, capacity: int | None, policy: str,
              bias_seed: int | None = 0, d: int = 12):
    """(router, inputs, ctx) with a fresh state (the expert bias drawn with a few equal values, so
    that biased scores tie), hidden states [T, d] and a generator seeded 0."""
    router = create_router(name, params)
    t, e = logits.shape
    state = router.init_state(e, logits.device)
    if state.bias is not None and bias_seed is not None:
        g = torch.Generator().manual_seed(bias_seed)
        state.bias.copy_(torch.randint(-1, 2, (e,), generator=g).float() * 0.25)
    hidden = torch.randn(t, d, generator=torch.Generator().manual_seed(7))
    ctx = RouteContext(top_k, capacity, policy, torch.Generator().manual_seed(0), state or RouterState())
    return router, RouteInputs(logits=logits, hidden=hidden), ctx


def fresh_generator(ctx: RouteContext) -> RouteContext:
    """ctx with its generator reseeded (the eager and capturable route then draw the same numbers)."""
    from dataclasses import replace

    return replace(ctx, generator=torch.Generator().manual_seed(0))


def tied_assignments(a: int, e: int, seed: int, distinct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert <int64>[k, T], score <float32>[k, T]) of about ``a`` assignments, rank-major,
    k = 1 + seed % 3, scores from only ``distinct`` values: capacity under many ties."""
    g = torch.Generator().manual_seed(seed)
    k = 1 + seed % 3
    t = -(-a // k)
    expert = torch.randint(0, e, (k, t), generator=g)
    score = torch.randint(0, distinct, (k, t), generator=g).float() / distinct
    return expert, score

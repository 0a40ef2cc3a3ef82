"""The capturable forms (moebench.run.capture) give exactly what the eager paths give.

Every comparison is torch.equal (same dtype, shape and bits) on every field of the Routing,
on the dispatched rows, tokens, weights and counts, and on the combined output, for the
eager torch path and the numba path alike, on adversarial inputs (all-equal logits, few
distinct values, +-1e4 extremes, near-ties, signed zeros, biases that create ties).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _capture_cases import (POLICIES, ROUTER_CONFIGS, adversarial_logits, config_id, fresh_generator, make_case,
                            tied_assignments)
from moebench.run.capture import capture_route, combine_static, dispatch_static, keep_static, top_k_static
from moebench.run.capture.select import order_keys
from moebench.core.dispatch import combine, dispatch
from moebench.core.drop_policies import keep_within_capacity, position_priority, probs_priority
from moebench.routers.base import top_k_experts

FIELDS = ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits")


def assert_same_routing(a, b, where=""):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, (f, where)
        assert torch.equal(x, y), f"{f} differs {where}"
    assert (a.top_k, a.capacity, a.soft is None) == (b.top_k, b.capacity, b.soft is None), where
    if a.soft is not None:
        assert torch.equal(a.soft.dispatch, b.soft.dispatch) and torch.equal(a.soft.combine, b.soft.combine)


def assert_same_dispatch_and_combine(routing, hidden, where=""):
    """dispatch_static's first N slots are the eager dispatch; combine_static is the eager combine."""
    slots = dispatch_static(routing, hidden)
    out = lambda rows: rows * 3 - 1  # any expert output (noqa: E731)
    for impl in ("torch", "numba"):
        eager = dispatch(routing, hidden, impl=impl)
        if routing.soft is not None:
            assert torch.equal(slots.rows, eager.rows) and torch.equal(slots.counts, eager.counts), where
        else:
            n = eager.rows.shape[0]
            assert int(slots.num_kept) == n and slots.rows.shape[0] == routing.kept.numel(), where
            assert torch.equal(slots.rows[:n], eager.rows), where
            assert torch.equal(slots.token_index[:n], eager.token_index), where
            assert torch.equal(slots.weight[:n], eager.weight), where
            assert torch.equal(slots.counts, eager.counts), where
            assert bool((slots.token_index[n:] == routing.num_tokens).all()), where  # invalid slots marked T
        want = combine(routing, eager, out(eager.rows), impl=impl if hidden.dtype == torch.float32 else "torch")
        assert torch.equal(combine_static(routing, slots, out(slots.rows)), want), (impl, where)


def check_router(name, params, logits, k, capacity, policy, bias_seed=0):
    """Capturable route == eager route (default impl, i.e. numba on CPU, and impl torch)."""
    router, inputs, ctx = make_case(name, params, logits, k, capacity, policy, bias_seed)
    got = capture_route(router)(inputs, fresh_generator(ctx))
    variants = [params, dict(params, impl="torch")] if "impl" in type(router).__dataclass_fields__ else [params]
    for p in variants:
        r, _, _ = make_case(name, p, logits, k, capacity, policy, bias_seed)
        want = r.route(inputs, fresh_generator(ctx))
        assert_same_routing(got, want, f"({name} {p} k={k} C={capacity} {policy})")
    return got, inputs


@pytest.mark.parametrize("config", ROUTER_CONFIGS, ids=[config_id(c) for c in ROUTER_CONFIGS])
def test_routes_are_identical_on_adversarial_inputs(config):
    name, params = config
    t, e = 37, 8  # E does not divide T
    # the tie rule is the capturable forms' own code for the routers that select by score; the
    # others (noise, random, logit-free, static already) run their own ops: fewer inputs suffice
    own_ops = name in ("noisy_topk", "random", "round_robin", "expert_choice", "softmax_dense", "soft_moe")
    for label, logits in adversarial_logits(t, e).items():
        if own_ops and label not in ("normal", "few_values"):
            continue
        for k in ((1,) if name == "switch" else (1, 2, 8) if "num_groups" not in params else (2,)):
            for capacity in (None, 1, min(t, -(-5 * k * t // (4 * e)))):
                for policy in (POLICIES if capacity is not None and label in ("few_values", "normal") else ("position",)):
                    routing, inputs = check_router(name, params, logits, k, capacity, policy)
                    if label == "few_values":
                        assert_same_dispatch_and_combine(routing, inputs.hidden, f"{config} k={k} C={capacity}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dispatch_and_combine_in_half_precision(dtype):
    logits = torch.randint(0, 3, (203, 8), generator=torch.Generator().manual_seed(5)).float()
    for capacity in (None, 1, 7):
        for policy in ("position", "probs"):
            router, inputs, ctx = make_case("topk", dict(renormalize=True), logits, 2, capacity, policy)
            assert_same_dispatch_and_combine(router.route(inputs, ctx), inputs.hidden.to(dtype), (dtype, capacity))


def test_heavy_drops_and_idle_experts():
    """All tokens want experts 0 and 1 with capacity 1: two rows kept, idle experts, tokens
    with nothing kept (whose combined row is zero)."""
    router, inputs, ctx = make_case("topk", {}, torch.zeros(10, 4), 2, 1, "position")
    routing = capture_route(router)(inputs, ctx)
    slots = dispatch_static(routing, inputs.hidden)
    assert slots.counts.tolist() == [1, 1, 0, 0] and int(slots.num_kept) == 2
    assert slots.token_index.tolist() == [0, 0] + [10] * 18
    out = combine_static(routing, slots, slots.rows)
    assert torch.equal(out[1:], torch.zeros(9, inputs.hidden.shape[1]))
    assert_same_dispatch_and_combine(routing, inputs.hidden)


def test_identical_at_scale_on_several_threads():
    """Big enough that torch runs the eager ops multi-threaded (sorts, index_add_)."""
    t, e = 20000, 64
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(9))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for policy in ("position", "probs"):
            routing, inputs = check_router("topk", dict(renormalize=True), logits, 2, 700, policy)
            assert_same_dispatch_and_combine(routing, torch.randn(t, 48, generator=torch.Generator().manual_seed(1)))
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- building blocks


def stable_top_k(scores, k):
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def test_top_k_static_follows_the_tie_rule():
    inf = float("inf")
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([[-0.0, 0.0, -inf, inf, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, inf, -inf, 0.0]])
    for e in (2, 7, 12, 64):
        for scores in (torch.zeros(50, e), torch.randint(0, 3, (50, e), generator=g).float(),
                       torch.rand(50, e, generator=g), special[:, torch.randint(0, 12, (e,), generator=g)].repeat(5, 1)):
            for k in sorted({1, min(2, e), min(3, e), e - 1, e}):
                want = stable_top_k(scores, k)
                assert torch.equal(top_k_static(scores, k), want), (e, k)
                assert torch.equal(top_k_experts(scores, k), want)


def test_order_keys_are_distinct_and_ordered():
    x = torch.tensor([[-float("inf"), -2.0, -1.0, -0.0, 0.0, 1e-45, 1.0, float("inf")]])
    keys = order_keys(x)[0]
    assert keys.unique().numel() == 8
    # -0.0 and 0.0 are equal scores: the lower index (3) wins; otherwise ascending values
    assert torch.argsort(keys).tolist() == [0, 1, 2, 4, 3, 5, 6, 7]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=st.integers(1, 2000), e=st.integers(1, 40), capacity=st.integers(0, 300), seed=st.integers(0, 10**6),
       distinct=st.integers(1, 6))
def test_keep_static_matches_keep_within_capacity(a, e, capacity, seed, distinct):
    expert, score = tied_assignments(a, e, seed, distinct)
    for priority in (position_priority(expert, score), probs_priority(expert, score)):
        flat, prio = expert.reshape(-1), priority.reshape(-1)
        assert torch.equal(keep_static(flat, prio, capacity, e), keep_within_capacity(flat, prio, capacity, e))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 120), e=st.integers(2, 40), data=st.data())
def test_random_routes(t, e, data):
    name, params = data.draw(st.sampled_from([c for c in ROUTER_CONFIGS if c[0] in ("topk", "switch", "deepseek")]))
    if "num_groups" in params:  # 4 groups of >= 2 experts (DeepSeek.applicable)
        e = 8 * max(1, e // 8)
    k = 1 if name == "switch" else data.draw(st.integers(1, min(e, 6) if "num_groups" not in params else 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    palette = data.draw(st.sampled_from(["floats", "few", "extremes"]))
    if palette == "floats":
        logits = torch.randn(t, e, generator=g) * data.draw(st.sampled_from([0.01, 1.0, 30.0]))
    elif palette == "few":
        logits = torch.randint(-2, 3, (t, e), generator=g).float() / 3
    else:
        logits = torch.randint(-1, 2, (t, e), generator=g).float() * 1e4
    capacity = data.draw(st.one_of(st.none(), st.integers(1, max(1, 2 * k * t // e + 2))))
    policy = data.draw(st.sampled_from(POLICIES))
    routing, inputs = check_router(name, params, logits, k, capacity, policy, bias_seed=data.draw(st.integers(0, 9)))
    assert_same_dispatch_and_combine(routing, inputs.hidden)

"""Properties every registered router must satisfy, checked with hypothesis.

The router list is read from the registry at collection time, so routers added later
(base, sinkhorn, hash, soft_moe, plugins) are covered as soon as they register.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.dispatch import combine, dispatch
from moebench.core.drop_policies import DROP_POLICIES
from moebench.core.errors import MoebenchError, WorkloadMismatchError
from moebench.core.metrics import routing_metrics
from moebench.peers.base import PeerSkip
from moebench.routers import RouteContext, RouteInputs, TokenChoiceRouter, create_router, router_classes

# extra option sets for routers whose options change the code path (only where the router exists)
VARIANTS = {
    "topk": [{"score": "sigmoid"}, {"softmax_after_topk": True}, {"renormalize": True},
             {"expert_bias": True, "renormalize_after_drop": True},
             {"impl": "torch", "expert_bias": True}],  # the plain-torch path next to the numba one
    "switch": [{"expert_bias": True}, {"impl": "torch", "expert_bias": True}],
    "deepseek": [{"num_groups": 2, "topk_groups": 1}, {"expert_bias": False}],
    "noisy_topk": [{"noise_gate": True}, {"noise_std": 0.0}],
    "gshard": [{"second_expert_sampling": False}, {"renormalize_after_drop": True}],
}


def _cases():
    out = []
    for name in router_classes():
        for params in [{}] + VARIANTS.get(name, []):
            label = name + "".join(f"-{k}={v}" for k, v in params.items())
            out.append(pytest.param(name, params, id=label))
    return out


CASES = _cases()
VOCAB = 40
HIDDEN = 8
TIES = [-1.0, 0.0, 0.5, 2.0]


@st.composite
def problems(draw, fixed_top_k=None):
    tokens = draw(st.integers(1, 64))
    experts = draw(st.integers(2, 16))
    # routers defined for one k only (switch, gshard, base) get it, so no example is wasted
    top_k = fixed_top_k if fixed_top_k is not None else draw(st.integers(1, min(experts, 4)))
    cf = draw(st.one_of(st.none(), st.floats(0.25, 3.0)))
    policy = draw(st.sampled_from(sorted(DROP_POLICIES)))
    seed = draw(st.integers(0, 2**31 - 1))
    mode = draw(st.sampled_from(["normal", "wide", "ties", "floats"]))
    g = torch.Generator().manual_seed(seed)
    if mode in ("ties", "floats"):
        # a few values spread over the matrix: exact ties within and across tokens; in "floats"
        # hypothesis picks the values (extremes, subnormals, equal neighbours)
        if mode == "ties":
            values = TIES
        else:
            values = draw(st.lists(st.floats(-30.0, 30.0, width=32), min_size=1, max_size=6))
        pick = torch.randint(0, len(values), (tokens, experts), generator=g)
        logits = torch.tensor(values, dtype=torch.float32)[pick]
    else:
        logits = torch.randn(tokens, experts, generator=g) * (1.0 if mode == "normal" else 20.0)
    return tokens, experts, top_k, cf, policy, seed, logits


def make_inputs(logits: torch.Tensor, seed: int) -> RouteInputs:
    tokens = logits.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    freq = torch.arange(1, VOCAB + 1, dtype=torch.float32) ** -1.1
    return RouteInputs(
        logits=logits,
        hidden=torch.randn(tokens, HIDDEN, generator=g),
        token_ids=torch.randint(0, VOCAB, (tokens,), generator=g),
        vocab_freq=freq / freq.sum(),
    )


def run(router, inputs, top_k, capacity, policy, seed, experts, bias):
    state = router.init_state(experts, torch.device("cpu"))
    if state.bias is not None:
        state.bias = bias.clone()
    ctx = RouteContext(top_k, capacity, policy, torch.Generator().manual_seed(seed), state)
    return router.route(inputs, ctx)


def build(name, params):
    try:
        return create_router(name, params)
    except (MoebenchError, TypeError) as exc:
        pytest.skip(f"{name}{params} cannot be built with these options: {exc}")


@pytest.mark.parametrize("name, params", CASES)
def test_router_properties(name, params):
    router = build(name, params)
    fixed = getattr(router, "fixed_top_k", None)

    ran, reasons = [], set()

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(problem=problems(fixed))
    def check(problem):
        reason = router.applicable(problem[2], problem[1])
        if reason is not None:
            reasons.add(reason)  # e.g. deepseek's groups need experts divisible by num_groups
            return
        try:
            check_properties(name, params, router, problem)
        # a peer without this drop policy (e.g. DeepSpeed top1gating and 'bpr'), or a router bound to
        # its own workload (`recorded` replays a trace; tests/test_traces_workload.py covers it)
        except (PeerSkip, WorkloadMismatchError) as exc:
            reasons.add(str(exc))
            return
        ran.append(1)

    check()
    if not ran:  # e.g. a peer adapter whose library is not installed
        pytest.skip(f"{name} applied to no drawn shape: {sorted(reasons)[0]}")


def check_properties(name, params, router, problem):
    tokens, experts, top_k, cf, policy, seed, logits = problem
    capacity = expert_capacity(CapacitySpec(cf), tokens, experts, top_k)
    inputs = make_inputs(logits, seed)
    bias = torch.randn(experts, generator=torch.Generator().manual_seed(seed + 2)) * 0.1
    r = run(router, inputs, top_k, capacity, policy, seed, experts, bias)
    again = run(router, make_inputs(logits.clone(), seed), top_k, capacity, policy, seed, experts, bias)

    # --- shapes and dtypes
    a = r.token_index.numel()
    for field in ("expert_index", "choice", "weight", "kept"):
        assert getattr(r, field).shape == (a,), field
    assert r.token_index.dtype == r.expert_index.dtype == r.choice.dtype == torch.int64
    assert r.kept.dtype == torch.bool
    assert r.weight.is_floating_point()
    assert r.probs.shape == (tokens, experts) and r.logits.shape == (tokens, experts)
    assert r.num_tokens == tokens and r.num_experts == experts
    if a:
        assert 0 <= int(r.token_index.min()) and int(r.token_index.max()) < tokens
        assert 0 <= int(r.expert_index.min()) and int(r.expert_index.max()) < experts
        assert int(r.choice.min()) >= 0

    # --- identical seeds give identical routings
    for field in ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits"):
        assert torch.equal(getattr(r, field), getattr(again, field)), field
    assert r.capacity == again.capacity and r.top_k == again.top_k
    assert (r.soft is None) == (again.soft is None)
    if r.soft is not None:
        assert torch.equal(r.soft.dispatch, again.soft.dispatch)
        assert torch.equal(r.soft.combine, again.soft.combine)

    # --- capacity: load <= C; load + dropped = demand; demand total = assignments
    demand, load = r.demand(), r.load()
    dropped = torch.bincount(r.expert_index[~r.kept], minlength=experts)
    assert torch.equal(load + dropped, demand)
    assert int(demand.sum()) == a
    if r.soft is None:
        if r.capacity is not None:
            assert int(load.max()) <= r.capacity
        pairs = set(zip(r.token_index.tolist(), r.expert_index.tolist()))
        assert len(pairs) == a, "a (token, expert) pair is assigned twice"
    else:  # Soft MoE: dispatch columns and combine rows are distributions
        slots = experts * r.soft.slots_per_expert
        assert r.soft.dispatch.shape == (tokens, slots) and r.soft.combine.shape == (tokens, slots)
        assert torch.allclose(r.soft.dispatch.float().sum(0), torch.ones(slots), atol=1e-4)
        assert torch.allclose(r.soft.combine.float().sum(1), torch.ones(tokens), atol=1e-4)

    # --- weights and probabilities (default options keep weights in [0, 1])
    w = r.weight.float()
    assert torch.isfinite(w).all()
    assert torch.isfinite(r.probs).all()
    assert (r.probs >= 0).all() and (r.probs <= 1 + 1e-6).all()
    assert (w >= 0).all() and (w <= 1 + 1e-5).all(), w  # no variant here sets route_scale

    # --- token choice: the pipeline's guarantees
    if isinstance(router, TokenChoiceRouter):
        assert r.capacity == capacity
        assert r.top_k == top_k
        assert int(r.choice.max()) < top_k
        per_token = torch.bincount(r.token_index, minlength=tokens)
        assert int(per_token.max()) <= top_k
        assert torch.equal(torch.bincount(r.token_index[r.choice == 0], minlength=tokens), torch.ones(tokens, dtype=torch.int64))
        if name != "gshard":  # only GShard's random routing may decline a 2nd choice
            assert a == tokens * top_k
        if capacity is None:
            assert r.kept.all()
        elif name == "gshard" and a < tokens * top_k:
            # a 2nd choice the coin declined still used a slot (GShard Algorithm 1): an expert
            # may drop before its kept load reaches C, never keep beyond it
            assert bool((load <= demand.clamp(max=capacity)).all())
        else:  # every policy is work-conserving: an expert drops only when full
            assert torch.equal(load, demand.clamp(max=capacity))

    # --- dispatch / combine with identity experts
    d = dispatch(r, inputs.hidden)
    out = combine(r, d, d.rows)
    assert out.shape == inputs.hidden.shape and torch.isfinite(out).all()
    if r.soft is None:
        assert torch.equal(d.counts, load)
        assert d.rows.shape[0] == int(r.kept.sum())
        expected = inputs.hidden * r.kept_weight_per_token()[:, None]
        assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)

    # --- metrics are finite where defined
    m = routing_metrics(r)
    assert 0.0 <= m["drop_rate"] <= 1.0
    assert 0.0 <= m["token_drop_rate"] <= 1.0
    if float(load.sum()) > 0 or r.soft is not None:
        for key in ("imbalance", "cv", "entropy", "gini", "expert_usage"):
            assert math.isfinite(m[key]), key
        assert m["imbalance"] >= 1.0 - 1e-9
        assert m["cv"] >= 0.0 and -1e-9 <= m["entropy"] <= 1.0 + 1e-9 and -1e-9 <= m["gini"] < 1.0
    for key in ("aux_loss", "z_loss", "load_cv2", "gate_entropy", "router_confidence",
                "experts_per_token_mean", "min_load", "max_load"):
        assert math.isfinite(m[key]), key
    assert m["aux_loss"] >= 0 and m["z_loss"] >= 0 and m["gate_entropy"] >= -1e-6
    assert m["idle_experts"] + (load > 0).sum() == experts or r.soft is not None
    assert m["experts_per_token_min"] <= m["experts_per_token_mean"] <= m["experts_per_token_max"]


def test_every_router_is_covered():
    names = {p.values[0] for p in CASES}
    assert names == set(router_classes())
    assert {"topk", "switch", "expert_choice", "softmax_dense", "random", "round_robin"} <= names

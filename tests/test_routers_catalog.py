"""The literature routers beyond token choice: BASE, Sinkhorn (S-BASE), Hash Layers, Soft MoE.

Tiny hand-computed cases with literal expectations, then the acceptance properties:
BASE is balanced and exactly optimal (checked against scipy's linear_sum_assignment),
Sinkhorn's plan has uniform expert marginals, Soft MoE's dispatch/combine are distributions,
hash routing refuses workloads without token ids, and every router is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.dispatch import combine, dispatch
from moebench.core.errors import MoebenchError, WorkloadMismatchError
from moebench.core.metrics import routing_metrics
from moebench.routers import RouteContext, RouteInputs, create_router
from moebench.routers.base_layers import balanced_assignment
from moebench.routers.hashing import balanced_map, hash_experts
from moebench.routers.sinkhorn import sinkhorn
from moebench.routers.soft_moe import make_phi, soft_slots
from moebench.core.routing import Routing, SoftSlots

LN3 = math.log(3.0)


def ctx_for(router, experts, top_k=1, capacity=None, policy="position", seed=0):
    return RouteContext(
        top_k=top_k, capacity=capacity, drop_policy=policy,
        generator=torch.Generator().manual_seed(seed), state=router.init_state(experts, "cpu"),
    )


def route(name, logits, params=None, top_k=1, capacity=None, **inputs):
    router = create_router(name, params or {})
    logits = torch.as_tensor(logits, dtype=torch.float32)
    return router.route(RouteInputs(logits=logits, **inputs), ctx_for(router, logits.shape[1], top_k, capacity))


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


# ---------------------------------------------------------------- BASE: hand-computed


def test_base_balances_where_greedy_collapses():
    # every token prefers expert 0; quota 2 each: expert 1 takes the two tokens that lose least
    # by moving (losses 2, 0.5, 1, 4 -> tokens 1 and 2). Objective 3 + 1.5 + 0 + 4 = 8.5.
    x = [[3.0, 1.0], [2.0, 1.5], [1.0, 0.0], [4.0, 0.0]]
    r = route("base", x)
    assert r.expert_index.tolist() == [0, 1, 1, 0]
    assert r.token_index.tolist() == [0, 1, 2, 3] and r.choice.tolist() == [0, 0, 0, 0]
    assert torch.allclose(r.weight, torch.tensor([sig(3.0), sig(1.5), sig(0.0), sig(4.0)]))
    assert r.kept.all() and r.capacity == 2 and r.top_k == 1
    assert torch.allclose(r.probs, torch.softmax(torch.tensor(x), dim=-1))
    greedy = route("base", x, {"inference": True})
    assert greedy.expert_index.tolist() == [0, 0, 0, 0] and greedy.capacity is None
    assert torch.allclose(greedy.weight, torch.tensor([sig(3.0), sig(2.0), sig(1.0), sig(4.0)]))


def test_base_needs_a_chain_of_moves():
    # optimum 13 = 4 + 5 + 4: token 1 must take expert 0, pushing token 0 to 1 and token 2 to 2
    x = [[5.0, 4.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 4.0]]
    assert route("base", x).expert_index.tolist() == [1, 0, 2]


def test_base_uneven_split_goes_where_it_pays():
    # T=5, E=2: one expert gets 3 tokens; expert 1 takes token 4 (its favourite) and token 0
    x = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [0.0, 0.5]]
    assert route("base", x).expert_index.tolist() == [1, 0, 0, 0, 1]
    assert route("base", x).capacity == 3


def test_base_is_top1_only():
    router = create_router("base", {})
    assert router.applicable(1, 4) is None
    assert "top_k=2" in router.applicable(2, 4)


# ---------------------------------------------------------------- BASE: acceptance


def lsa_optimum(x: np.ndarray) -> float:
    """The balanced optimum by scipy on the expanded cost matrix: each expert's column repeated
    floor(T/E) times (those slots must be filled: a bonus M), plus one optional extra slot."""
    t, e = x.shape
    floor = t // e
    big = 1e6
    cost = np.concatenate([np.repeat(-x, floor, axis=1) - big, -x], axis=1)
    rows, cols = linear_sum_assignment(cost)
    expert = np.where(cols < floor * e, cols // max(floor, 1), cols - floor * e)
    return float(x[rows, expert].sum())


@pytest.mark.parametrize("experts", [2, 4, 8, 16])
@pytest.mark.parametrize("seed", range(5))
def test_base_objective_equals_linear_sum_assignment(experts, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, experts)) * rng.uniform(0.2, 4.0)
    x[:, 0] += 2.0 * (seed % 2)  # half the instances have a hot expert
    a = balanced_assignment(x)
    assert np.bincount(a, minlength=experts).tolist() == [32 // experts] * experts
    # plain expansion (E divides T): each column repeated by the quota
    rows, cols = linear_sum_assignment(-np.repeat(x, 32 // experts, axis=1))
    optimum = float(x[rows, cols // (32 // experts)].sum())
    assert x[np.arange(32), a].sum() == pytest.approx(optimum, rel=1e-12, abs=1e-9)
    # the router returns the same assignment
    r = route("base", torch.from_numpy(x).float())
    xf = torch.from_numpy(x).float().double().numpy()
    assert xf[np.arange(32), r.expert_index.numpy()].sum() == pytest.approx(lsa_optimum(xf), rel=1e-9)


@pytest.mark.parametrize("tokens, experts", [(30, 4), (31, 7), (33, 8), (5, 8), (100, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_base_objective_uneven(tokens, experts, seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((tokens, experts)) * 3.0
    if seed % 2:
        x = np.round(x)  # many exact ties
    a = balanced_assignment(x)
    assert x[np.arange(tokens), a].sum() == pytest.approx(lsa_optimum(x), rel=1e-12, abs=1e-9)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(tokens=st.integers(1, 200), experts=st.integers(2, 64), seed=st.integers(0, 2**31 - 1),
       mode=st.sampled_from(["normal", "hot", "ties", "wide"]))
def test_base_loads_differ_by_at_most_one(tokens, experts, seed, mode):
    g = torch.Generator().manual_seed(seed)
    if mode == "ties":
        x = torch.randint(0, 3, (tokens, experts), generator=g).float()
    else:
        x = torch.randn(tokens, experts, generator=g) * (30.0 if mode == "wide" else 1.0)
        if mode == "hot":
            x[:, 0] += 10.0
    r = route("base", x)
    load = r.load()
    assert int(load.sum()) == tokens and r.kept.all()
    assert int(load.max()) - int(load.min()) <= 1
    assert int(load.min()) == tokens // experts and int(load.max()) <= r.capacity == math.ceil(tokens / experts)


# ---------------------------------------------------------------- Sinkhorn


def test_sinkhorn_plan_closed_form():
    # symmetric 2x2: one iteration gives d1 = 1 (error 0), plan = [[3, 1], [1, 3]] / 8
    plan, iters = sinkhorn(torch.tensor([[LN3, 0.0], [0.0, LN3]]))
    assert iters == 1
    assert torch.allclose(plan, torch.tensor([[0.375, 0.125], [0.125, 0.375]], dtype=torch.float64))


def test_sinkhorn_balances_where_top1_collapses():
    # all tokens prefer expert 0 (margins 2, 1, 0.5, 3). Uniform marginals put the threshold at
    # log(b1/b0) ~ 1.61: tokens 0 and 3 stay on expert 0, tokens 1 and 2 move to expert 1.
    x = [[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [3.0, 0.0]]
    assert route("switch", x).expert_index.tolist() == [0, 0, 0, 0]
    r = route("sinkhorn", x)
    assert r.expert_index.tolist() == [0, 1, 1, 0]
    # k = 1: Megatron's sigmoid of the chosen logit
    assert torch.allclose(r.weight, torch.tensor([sig(2.0), 0.5, 0.5, sig(3.0)]))
    assert torch.allclose(r.probs, torch.softmax(torch.tensor(x), dim=-1))
    # capacity 1 with the position policy: the second token of each expert is dropped
    capped = route("sinkhorn", x, capacity=1)
    assert capped.kept.tolist() == [True, True, False, False] and capped.capacity == 1
    # at inference Megatron selects on the activation: plain top-1 again
    assert route("sinkhorn", x, {"inference": True}).expert_index.tolist() == [0, 0, 0, 0]


def test_sinkhorn_top2_weights_are_softmax_at_the_chosen_experts():
    x = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    r = route("sinkhorn", x, top_k=2)
    expert = r.expert_index.view(2, 4).t()  # rank-major -> [T, k]
    assert (expert[:, 0] != expert[:, 1]).all()
    assert torch.allclose(r.weight.view(2, 4).t(), torch.softmax(x, dim=-1).gather(1, expert))


@pytest.mark.parametrize("scale, hot", [(1.0, 0.0), (3.0, 5.0), (10.0, 20.0), (1e4, 0.0)])
def test_sinkhorn_marginals_are_uniform(scale, hot):
    g = torch.Generator().manual_seed(int(scale))
    x = torch.randn(256, 16, generator=g) * scale
    x[:, :2] += hot
    plan, iters = sinkhorn(x, tol=1e-4, max_iters=1000)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(0), torch.full((16,), 1 / 16, dtype=torch.float64), rtol=1e-6)
    if iters < 1000:  # converged by Megatron's criterion: the rows are near 1/T too
        assert torch.allclose(plan.sum(1) * 256, torch.ones(256, dtype=torch.float64), atol=0.05)


def test_sinkhorn_is_shift_invariant_and_stable():
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    plan, iters = sinkhorn(x)
    shifted, iters2 = sinkhorn(x + torch.tensor([[1000.0], [-500.0], [3000.0], [0.0]]))
    assert iters == iters2 and torch.allclose(plan, shifted, rtol=1e-9)
    huge = route("sinkhorn", x * 1e30)  # no inf/NaN however large the logits
    assert torch.isfinite(huge.weight).all()


def reference_sinkhorn_topk(x: torch.Tensor, k: int, tol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """Megatron's loop in float64 on the row-shifted kernel: (top-k of the row-normalised
    plan, sorted per token; iterations)."""
    kernel = torch.exp(x.double() - x.double().max(dim=1, keepdim=True).values)
    t, e = kernel.shape
    d1, error, iters = torch.ones(e, dtype=torch.float64), 1e9, 0
    while error > tol:
        d0 = (1 / t) / (kernel @ d1)
        new = (1 / e) / (d0 @ kernel)
        error, d1, iters = float((d1 - new).abs().mean()), new, iters + 1
    plan = kernel * d1 * d0[:, None]
    return torch.sort(torch.topk(plan / plan.sum(1, keepdim=True), k, dim=1).indices, dim=1).values, iters


@pytest.mark.parametrize("workload, spread", [("zipf", 1.0), ("zipf", 3.5), ("uniform", 1.0)])
def test_sinkhorn_selection_matches_a_float64_reference(workload, spread, monkeypatch):
    from moebench.routers import sinkhorn as sk
    from moebench.core.workloads import WORKLOADS, BatchShape

    x = WORKLOADS.create(workload, {}).batch(BatchShape(4096, 16, 32), 3).logits * spread
    kernel, _, _, iters = sk.sinkhorn_scaling(x)
    assert kernel.dtype == torch.float32  # spread <= FP32_SPREAD: the kernel is stored in float32
    expected, ref_iters = reference_sinkhorn_topk(x, 2)
    # float64 arithmetic: the same stop as the float64 loop (with float32 products the error
    # floor of the sharp 3.5x logits, ~7e-5, sits at tol and the stop comes iterations late)
    assert iters == ref_iters
    r = route("sinkhorn", x, top_k=2)
    assert torch.equal(torch.sort(r.expert_index.view(2, -1).t(), dim=1).values, expected)
    # the blocked CPU iteration (many blocks) gives the unblocked one's plan and selection
    plan, it = sinkhorn(x)
    monkeypatch.setattr(sk, "BLOCK_ELEMENTS", 16 * 100)  # blocks of 100 rows, the last one short
    blocked, it_blocked = sinkhorn(x)
    assert it_blocked == it and torch.allclose(blocked, plan, rtol=1e-5, atol=0)
    assert torch.equal(route("sinkhorn", x, top_k=2).expert_index, r.expert_index)


def test_sinkhorn_wide_logits_use_a_float64_kernel():
    # a token whose logits span more than FP32_SPREAD: exp(-90) is no normal float32; the
    # float64 kernel keeps it and balances as before
    from moebench.routers.sinkhorn import FP32_SPREAD, sinkhorn_scaling

    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [3.0, 0.0], [90.0, 0.0]])
    assert float((x.amax(1) - x.amin(1)).max()) > FP32_SPREAD
    kernel, d0, d1, _ = sinkhorn_scaling(x)
    assert kernel.dtype == d0.dtype == d1.dtype == torch.float64 and float(kernel[4, 1]) > 0
    assert torch.equal(reference_sinkhorn_topk(x, 1)[0], route("sinkhorn", x).expert_index[:, None])


def test_sinkhorn_bias_selects_on_the_normalised_plan():
    # the normalised plan is at most 1 per entry: a bias of 1 on expert 1 wins every token;
    # weights stay sigmoid(x) at the chosen expert (k = 1)
    x = [[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [3.0, 0.0]]
    router = create_router("sinkhorn", {"expert_bias": True})
    ctx = ctx_for(router, 2)
    ctx.state.bias[1] = 1.0
    r = router.route(RouteInputs(logits=torch.tensor(x)), ctx)
    assert r.expert_index.tolist() == [1, 1, 1, 1]
    assert torch.allclose(r.weight, torch.full((4,), 0.5))
    ctx.state.bias[1] = 0.0
    assert router.route(RouteInputs(logits=torch.tensor(x)), ctx).expert_index.tolist() == [0, 1, 1, 0]


# ---------------------------------------------------------------- Hash layers


def test_hash_plain_is_a_fixed_distinct_map():
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 5])
    one = hash_experts(ids, 4, 1, seed=0)[:, 0]
    assert one.tolist() == [3, 2, 2, 1, 2, 3, 1, 0, 3, 3]  # pinned: the map must never change
    two = hash_experts(ids, 4, 2, seed=0)
    assert two[:, 0].tolist() == one.tolist()  # choice 0 is the k = 1 map
    assert (two[:, 0] != two[:, 1]).all()
    assert two[:, 1].tolist() == [0, 0, 0, 0, 0, 2, 0, 3, 0, 2]
    assert torch.equal(two[0], two[8]) and torch.equal(two[5], two[9])  # same id, same experts
    assert not torch.equal(hash_experts(ids, 4, 1, seed=1), hash_experts(ids, 4, 1, seed=0))
    # spread: the map is uniform over experts, and distinct for k = 3 of 8
    many = hash_experts(torch.arange(40_000), 8, 3, seed=7)
    assert (torch.bincount(many[:, 0], minlength=8) - 5000).abs().max() < 300
    assert (many[:, 0] != many[:, 1]).all() and (many[:, 1] != many[:, 2]).all() and (many[:, 0] != many[:, 2]).all()


def test_hash_router_routes_by_token_id():
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 5])
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    r = route("hash", logits, top_k=2, token_ids=ids)
    assert torch.equal(r.expert_index.view(2, 10).t(), hash_experts(ids, 4, 2, 0))
    assert torch.allclose(r.weight, torch.full((20,), 0.5)) and r.kept.all()
    assert torch.allclose(r.probs, torch.full((10, 4), 0.25))
    # with vocab_freq the map is a cached table of the vocabulary: same experts
    router = create_router("hash", {})
    ctx = ctx_for(router, 4, top_k=2)
    freq = torch.ones(8) / 8
    tabled = router.route(RouteInputs(logits=logits, token_ids=ids, vocab_freq=freq), ctx)
    assert torch.equal(tabled.expert_index, r.expert_index)
    assert "hash" in ctx.state.extra
    # ids beyond vocab_freq: the random map hashes them directly; the balanced one refuses
    far = torch.tensor([20, 3])
    out = router.route(RouteInputs(logits=logits[:2], token_ids=far, vocab_freq=freq), ctx)
    assert torch.equal(out.expert_index.view(2, 2).t(), hash_experts(far, 4, 2, 0))
    balanced = create_router("hash", {"balanced": True})
    with pytest.raises(WorkloadMismatchError, match="outside the vocabulary"):
        balanced.route(RouteInputs(logits=logits[:2], token_ids=far, vocab_freq=freq), ctx_for(balanced, 4))


def test_hash_balanced_greedy_literal_map():
    freq = torch.tensor([5.0, 1.0, 3.0, 3.0, 2.0, 1.0])
    # order 0, 2, 3, 4, 1, 5 (ties: lower id); loads (0,0) -> 0:e0 (5,0), 2:e1 (5,3), 3:e1 (5,6),
    # 4:e0 (7,6), 1:e1 (7,7), 5:e0 (tie -> lowest index) (8,7)
    assert balanced_map(freq, 2, 1)[:, 0].tolist() == [0, 1, 1, 1, 0, 0]
    # k = 2 of 3: each id takes the two least-loaded experts; loads end at (10, 10, 10)
    assert balanced_map(freq, 3, 2).tolist() == [[0, 1], [1, 2], [2, 0], [2, 1], [2, 0], [1, 2]]
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    r = route("hash", torch.zeros(6, 2), {"balanced": True}, token_ids=ids, vocab_freq=freq)
    assert r.expert_index.tolist() == [0, 1, 1, 1, 0, 0]


def expected_loads(table: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    return torch.zeros(8, dtype=torch.float64).index_add_(0, table, freq)


def test_hash_balanced_equalises_expected_load():
    freq = torch.arange(1, 2001, dtype=torch.float64) ** -0.8
    loads = expected_loads(balanced_map(freq, 8, 1)[:, 0], freq)
    assert float(loads.max() / loads.mean()) < 1.01
    rand = expected_loads(hash_experts(torch.arange(2000), 8, 1, 0)[:, 0], freq)
    assert float(rand.max() / rand.mean()) > float(loads.max() / loads.mean())
    # steep Zipf: the top id alone outweighs an expert's share; greedy's bound max - min <= max freq
    steep = torch.arange(1, 2001, dtype=torch.float64) ** -1.1
    loads = expected_loads(balanced_map(steep, 8, 1)[:, 0], steep)
    assert float(loads.max() - loads.min()) <= float(steep.max())


def test_hash_needs_token_ids():
    with pytest.raises(WorkloadMismatchError, match="token ids"):
        route("hash", torch.zeros(4, 2))
    with pytest.raises(WorkloadMismatchError, match="vocab_freq"):
        route("hash", torch.zeros(4, 2), {"balanced": True}, token_ids=torch.tensor([0, 1, 2, 3]))
    assert create_router("hash", {}).needs == ("token_ids",)


# ---------------------------------------------------------------- Soft MoE


def test_soft_slots_hand_computed():
    # T=2, E=2, S=1: dispatch softmaxes each column over tokens, combine each row over slots
    soft, weight = soft_slots(torch.tensor([[0.0, LN3], [0.0, 0.0]]), 1)
    assert torch.allclose(soft.dispatch, torch.tensor([[0.5, 0.75], [0.5, 0.25]]))
    assert torch.allclose(soft.combine, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    assert torch.allclose(weight, soft.combine)
    # T=2, E=2, S=2: slots (e0s0, e0s1, e1s0, e1s1); expert weight = its two slots summed
    soft, weight = soft_slots(torch.tensor([[0.0, LN3, 0.0, 0.0], [LN3, 0.0, 0.0, 0.0]]), 2)
    assert torch.allclose(soft.dispatch, torch.tensor([[0.25, 0.75, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5]]))
    assert torch.allclose(soft.combine, torch.tensor([[1, 3, 1, 1], [3, 1, 1, 1]]) / 6.0)
    assert torch.allclose(weight, torch.tensor([[2 / 3, 1 / 3], [2 / 3, 1 / 3]]))


def test_soft_moe_router_uniform_case():
    # zero hidden states: every slot logit is 0, so dispatch = 1/T, combine = 1/(E*S)
    r = route("soft_moe", torch.randn(4, 2), {"slots_per_expert": 2}, top_k=1, capacity=2, hidden=torch.zeros(4, 3))
    assert r.soft.slots_per_expert == 2 and r.capacity == 2
    assert torch.allclose(r.soft.dispatch, torch.full((4, 4), 0.25))
    assert torch.allclose(r.soft.combine, torch.full((4, 4), 0.25))
    assert r.token_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and r.expert_index.tolist() == [0, 1] * 4
    assert torch.allclose(r.weight, torch.full((8,), 0.5)) and r.kept.all()
    assert torch.allclose(r.probs, torch.full((4, 2), 0.5))


def test_soft_moe_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    hidden, logits = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    router = create_router("soft_moe", {"phi_seed": 4})
    ctx = ctx_for(router, 3, top_k=1, capacity=2)
    r = router.route(RouteInputs(logits=logits, hidden=hidden), ctx)
    phi = make_phi(5, 3 * 2, 4)
    assert torch.allclose(phi.norm(dim=0), torch.ones(6))
    h = hidden / hidden.norm(dim=1, keepdim=True)
    expected, weight = soft_slots(h @ phi, 2)
    assert torch.allclose(r.soft.dispatch, expected.dispatch, atol=1e-6)
    assert torch.allclose(r.soft.combine, expected.combine, atol=1e-6)
    assert torch.allclose(r.probs, weight, atol=1e-6) and torch.equal(r.logits, logits)
    assert "soft_moe_phi" in ctx.state.extra


def test_soft_moe_slots_rule():
    router = create_router("soft_moe", {})
    assert router.slots(10, 4, RouteContext(top_k=1, capacity=3)) == 3
    assert router.slots(10, 4, RouteContext(top_k=2, capacity=5)) == 2  # ceil(cf*k*T/E) // k
    assert router.slots(10, 4, RouteContext(top_k=1, capacity=None)) == 3  # dropless: ceil(T/E)
    assert router.slots(10, 4, RouteContext(top_k=4, capacity=1)) == 1
    assert create_router("soft_moe", {"slots_per_expert": 7}).slots(10, 4, RouteContext(1, 3)) == 7


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tokens=st.integers(1, 64), experts=st.integers(1, 8), slots=st.integers(1, 4), dim=st.integers(1, 16),
       scale=st.sampled_from([0.1, 1.0, 30.0]), normalize=st.booleans(), seed=st.integers(0, 1000))
def test_soft_moe_dispatch_and_combine_are_distributions(tokens, experts, slots, dim, scale, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g) * 5
    params = {"slots_per_expert": slots, "scale": scale, "normalize": normalize}
    r = route("soft_moe", torch.randn(tokens, experts, generator=g), params, hidden=hidden)
    assert torch.allclose(r.soft.dispatch.sum(0), torch.ones(experts * slots), atol=1e-5)
    assert torch.allclose(r.soft.combine.sum(1), torch.ones(tokens), atol=1e-5)
    assert torch.allclose(r.kept_weight_per_token(), torch.ones(tokens), atol=1e-5)


def test_soft_moe_needs_hidden():
    with pytest.raises(WorkloadMismatchError, match="hidden"):
        route("soft_moe", torch.zeros(4, 2))


# ---------------------------------------------------------------- Soft MoE per sequence


def soft_routing(soft: SoftSlots, weight: torch.Tensor) -> Routing:
    t, e = weight.shape
    return Routing(
        token_index=torch.arange(t).repeat_interleave(e), expert_index=torch.arange(e).repeat(t),
        choice=torch.zeros(t * e, dtype=torch.int64), weight=weight.reshape(-1),
        kept=torch.ones(t * e, dtype=torch.bool), probs=weight, logits=torch.zeros(t, e), top_k=1,
        capacity=soft.num_sequences * soft.slots_per_expert, soft=soft,
    )


def test_soft_slots_per_sequence_hand_computed():
    # T=4 in 2 sequences of 2, E=2, S=1: dispatch softmaxes each column over its sequence only
    x = torch.tensor([[0.0, LN3], [0.0, 0.0], [LN3, 0.0], [0.0, 0.0]])
    soft, weight = soft_slots(x, 1, sequence_length=2)
    assert soft.num_sequences == 2 and soft.sequence_length == 2 and soft.blocks(soft.dispatch).shape == (2, 2, 2)
    assert torch.allclose(soft.dispatch, torch.tensor([[0.5, 0.75], [0.5, 0.25], [0.75, 0.5], [0.25, 0.5]]))
    assert torch.allclose(soft.combine, torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [0.5, 0.5]]))
    assert torch.allclose(weight, soft.combine)
    # one-hot hidden: each slot row is its mix of its own sequence's tokens, expert-contiguous
    # (e0: seq 0, seq 1; then e1: seq 0, seq 1)
    r = soft_routing(soft, weight)
    d = dispatch(r, torch.eye(4))
    assert d.counts.tolist() == [2, 2]
    assert torch.allclose(d.rows, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.75, 0.25],
                                                [0.75, 0.25, 0, 0], [0, 0, 0.5, 0.5]]))
    # identity experts: token 0 = .25 * (.5, .5) + .75 * (.75, .25); tokens never mix across sequences
    assert torch.allclose(combine(r, d, d.rows), torch.tensor(
        [[0.6875, 0.3125, 0, 0], [0.625, 0.375, 0, 0], [0, 0, 0.6875, 0.3125], [0, 0, 0.625, 0.375]]))


@pytest.mark.parametrize("slots, capacity, top_k", [(2, None, 1), (None, 15, 1), (None, 30, 2), (None, None, 2)])
def test_soft_moe_sequences_route_like_each_sequence_alone(slots, capacity, top_k):
    g = torch.Generator().manual_seed(5)
    n, b, e, dim = 8, 3, 4, 6
    hidden, logits = torch.randn(n * b, dim, generator=g) * 3, torch.randn(n * b, e, generator=g)
    params = {"sequence_length": n, "phi_seed": 2}
    if slots is not None:
        params["slots_per_expert"] = slots
    batch = route("soft_moe", logits, params, top_k=top_k, capacity=capacity, hidden=hidden)
    s = batch.soft.slots_per_expert
    # S per sequence: cf*n/E from the batch's capacity (15 = ceil(1.25*24/4) -> 15 // 3 = 5), or ceil(n/E)
    assert s == {(2, None, 1): 2, (None, 15, 1): 5, (None, 30, 2): 5, (None, None, 2): 2}[(slots, capacity, top_k)]
    assert batch.soft.dispatch.shape == (n * b, e * s) and batch.capacity == b * s
    d = dispatch(batch, hidden)
    assert d.rows.shape == (e * b * s, dim) and d.counts.tolist() == [b * s] * e
    # experts: a different linear map per expert, so a mix-up of slots shows in the output
    scale = torch.arange(1.0, e + 1).repeat_interleave(b * s)[:, None]
    out = combine(batch, d, d.rows * scale)
    for i in range(b):
        rows = slice(i * n, (i + 1) * n)
        alone = route("soft_moe", logits[rows], {"slots_per_expert": s, "phi_seed": 2}, top_k=top_k,
                      hidden=hidden[rows])
        assert alone.soft.num_sequences == 1
        assert torch.allclose(batch.soft.dispatch[rows], alone.soft.dispatch, atol=1e-6)
        assert torch.allclose(batch.soft.combine[rows], alone.soft.combine, atol=1e-6)
        assert torch.allclose(batch.probs[rows], alone.probs, atol=1e-6)
        assert torch.equal(batch.choice.view(-1, e)[rows], alone.choice.view(-1, e))
        da = dispatch(alone, hidden[rows])
        for x in range(e):  # expert x's rows: its S slots of sequence 0, then of sequence 1, ...
            got = d.rows[x * b * s:(x + 1) * b * s][i * s:(i + 1) * s]
            assert torch.allclose(got, da.rows[x * s:(x + 1) * s], atol=1e-5)
        scale_a = torch.arange(1.0, e + 1).repeat_interleave(s)[:, None]
        assert torch.allclose(out[rows], combine(alone, da, da.rows * scale_a), atol=1e-5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), b=st.integers(1, 5), experts=st.integers(1, 6), slots=st.one_of(st.none(), st.integers(1, 3)),
       scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 1000))
def test_soft_moe_sequences_dispatch_and_combine_are_distributions(n, b, experts, slots, scale, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n * b, 5, generator=g)
    params = {"sequence_length": n, "scale": scale, "slots_per_expert": slots}
    r = route("soft_moe", torch.randn(n * b, experts, generator=g), params, capacity=None, hidden=hidden)
    s = r.soft.slots_per_expert
    # within each sequence every slot's column sums to 1; every token's row sums to 1
    assert torch.allclose(r.soft.blocks(r.soft.dispatch).sum(1), torch.ones(b, experts * s), atol=1e-5)
    assert torch.allclose(r.soft.combine.sum(1), torch.ones(n * b), atol=1e-5)
    assert torch.allclose(r.kept_weight_per_token(), torch.ones(n * b), atol=1e-5)
    d = dispatch(r, hidden)
    # a constant hidden state stays constant through dispatch and combine (convex mixes)
    ones = torch.ones(n * b, 5)
    d1 = dispatch(r, ones)
    assert torch.allclose(d1.rows, torch.ones(experts * b * s, 5), atol=1e-5)
    assert torch.allclose(combine(r, d1, d1.rows), ones, atol=1e-5)
    assert torch.isfinite(combine(r, d, d.rows)).all()
    m = routing_metrics(r)
    assert m["drop_rate"] == 0.0 and m["token_drop_rate"] == 0.0


def test_soft_moe_sequence_cost_is_linear_in_tokens():
    # fixed n: S and so the per-token width E*S stay fixed, the matrices grow as T (not T^2)
    e, n = 8, 64
    sizes, plain = [], []
    for t in (256, 1024):
        g = torch.Generator().manual_seed(t)
        hidden, logits = torch.randn(t, 16, generator=g), torch.randn(t, e, generator=g)
        capacity = expert_capacity(CapacitySpec(1.25), t, e, 2)
        r = route("soft_moe", logits, {"sequence_length": n}, top_k=2, capacity=capacity, hidden=hidden)
        assert r.soft.slots_per_expert == 10  # round(1.25 * 64 / 8)
        d = dispatch(r, hidden)
        sizes.append((r.soft.dispatch.numel(), r.soft.combine.numel(), d.rows.shape[0], r.token_index.numel()))
        whole = route("soft_moe", logits, {}, top_k=2, capacity=capacity, hidden=hidden)
        plain.append(whole.soft.dispatch.numel())
    assert all(b == 4 * a for a, b in zip(*sizes))  # 4x the tokens: 4x every size
    assert plain[1] == 16 * plain[0]  # one sequence: S ~ cf*T/E, so T * E*S grows 16x


def test_soft_moe_sequence_length_must_divide_the_batch():
    with pytest.raises(WorkloadMismatchError, match="does not divide"):
        route("soft_moe", torch.zeros(10, 2), {"sequence_length": 4}, hidden=torch.zeros(10, 3))
    assert create_router("soft_moe", {}).check() is None
    with pytest.raises(MoebenchError, match="sequence_length"):
        create_router("soft_moe", {"sequence_length": 0})
    # n = T is one sequence: the same routing as the default
    g = torch.Generator().manual_seed(1)
    hidden, logits = torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)
    one = route("soft_moe", logits, {"sequence_length": 12}, capacity=5, hidden=hidden)
    plain = route("soft_moe", logits, {}, capacity=5, hidden=hidden)
    assert one.soft.num_sequences == 1 and one.capacity == plain.capacity == 5
    assert torch.equal(one.soft.dispatch, plain.soft.dispatch) and torch.equal(one.soft.combine, plain.soft.combine)


# ---------------------------------------------------------------- determinism (all four)


@pytest.mark.parametrize("name, params, top_k", [
    ("base", {}, 1), ("base", {"inference": True}, 1), ("sinkhorn", {}, 1), ("sinkhorn", {}, 2),
    ("hash", {}, 2), ("hash", {"balanced": True}, 2), ("soft_moe", {}, 1), ("soft_moe", {"slots_per_expert": 3}, 2),
])
def test_same_inputs_same_routing(name, params, top_k):
    def once():
        g = torch.Generator().manual_seed(11)
        freq = torch.arange(1, 51, dtype=torch.float32) ** -1.1
        inputs = RouteInputs(
            logits=torch.randn(40, 8, generator=g) * 2, hidden=torch.randn(40, 6, generator=g),
            token_ids=torch.randint(0, 50, (40,), generator=g), vocab_freq=freq / freq.sum(),
        )
        router = create_router(name, params)
        return router.route(inputs, ctx_for(router, 8, top_k, capacity=6, policy="random", seed=5))

    a, b = once(), once()
    for field in ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.capacity == b.capacity and a.top_k == b.top_k
    if a.soft is not None:
        assert torch.equal(a.soft.dispatch, b.soft.dispatch) and torch.equal(a.soft.combine, b.soft.combine)


def test_registered_with_papers():
    from moebench.routers import router_classes

    classes = router_classes()
    for name, author in [("base", "Lewis"), ("sinkhorn", "Clark"), ("hash", "Roller"), ("soft_moe", "Puigcerver")]:
        assert author in classes[name].paper

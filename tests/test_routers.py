"""Literal cases for every built-in router (docs/spec.md §3)."""

import math

import pytest
import torch

from moebench.core import kernels
from moebench.core.metrics import routing_metrics
from moebench.routers import RouteContext, RouteInputs, RouterState, create_router, router_classes
from moebench.core.workloads import BatchShape, create_workload


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def logp(probs):
    """Logits whose softmax is these row-normalised probabilities."""
    return torch.log(t(probs))


def logit(s):
    """Logits whose sigmoid is s."""
    s = t(s)
    return torch.log(s / (1 - s))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def route(name, logits, top_k=1, capacity=None, policy="position", seed=0, state=None, hidden=None, **params):
    r = create_router(name, params)
    return r.route(RouteInputs(logits, hidden=hidden), RouteContext(top_k, capacity, policy, gen(seed), state))


def per_token(routing, field):
    """[[values of token 0 in choice order], ...] for token-choice routings."""
    out = [[] for _ in range(routing.num_tokens)]
    order = torch.argsort(routing.choice * routing.num_tokens + routing.token_index)
    for i in order.tolist():
        out[routing.token_index[i]].append(getattr(routing, field)[i].item())
    return out


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def routings_equal(a, b):
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits")
    )


def test_builtin_routers_registered():
    assert {"softmax_dense", "switch", "topk", "expert_choice", "round_robin", "random", "noisy_topk",
            "gshard", "deepseek"} <= set(router_classes())


# ---------------------------------------------------------------- softmax_dense

def test_softmax_dense_literal():
    r = route("softmax_dense", logp([[0.25, 0.75], [0.6, 0.4]]))
    assert r.token_index.tolist() == [0, 0, 1, 1]
    assert r.expert_index.tolist() == [0, 1, 0, 1]
    assert close(r.weight, [0.25, 0.75, 0.6, 0.4])
    assert r.choice.tolist() == [1, 0, 0, 1]  # rank of the expert within the token
    assert r.kept.all() and r.capacity is None
    assert close(r.probs, [[0.25, 0.75], [0.6, 0.4]])
    assert r.load().tolist() == [2, 2]


def test_softmax_dense_ignores_capacity():
    r = route("softmax_dense", torch.zeros(5, 3), top_k=1, capacity=1)
    assert r.kept.all() and r.load().tolist() == [5, 5, 5]
    assert close(r.weight, torch.full((15,), 1 / 3))


# ---------------------------------------------------------------- switch

def test_switch_literal():
    r = route("switch", logp([[0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]))
    assert r.expert_index.tolist() == [1, 0, 2]
    assert close(r.weight, [0.7, 0.5, 0.8])  # p[e*], not renormalised to 1
    assert r.kept.all()


def test_switch_capacity_position():
    r = route("switch", logp([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]), capacity=2)
    assert r.expert_index.tolist() == [0, 0, 0]
    assert r.kept.tolist() == [True, True, False]
    r = route("switch", logp([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]), capacity=2, policy="probs")
    assert r.kept.tolist() == [False, True, True]


def test_switch_fixed_top_k():
    router = create_router("switch")
    assert router.applicable(1, 8) is None
    assert router.applicable(2, 8) is not None


# ---------------------------------------------------------------- topk

def test_topk_softmax_literal():
    r = route("topk", logp([[0.1, 0.5, 0.3, 0.1], [0.05, 0.15, 0.2, 0.6]]), top_k=2)
    assert per_token(r, "expert_index") == [[1, 2], [3, 2]]
    assert close(per_token(r, "weight"), [[0.5, 0.3], [0.6, 0.2]])
    assert close(r.probs, [[0.1, 0.5, 0.3, 0.1], [0.05, 0.15, 0.2, 0.6]])


def test_topk_renormalize():
    r = route("topk", logp([[0.1, 0.5, 0.3, 0.1], [0.05, 0.15, 0.2, 0.6]]), top_k=2, renormalize=True)
    assert close(per_token(r, "weight"), [[0.625, 0.375], [0.75, 0.25]])


def test_topk_softmax_after_topk_mixtral():
    # softmax over the k chosen logits: p_i / sum of chosen p
    r = route("topk", logp([[0.1, 0.5, 0.3, 0.1], [0.05, 0.15, 0.2, 0.6]]), top_k=2, softmax_after_topk=True)
    assert per_token(r, "expert_index") == [[1, 2], [3, 2]]
    assert close(per_token(r, "weight"), [[0.625, 0.375], [0.75, 0.25]])
    # raw logits (not log-probs): softmax([3, 1]) = [0.880797, 0.119203]
    r = route("topk", t([[3.0, 0.0, 1.0, -2.0]]), top_k=2, softmax_after_topk=True)
    assert per_token(r, "expert_index") == [[0, 2]]
    assert close(per_token(r, "weight"), [[0.8807970779778823, 0.11920292202211755]])


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_topk_ties_go_to_lowest_expert(impl):
    from moebench.core import kernels

    if impl == "numba" and not kernels.available():
        pytest.skip("numba does not import")
    logits = t([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    r = route("topk", logits, top_k=2, impl=impl)
    assert per_token(r, "expert_index") == [[1, 2], [0, 1]]
    r = route("switch", logits, top_k=1, impl=impl)
    assert r.expert_index.tolist() == [1, 0]
    # and the literal softmax case gives the same on both paths
    r = route("topk", logp([[0.1, 0.5, 0.3, 0.1], [0.05, 0.15, 0.2, 0.6]]), top_k=2, impl=impl, capacity=1)
    assert per_token(r, "expert_index") == [[1, 2], [3, 2]]
    assert r.kept.tolist() == [True, True, True, False]  # e2: token 0's 2nd choice first (position)


def test_topk_softmax_after_topk_needs_softmax():
    from moebench.core.errors import MoebenchError

    with pytest.raises(MoebenchError):
        create_router("topk", {"softmax_after_topk": True, "score": "sigmoid"})
    with pytest.raises(MoebenchError):
        create_router("topk", {"route_scale": 0.0})


def test_topk_route_scale():
    r = route("topk", logp([[0.1, 0.5, 0.3, 0.1]]), top_k=2, route_scale=2.5)
    assert close(per_token(r, "weight"), [[1.25, 0.75]])
    r = route("topk", logp([[0.1, 0.5, 0.3, 0.1]]), top_k=2, route_scale=2.5, renormalize=True)
    assert close(per_token(r, "weight"), [[1.5625, 0.9375]])


def test_topk_sigmoid_literal():
    r = route("topk", t([[0.0, 2.0, -1.0, 1.0]]), top_k=2, score="sigmoid")
    assert per_token(r, "expert_index") == [[1, 3]]
    assert close(per_token(r, "weight"), [[0.8807970779778823, 0.7310585786300049]])
    # probs: sigmoid scores normalised per token (what the aux loss averages)
    s = [0.5, 0.8807970779778823, 0.2689414213699951, 0.7310585786300049]
    assert close(r.probs, [[x / sum(s) for x in s]])
    r = route("topk", t([[0.0, 2.0, -1.0, 1.0]]), top_k=2, score="sigmoid", renormalize=True)
    assert close(per_token(r, "weight"), [[0.8807970779778823 / 1.6118556566078872, 0.7310585786300049 / 1.6118556566078872]])


# ---------------------------------------------------------------- expert_choice

def test_expert_choice_literal():
    # p[:, 0] = .9 .8 .7 .6; p[:, 1] = .1 .2 .3 .4
    r = route("expert_choice", logp([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]), capacity=2)
    assert r.expert_index.tolist() == [0, 0, 1, 1]
    assert r.token_index.tolist() == [0, 1, 3, 2]
    assert close(r.weight, [0.9, 0.8, 0.4, 0.3])
    assert r.choice.tolist() == [0, 1, 0, 1]
    assert r.load().tolist() == [2, 2] and r.capacity == 2 and r.kept.all()


def test_expert_choice_tokens_chosen_by_none_or_many():
    logits = logp([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    r = route("expert_choice", logits, capacity=1)
    assert sorted(zip(r.token_index.tolist(), r.expert_index.tolist())) == [(0, 0), (3, 1)]
    m = routing_metrics(r)
    assert m["token_drop_rate"] == 0.5 and m["drop_rate"] == 0.0
    r = route("expert_choice", logits, capacity=3)
    assert r.kept_experts_per_token().tolist() == [1, 2, 2, 1]


def test_expert_choice_each_expert_exactly_c():
    g = gen(3)
    logits = torch.randn(37, 5, generator=g)
    for cap in (1, 4, 8, 37):
        r = route("expert_choice", logits, capacity=cap)
        assert r.load().tolist() == [cap] * 5
        for e in range(5):
            toks = r.token_index[r.expert_index == e]
            assert len(set(toks.tolist())) == cap
            # the chosen tokens are the top-cap by p[:, e]
            p = torch.softmax(logits, -1)[:, e]
            assert p[toks].min() >= torch.cat([p[~torch.isin(torch.arange(37), toks)], t([-1.0])]).max()


def test_expert_choice_dropless_uses_k_tokens_per_expert_on_average():
    r = route("expert_choice", torch.randn(10, 4, generator=gen(1)), top_k=2, capacity=None)
    assert r.capacity == 5 and r.load().tolist() == [5, 5, 5, 5]  # ceil(2*10/4)


# ---------------------------------------------------------------- round_robin

def test_round_robin_literal():
    r = route("round_robin", torch.randn(5, 3, generator=gen()), top_k=2)
    assert per_token(r, "expert_index") == [[0, 1], [2, 0], [1, 2], [0, 1], [2, 0]]
    assert close(r.weight, torch.full((10,), 0.5))
    assert r.load().tolist() == [4, 3, 3]
    assert math.isclose(routing_metrics(r)["imbalance"], 4 / (10 / 3))


@pytest.mark.parametrize("tokens, experts, k", [(6, 4, 2), (8, 8, 1), (12, 6, 3), (5, 5, 4), (64, 16, 4)])
def test_round_robin_perfect_balance(tokens, experts, k):
    assert tokens * k % experts == 0
    r = route("round_robin", torch.randn(tokens, experts, generator=gen()), top_k=k)
    m = routing_metrics(r)
    assert m["imbalance"] == 1.0 and m["cv"] == 0.0 and m["idle_experts"] == 0
    assert r.load().tolist() == [tokens * k // experts] * experts


# ---------------------------------------------------------------- random

def test_random_router():
    logits = torch.randn(2000, 8, generator=gen())
    r = route("random", logits, top_k=3, seed=5)
    experts = torch.stack([r.expert_index[r.token_index == i] for i in range(3)])
    per = torch.tensor(per_token(r, "expert_index"))
    assert per.shape == (2000, 3)
    assert all(len(set(row)) == 3 for row in per.tolist())
    assert close(r.weight, torch.full((6000,), 1 / 3), tol=1e-7)
    assert routings_equal(r, route("random", logits, top_k=3, seed=5))
    assert not torch.equal(r.expert_index, route("random", logits, top_k=3, seed=6).expert_index)
    # uniform over experts: 6000 assignments, 750 expected each, sd ~ 26
    assert (r.load() - 750).abs().max() < 150
    # ignores the logits: the same seed with other logits gives the same experts
    assert torch.equal(r.expert_index, route("random", -logits, top_k=3, seed=5).expert_index)
    del experts


# ---------------------------------------------------------------- noisy_topk

def test_noisy_topk_zero_noise_equals_mixtral_topk():
    logits = torch.randn(50, 6, generator=gen(2))
    noisy = route("noisy_topk", logits, top_k=2, noise_std=0.0)
    mixtral = route("topk", logits, top_k=2, softmax_after_topk=True)
    assert torch.equal(noisy.expert_index, mixtral.expert_index)
    assert torch.equal(noisy.token_index, mixtral.token_index)
    assert torch.allclose(noisy.weight, mixtral.weight, atol=1e-6)


def test_noisy_topk_noise_is_seeded():
    logits = torch.randn(200, 8, generator=gen(2))
    a = route("noisy_topk", logits, top_k=2, seed=1)
    assert routings_equal(a, route("noisy_topk", logits, top_k=2, seed=1))
    b = route("noisy_topk", logits, top_k=2, seed=2)
    assert not torch.equal(a.expert_index, b.expert_index)
    clean = route("topk", logits, top_k=2)
    assert not torch.equal(a.expert_index, clean.expert_index)  # sigma = 1 changes some choices
    # weights are the softmax of the kept noisy values: each token's pair sums to 1
    assert close(torch.tensor(per_token(a, "weight")).sum(1), torch.ones(200))


def test_noisy_topk_noise_gate_needs_hidden():
    assert create_router("noisy_topk", {"noise_gate": True}).needs == ("hidden",)
    assert create_router("noisy_topk").needs == ()
    logits = torch.randn(30, 4, generator=gen(0))
    hidden = torch.randn(30, 16, generator=gen(1))
    a = route("noisy_topk", logits, top_k=2, seed=3, hidden=hidden, noise_gate=True)
    assert routings_equal(a, route("noisy_topk", logits, top_k=2, seed=3, hidden=hidden, noise_gate=True))
    assert not torch.equal(a.weight, route("noisy_topk", logits, top_k=2, seed=4, hidden=hidden, noise_gate=True).weight)


# ---------------------------------------------------------------- gshard

def test_gshard_renormalised_weights_without_sampling():
    r = route("gshard", logp([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]), top_k=2, second_expert_sampling=False)
    assert per_token(r, "expert_index") == [[0, 1], [2, 1]]
    assert close(per_token(r, "weight"), [[0.625, 0.375], [0.7 / 0.9, 0.2 / 0.9]])
    assert r.kept.all() and r.expert_index.numel() == 4


def test_gshard_fixed_top_k():
    router = create_router("gshard")
    assert router.applicable(2, 4) is None and router.applicable(1, 4) is not None


def test_gshard_second_expert_always_kept_when_g2_at_least_half():
    # equal top-2 gates: g2 = 0.5 -> min(1, 2*g2) = 1 -> always kept, whatever the seed
    for seed in range(10):
        r = route("gshard", logp([[0.4, 0.4, 0.2]]), top_k=2, seed=seed)
        assert r.expert_index.numel() == 2


def test_gshard_second_expert_rarely_kept_when_g2_tiny():
    logits = logp([[0.999, 0.0009, 0.0001]] * 1000)
    r = route("gshard", logits, top_k=2, seed=0)
    # g2 = 0.0009/0.9999 -> keep probability ~0.0018: expect ~1.8 of 1000, never more than 15
    assert r.expert_index.numel() - 1000 < 15
    assert (r.choice == 0).sum() == 1000


def test_gshard_random_routing_statistics():
    tokens = 20000
    logits = torch.randn(tokens, 8, generator=gen(0))
    r = route("gshard", logits, top_k=2, capacity=None, seed=1)
    frac = float((r.choice == 1).sum()) / tokens
    g = torch.softmax(logits.double(), -1).topk(2).values
    q = (2 * g[:, 1] / g.sum(-1)).clamp(max=1)
    se = float((q * (1 - q)).mean().sqrt()) / tokens**0.5
    assert abs(frac - float(q.mean())) < 4 * se
    # and it is a real coin flip, not a threshold: some tokens with g2 > 0.25 still drop their 2nd
    second = torch.zeros(tokens, dtype=torch.bool)
    second[r.token_index[r.choice == 1]] = True
    mid = (q > 0.6) & (q < 0.9)
    assert 0.5 < second[mid].float().mean() < 0.95


def test_gshard_position_capacity_first_choices_first():
    # 3 tokens all prefer e0 then e1; capacity 2; sampling off
    logits = logp([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
    r = route("gshard", logits, top_k=2, capacity=2, second_expert_sampling=False)
    assert r.kept.tolist() == [True, True, False, True, True, False]


def _algorithm1(logits, capacity, u):
    """GShard's Algorithm 1 as the paper writes it, one token at a time: {(token, expert): gate}
    of the combined (kept) assignments; u <float32>[T] are the coin draws."""
    probs = torch.softmax(logits.float(), -1)
    top = torch.topk(probs, 2, dim=-1)
    g = top.values / top.values.sum(-1, keepdim=True)
    counter = [0] * logits.shape[1]
    out = {}
    for s in range(logits.shape[0]):  # 1st choices
        e1 = int(top.indices[s, 0])
        if counter[e1] < capacity:
            out[s, e1] = float(g[s, 0])
        counter[e1] += 1
    for s in range(logits.shape[0]):  # 2nd choices: the counter advances whatever the coin says
        e2 = int(top.indices[s, 1])
        if counter[e2] < capacity and float(u[s]) < min(1.0, 2 * float(g[s, 1])):
            out[s, e2] = float(g[s, 1])
        counter[e2] += 1
    return out


@pytest.mark.parametrize("impl", ["torch"] + (["numba"] if kernels.available() else []))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gshard_equals_algorithm1_loop(seed, impl):
    # zipf-like skew so that capacity binds for 1st and 2nd choices
    g = gen(100 + seed)
    logits = torch.randn(300, 8, generator=g) + torch.log(1.0 / torch.arange(1, 9).float()) * 2
    capacity = 50
    r = route("gshard", logits, top_k=2, capacity=capacity, seed=seed, impl=impl)
    u = torch.rand(300, generator=gen(seed))  # the only draw GShard.route makes
    expected = _algorithm1(logits, capacity, u)
    kept = {(int(tk), int(e)): float(w) for tk, e, w, k in
            zip(r.token_index, r.expert_index, r.weight, r.kept) if k}
    assert kept.keys() == expected.keys()
    assert all(abs(kept[key] - expected[key]) < 1e-6 for key in kept)
    assert 0 < int((r.choice == 1).sum()) < 300  # the coin declined some and kept some
    assert int(r.load().max()) == capacity  # and capacity did bind


# ---------------------------------------------------------------- deepseek

def test_deepseek_sigmoid_weights_normalised():
    s = [[0.9, 0.6, 0.5, 0.1]]
    r = route("deepseek", logit(s), top_k=2)
    assert per_token(r, "expert_index") == [[0, 1]]
    assert close(per_token(r, "weight"), [[0.6, 0.4]])
    r = route("deepseek", logit(s), top_k=2, route_scale=2.5)
    assert close(per_token(r, "weight"), [[1.5, 1.0]])
    assert close(r.probs, [[0.9 / 2.1, 0.6 / 2.1, 0.5 / 2.1, 0.1 / 2.1]])


def test_deepseek_group_limit_drops_group_of_best_expert():
    # groups {0, 1} and {2, 3}: group scores (sum of top-2) 0.95 + 0.05 = 1.0 and 0.8 + 0.7 = 1.5.
    # The best expert (0) lies in the dropped group.
    s = [[0.95, 0.05, 0.8, 0.7]]
    r = route("deepseek", logit(s), top_k=1, num_groups=2, topk_groups=1)
    assert r.expert_index.tolist() == [2]
    assert close(r.weight, [1.0])
    r = route("deepseek", logit(s), top_k=2, num_groups=2, topk_groups=1)
    assert per_token(r, "expert_index") == [[2, 3]]
    assert close(per_token(r, "weight"), [[0.8 / 1.5, 0.7 / 1.5]])
    # without the group limit the best expert wins
    assert route("deepseek", logit(s), top_k=1).expert_index.tolist() == [0]
    # keeping both groups is no limit
    assert route("deepseek", logit(s), top_k=2, num_groups=2, topk_groups=2).expert_index.tolist() == [0, 2]


def test_deepseek_group_applicability():
    router = create_router("deepseek", {"num_groups": 4, "topk_groups": 2})
    assert router.applicable(2, 8) is None
    assert router.applicable(2, 6) is not None  # 4 does not divide 6
    assert router.applicable(5, 8) is not None  # 2 groups of 2 experts hold only 4
    assert create_router("deepseek", {"num_groups": 4, "topk_groups": 1}).applicable(2, 4) is not None  # 1 per group


def test_deepseek_bias_changes_selection_not_weights():
    s = [[0.9, 0.6, 0.5, 0.1]]
    router = create_router("deepseek")
    state = router.init_state(4, torch.device("cpu"))
    assert state.bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    state.bias = t([0.0, 0.0, 0.3, 0.0])  # s + b = .9 .6 .8 .1
    r = router.route(RouteInputs(logit(s)), RouteContext(2, None, "position", gen(), state))
    assert per_token(r, "expert_index") == [[0, 2]]
    assert close(per_token(r, "weight"), [[0.9 / 1.4, 0.5 / 1.4]])  # s of chosen / sum, no bias


def test_deepseek_bias_off():
    router = create_router("deepseek", {"expert_bias": False})
    assert router.init_state(4, torch.device("cpu")).bias is None


# ---------------------------------------------------------------- expert bias (any token-choice router)

@pytest.mark.parametrize("name", ["topk", "switch", "gshard", "noisy_topk", "random", "round_robin", "deepseek"])
def test_expert_bias_update_rule(name):
    router = create_router(name, {"expert_bias": True, "bias_update_rate": 0.25})
    k = 2 if name == "gshard" else 1
    state = router.init_state(4, torch.device("cpu"))
    assert state.bias.tolist() == [0.0] * 4
    # 4 tokens; load [3, 1, 0, 0] (mean 1) -> bias += 0.25 * sign(1 - c) = [-.25, 0, .25, .25]
    from moebench.core.routing import Routing

    routing = Routing(
        token_index=t([0, 1, 2, 3], torch.int64), expert_index=t([0, 0, 0, 1], torch.int64),
        choice=t([0, 0, 0, 0], torch.int64), weight=torch.ones(4), kept=torch.ones(4, dtype=torch.bool),
        probs=torch.full((4, 4), 0.25), logits=torch.zeros(4, 4), top_k=k, capacity=None,
    )
    router.update_state(state, routing)
    assert state.bias.tolist() == [-0.25, 0.0, 0.25, 0.25]
    router.update_state(state, routing)
    assert state.bias.tolist() == [-0.5, 0.0, 0.5, 0.5]


def test_expert_bias_uses_kept_load_and_default_rate():
    router = create_router("topk", {"expert_bias": True})
    assert router.bias_update_rate == 1e-3
    state = router.init_state(2, torch.device("cpu"))
    # 3 tokens to expert 0 with capacity 1: load [1, 0], mean 0.5 -> [-1e-3, +1e-3]
    r = router.route(RouteInputs(logp([[0.9, 0.1]] * 3)), RouteContext(1, 1, "position", gen(), state))
    router.update_state(state, r)
    assert close(state.bias, [-1e-3, 1e-3], tol=1e-9)


def test_no_bias_without_option():
    router = create_router("topk")
    state = router.init_state(4, torch.device("cpu"))
    assert state.bias is None
    router.update_state(state, route("topk", torch.randn(4, 4)))
    assert state.bias is None


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_topk_bias_changes_selection_not_weights(impl):
    from moebench.core import kernels

    if impl == "numba" and not kernels.available():
        pytest.skip("numba does not import")
    state = RouterState(bias=t([0.0, 0.5, 0.0]))
    # softmax p = .5 .3 .2; with bias .5 .8 .2 -> expert 1 chosen, weight p = 0.3
    r = route("topk", logp([[0.5, 0.3, 0.2]]), state=state, expert_bias=True, impl=impl)
    assert r.expert_index.tolist() == [1]
    assert close(r.weight, [0.3])
    r = route("switch", logp([[0.5, 0.3, 0.2]]), state=state, expert_bias=True, impl=impl)
    assert r.expert_index.tolist() == [1] and close(r.weight, [0.3])
    # k = 2: s + b = .5 .8 .2 -> experts [1, 0], weights p = [.3, .5]
    r = route("topk", logp([[0.5, 0.3, 0.2]]), top_k=2, state=state, expert_bias=True, impl=impl)
    assert per_token(r, "expert_index") == [[1, 0]] and close(per_token(r, "weight"), [[0.3, 0.5]])


def _stream_imbalance(router_name, expert_bias, batches=50, rate=1e-2, **params):
    router = create_router(router_name, dict(params, expert_bias=expert_bias, bias_update_rate=rate))
    workload = create_workload("zipf")
    shape = BatchShape(tokens=1024, experts=8, hidden=16)
    state = router.init_state(8, torch.device("cpu"))
    out = []
    for b in range(batches):
        inputs = workload.batch(shape, seed=0, batch_index=b)
        routing = router.route(inputs, RouteContext(1, None, "position", gen(b), state))
        router.update_state(state, routing)
        out.append(routing_metrics(routing)["imbalance"])
    return out, state


@pytest.mark.parametrize("name, params", [("switch", {}), ("topk", {"score": "sigmoid"})])
def test_expert_bias_balances_a_zipf_stream(name, params):
    plain, no_state = _stream_imbalance(name, False, **params)
    biased, state = _stream_imbalance(name, True, **params)
    assert no_state.bias is None
    assert plain == pytest.approx([plain[0]] * 50, rel=0.3)  # no drift without bias
    last_plain = sum(plain[-10:]) / 10
    last_biased = sum(biased[-10:]) / 10
    assert last_plain > 2.5  # zipf s=1.2 over 8 experts is very uneven
    assert last_biased < 1.5 and last_biased < 0.6 * last_plain
    assert biased[0] == plain[0]  # the first batch routes with a zero bias
    assert state.bias.abs().max() > 0.05  # the bias moved


# ---------------------------------------------------------------- renormalize_after_drop

RENORM = logp([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
# token 0: e0 (.5), e1 (.3); token 1: e1 (.6), e2 (.3). Capacity 1, position:
# e1 keeps token 1's 1st choice, so token 0's 2nd choice (e1) is dropped.


def test_renormalize_after_drop_rescales_kept_weights():
    r = route("topk", RENORM, top_k=2, capacity=1, renormalize_after_drop=True)
    assert r.kept.tolist() == [True, True, False, True]
    # token 0 asked for .5 + .3 = .8 and kept only e0: its weight becomes .8; token 1 untouched
    assert close(r.weight[r.kept], [0.8, 0.6, 0.3])
    assert close(r.kept_weight_per_token(), [0.8, 0.9])


def test_renormalize_after_drop_off_by_default():
    r = route("topk", RENORM, top_k=2, capacity=1)
    assert close(r.weight, [0.5, 0.6, 0.3, 0.3])
    assert close(r.kept_weight_per_token(), [0.5, 0.9])


def test_renormalize_after_drop_with_renormalized_gates_sums_to_one():
    r = route("topk", RENORM, top_k=2, capacity=1, renormalize=True, renormalize_after_drop=True)
    assert close(r.kept_weight_per_token(), [1.0, 1.0])


def test_renormalize_after_drop_token_with_nothing_kept():
    # both tokens want e0 then e1 with capacity 1: token 1 loses e0 (1st) and e1 (2nd goes to token 0? no:
    # position serves 1st choices first: e0 keeps token 0, e1 keeps nobody's 1st -> token 0's 2nd)
    logits = logp([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    r = route("topk", logits, top_k=1, capacity=1, renormalize_after_drop=True)
    assert r.kept.tolist() == [True, False]
    assert close(r.weight, [0.7, 0.6])  # the dropped token keeps its weight (it contributes nothing)
    assert close(r.kept_weight_per_token(), [0.7, 0.0])


def test_renormalize_after_drop_gshard():
    # t0: e0 (.6), e1 (.3); t1: e0 (.5), e2 (.4); t2: e0 (.5), e1 (.3). Capacity 2, position:
    # e0 keeps the 1st choices of t0 and t1; t2 keeps only its 2nd choice e1 (g2 = .3/.8 = .375)
    logits = logp([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.5, 0.3, 0.2]])
    kw = dict(top_k=2, capacity=2, second_expert_sampling=False)
    r = route("gshard", logits, renormalize_after_drop=True, **kw)
    assert r.kept.tolist() == [True, True, False, True, True, True]
    assert close(r.kept_weight_per_token(), [1.0, 1.0, 1.0])
    assert close(route("gshard", logits, **kw).kept_weight_per_token(), [1.0, 1.0, 0.375])
    # a token dropped entirely keeps nothing
    r = route("gshard", logp([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45]]), renormalize_after_drop=True, **kw)
    assert r.kept.tolist() == [True, True, False, True, True, False]
    assert close(r.kept_weight_per_token(), [1.0, 1.0, 0.0])


def test_base_refuses_k2_and_a_k2_trace_replay_reads_no_uninitialised_memory():
    # #23: a trace header naming BASE as its replay router at top_k=2 made replay_layer return
    # the never-written 2nd column of torch.empty (index 4604121378428289024)
    from moebench.core.errors import MoebenchError
    from moebench.kinds.traces.families import replay_layer

    logits = torch.randn(37, 8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="exactly 1 expert"):
        create_router("base").route(RouteInputs(logits), RouteContext(top_k=2, capacity=None))
    header = {"replay": {"name": "base"}, "top_k": 2, "num_experts": 8}
    with pytest.raises(MoebenchError, match="replay router 'base' cannot replay it: .*top_k=2"):
        replay_layer(header, logits)
    out = replay_layer(dict(header, top_k=1), logits)
    assert out.shape == (37, 1) and int(out.min()) >= 0 and int(out.max()) < 8
    assert sorted(torch.bincount(out[:, 0], minlength=8).tolist()) == [4] * 3 + [5] * 5  # balanced


@pytest.mark.parametrize("t,e,k", [(1000, 8, 2), (4096, 64, 2), (333, 16, 1)])
def test_expert_choice_equals_topk_of_the_column_view_with_ties(t, e, k):
    # the route ranks a contiguous [E, T] copy: torch.topk must give the same order among ties
    logits = torch.randint(0, 3, (t, e), generator=torch.Generator().manual_seed(t)).float()
    r = create_router("expert_choice").route(RouteInputs(logits), RouteContext(top_k=k, capacity=None))
    c = r.capacity
    want = torch.topk(torch.softmax(logits, -1).t(), c, dim=1)
    assert torch.equal(r.token_index, want.indices.reshape(-1)) and torch.equal(r.weight, want.values.reshape(-1))

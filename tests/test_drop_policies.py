"""Drop policies (docs/spec.md §2): which assignments keep a slot when demand exceeds capacity."""

import math

import pytest
import torch

from moebench.core.drop_policies import (
    DROP_POLICIES,
    bpr_priority,
    get_drop_policy,
    keep_within_capacity,
    position_priority,
    probs_priority,
    random_priority,
)
from moebench.core import kernels
from moebench.core.errors import UnknownNameError
from moebench.routers import RouteContext, RouteInputs, create_router


def logits_of(probs):
    """Logits whose softmax is exactly these (row-normalised) probabilities."""
    return torch.log(torch.tensor(probs, dtype=torch.float32))


# every literal case runs on both code paths of the token-choice pipeline (torch and, where numba
# imports, the numba capacity kernels)
IMPLS = ["torch"] + (["numba"] if kernels.available() else [])


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def route(logits, top_k, capacity, policy, seed=0, router="topk", impl="torch", **params):
    r = create_router(router, dict(params, impl=impl))
    g = torch.Generator().manual_seed(seed)
    return r.route(RouteInputs(logits), RouteContext(top_k, capacity, policy, g))


def kept_pairs(routing):
    """Sorted [(token, expert)] of the kept assignments."""
    tok = routing.token_index[routing.kept].tolist()
    exp = routing.expert_index[routing.kept].tolist()
    return sorted(zip(tok, exp))


# ---------------------------------------------------------------- the example: k = 1
# 4 tokens, 2 experts, capacity 1.
#   token 0: p = [0.8, 0.2] -> expert 0 (0.8)
#   token 1: p = [0.4, 0.6] -> expert 1 (0.6)
#   token 2: p = [0.9, 0.1] -> expert 0 (0.9)
#   token 3: p = [0.3, 0.7] -> expert 1 (0.7)
K1 = logits_of([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.3, 0.7]])


def test_k1_position_keeps_first_tokens(impl):
    r = route(K1, 1, 1, "position", impl=impl)
    assert r.expert_index.tolist() == [0, 1, 0, 1]
    assert r.kept.tolist() == [True, True, False, False]
    assert kept_pairs(r) == [(0, 0), (1, 1)]


def test_k1_probs_keeps_highest_probability(impl):
    r = route(K1, 1, 1, "probs", impl=impl)
    assert r.kept.tolist() == [False, False, True, True]
    assert kept_pairs(r) == [(2, 0), (3, 1)]


def test_k1_bpr_keeps_highest_max_score(impl):
    assert kept_pairs(route(K1, 1, 1, "bpr", impl=impl)) == [(2, 0), (3, 1)]


def test_k1_random_structure_and_determinism(impl):
    for seed in range(5):
        r = route(K1, 1, 1, "random", seed=seed, impl=impl)
        assert r.load().tolist() == [1, 1]
        assert r.demand().tolist() == [2, 2]
        assert kept_pairs(r) == kept_pairs(route(K1, 1, 1, "random", seed=seed, impl=impl))
    # over many seeds, each of the two contenders of expert 0 wins sometimes
    winners = {p for s in range(40) for p in kept_pairs(route(K1, 1, 1, "random", seed=s, impl=impl)) if p[1] == 0}
    assert winners == {(0, 0), (2, 0)}


def test_k1_capacity_two_keeps_everything(impl):
    for policy in DROP_POLICIES:
        r = route(K1, 1, 2, policy, impl=impl)
        assert r.kept.all(), policy


# ---------------------------------------------------------------- k = 2, 3 experts, capacity 1
#   token 0: p = [0.50, 0.40, 0.10] -> 1st e0 (0.50), 2nd e1 (0.40)
#   token 1: p = [0.33, 0.36, 0.31] -> 1st e1 (0.36), 2nd e0 (0.33)
#   token 2: p = [0.20, 0.10, 0.70] -> 1st e2 (0.70), 2nd e0 (0.20)
#   token 3: p = [0.15, 0.05, 0.80] -> 1st e2 (0.80), 2nd e0 (0.15)
# expert 1 is asked by token 1's 1st choice (0.36) and token 0's 2nd choice (0.40);
# expert 2 by the 1st choices of token 2 (0.70) and token 3 (0.80).
K2 = logits_of([[0.50, 0.40, 0.10], [0.33, 0.36, 0.31], [0.20, 0.10, 0.70], [0.15, 0.05, 0.80]])


def test_k2_choices_are_as_designed(impl):
    r = route(K2, 2, None, "position", impl=impl)
    # rank-major order: all 1st choices, then all 2nd choices
    assert r.token_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert r.expert_index.tolist() == [0, 1, 2, 2, 1, 0, 0, 0]
    assert r.choice.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.demand().tolist() == [4, 2, 2]


def test_k2_position_serves_all_first_choices_first(impl):
    r = route(K2, 2, 1, "position", impl=impl)
    # e0: token 0's 1st; e1: token 1's 1st beats token 0's higher 2nd; e2: token 2 (earlier)
    assert kept_pairs(r) == [(0, 0), (1, 1), (2, 2)]
    assert r.kept.tolist() == [True, True, True, False, False, False, False, False]


def test_k2_probs_keeps_high_second_choice_over_low_first_choice(impl):
    r = route(K2, 2, 1, "probs", impl=impl)
    # e1: token 0's 2nd choice (0.40) beats token 1's 1st choice (0.36); e2: token 3 (0.80)
    assert kept_pairs(r) == [(0, 0), (0, 1), (3, 2)]
    assert r.kept.tolist() == [True, False, False, True, True, False, False, False]


def test_k2_bpr_first_choices_by_max_score(impl):
    r = route(K2, 2, 1, "bpr", impl=impl)
    # 1st choices before 2nd (e1 keeps token 1), 1st choices by max score (e2 keeps token 3)
    assert kept_pairs(r) == [(0, 0), (1, 1), (3, 2)]


def test_k2_random_serves_first_choices_then_random(impl):
    seen_e2 = set()
    for seed in range(30):
        r = route(K2, 2, 1, "random", seed=seed, impl=impl)
        assert r.load().tolist() == [1, 1, 1]
        pairs = kept_pairs(r)
        assert pairs == kept_pairs(route(K2, 2, 1, "random", seed=seed, impl=impl))
        # random priority is per token within a choice rank: 1st choices are still served first
        assert (0, 0) in pairs and (1, 1) in pairs
        seen_e2.add([p for p in pairs if p[1] == 2][0][0])
    assert seen_e2 == {2, 3}


def test_k2_capacity_two(impl):
    # e0 is asked 4 times: token 0's 1st, then 2nd choices of tokens 1 (0.33), 2 (0.20), 3 (0.15)
    assert kept_pairs(route(K2, 2, 2, "position", impl=impl)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (3, 2)]
    assert kept_pairs(route(K2, 2, 2, "probs", impl=impl)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (3, 2)]
    # bpr: 2nd choices ordered by the token's max score: token 3 (0.80) before token 2 (0.70), token 1 (0.36)
    assert kept_pairs(route(K2, 2, 2, "bpr", impl=impl)) == [(0, 0), (0, 1), (1, 1), (2, 2), (3, 0), (3, 2)]


def test_dropped_weights_not_renormalised_by_default(impl):
    r = route(K2, 2, 1, "position", impl=impl)
    assert torch.allclose(r.weight, torch.tensor([0.50, 0.36, 0.70, 0.80, 0.40, 0.33, 0.20, 0.15]), atol=1e-6)
    # token 0 kept only its 1st choice: its kept weight stays 0.50
    assert torch.allclose(r.kept_weight_per_token(), torch.tensor([0.50, 0.36, 0.70, 0.0]), atol=1e-6)


# ---------------------------------------------------------------- the priority functions directly

EXPERT_KT = torch.tensor([[0, 1, 2, 2], [1, 0, 0, 0]])
SCORES_KT = torch.tensor([[0.50, 0.36, 0.70, 0.80], [0.40, 0.33, 0.20, 0.15]])


def test_position_priority_literal():
    assert position_priority(EXPERT_KT, SCORES_KT).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_probs_priority_literal():
    # descending: .80 .70 .50 .40 .36 .33 .20 .15
    assert probs_priority(EXPERT_KT, SCORES_KT).tolist() == [[2, 4, 1, 0], [3, 5, 6, 7]]


def test_probs_priority_ties_keep_position_order():
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.1, 0.5]])
    expert = torch.zeros(2, 3, dtype=torch.long)
    assert probs_priority(expert, scores).tolist() == [[0, 1, 2], [3, 5, 4]]


def test_bpr_priority_literal():
    # token max scores .50 .36 .70 .80 -> token order 3, 2, 0, 1
    assert bpr_priority(EXPERT_KT, SCORES_KT).tolist() == [[2, 3, 1, 0], [6, 7, 5, 4]]


def test_bpr_uses_token_max_not_choice_score():
    # token 0's 2nd-choice score (0.1) is lower than token 1's (0.3), but token 0's max is higher:
    # among 2nd choices token 0 is served first
    expert = torch.tensor([[0, 1], [1, 0]])
    scores = torch.tensor([[0.9, 0.6], [0.1, 0.3]])
    assert bpr_priority(expert, scores).tolist() == [[0, 1], [2, 3]]
    assert probs_priority(expert, scores).tolist() == [[0, 1], [3, 2]]


def test_random_priority_structure():
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    p1 = random_priority(EXPERT_KT, SCORES_KT, g1)
    p2 = random_priority(EXPERT_KT, SCORES_KT, g2)
    assert torch.equal(p1, p2)
    assert sorted(p1.reshape(-1).tolist()) == list(range(8))
    assert p1[0].max() < p1[1].min()  # every 1st choice before every 2nd choice
    assert torch.equal(p1[1] - p1[0], torch.full((4,), 4))  # one random order per token, reused per rank


def test_random_priority_varies_with_seed():
    orders = {tuple(random_priority(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6),
                                    torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert len(orders) > 5


def test_get_drop_policy():
    assert set(DROP_POLICIES) == {"position", "probs", "bpr", "random"}
    assert get_drop_policy("bpr") is bpr_priority
    with pytest.raises(UnknownNameError, match="did you mean 'probs'"):
        get_drop_policy("prob")


# ---------------------------------------------------------------- keep_within_capacity

def test_keep_within_capacity_literal():
    expert = torch.tensor([0, 0, 1, 0, 1])
    priority = torch.tensor([3, 0, 4, 1, 2])
    assert keep_within_capacity(expert, priority, 2, 2).tolist() == [False, True, True, True, True]
    assert keep_within_capacity(expert, priority, 1, 2).tolist() == [False, True, False, False, True]
    assert keep_within_capacity(expert, priority, 0, 2).tolist() == [False] * 5
    assert keep_within_capacity(expert, priority, 3, 2).tolist() == [True] * 5


def test_keep_within_capacity_with_span_and_gaps():
    # priorities drawn from a larger span (a subset of assignments, as GShard's active 2nd choices)
    expert = torch.tensor([2, 2, 2, 0])
    priority = torch.tensor([9, 1, 5, 7])
    assert keep_within_capacity(expert, priority, 2, 3, span=10).tolist() == [False, True, True, True]


def test_keep_within_capacity_unused_expert_and_empty():
    assert keep_within_capacity(torch.tensor([3, 3]), torch.tensor([1, 0]), 1, 5).tolist() == [False, True]
    empty = torch.zeros(0, dtype=torch.long)
    assert keep_within_capacity(empty, empty, 1, 4).tolist() == []


def test_keep_within_capacity_load_is_min_of_demand_and_capacity():
    g = torch.Generator().manual_seed(0)
    expert = torch.randint(0, 7, (500,), generator=g)
    priority = torch.randperm(500, generator=g)
    for cap in (0, 1, 10, 60, 500):
        kept = keep_within_capacity(expert, priority, cap, 7)
        demand = torch.bincount(expert, minlength=7)
        load = torch.bincount(expert[kept], minlength=7)
        assert torch.equal(load, demand.clamp(max=cap))
        # the kept ones are exactly those of lowest priority within each expert
        for e in range(7):
            pr = priority[expert == e]
            kp = priority[(expert == e) & kept]
            if 0 < kp.numel() < pr.numel():
                assert kp.max() < priority[(expert == e) & ~kept].min()


def test_gshard_position_first_choices_before_second(impl):
    # gshard without sampling: both choices are assignments; capacity 1 with position policy
    logits = logits_of([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3]])
    r = route(logits, 2, 1, "position", router="gshard", second_expert_sampling=False, impl=impl)
    # 1st choices: t0 -> e0, t1 -> e1; 2nd: t0 -> e1 (dropped: e1 full), t1 -> e2 (kept)
    assert kept_pairs(r) == [(0, 0), (1, 1), (1, 2)]
    assert math.isclose(float(r.weight[r.kept][0]), 0.6 / 0.9, rel_tol=1e-6)


def test_fast_keep_only_while_the_policy_is_the_one_it_reproduces(monkeypatch):
    from moebench.core.drop_policies import fast_keep

    assert fast_keep("position") is not None and fast_keep("probs") is not None
    assert fast_keep("bpr") is None and fast_keep("random") is None
    monkeypatch.setitem(DROP_POLICIES, "position", bpr_priority)
    assert fast_keep("position") is None


# ---------------------------------------------------------------- GShard: a declined 2nd choice uses its slot
# 2 tokens, 3 experts, capacity 1, position.
#   t0: p = [.9997, .0001, .0002] -> e0, then e2 with g2 = .0002/.9999: the coin keeps it w.p. 4e-4
#   t1: p = [.2, .4, .4]          -> e1, then e2 with g2 = .5: always kept by the coin
# Algorithm 1: 1st choices t0->e0, t1->e1 (slot 0 each); 2nd choices in token order: t0->e2 is
# declined but advances e2's counter to 1, so t1->e2 (position 1 >= C) is dropped.
GS = logits_of([[0.9997, 0.0001, 0.0002], [0.2, 0.4, 0.4]])


def test_gshard_declined_second_choice_uses_its_slot(impl):
    seed = 0
    u = torch.rand(2, generator=torch.Generator().manual_seed(seed))
    assert float(u[0]) >= 4e-4  # this seed's coin declines t0's 2nd choice (what GShard.route draws)
    r = route(GS, 2, 1, "position", seed=seed, router="gshard", impl=impl)
    # the declined choice is not an assignment; t1's 2nd choice is dropped, not kept
    assert r.token_index.tolist() == [0, 1, 1] and r.expert_index.tolist() == [0, 1, 2]
    assert r.kept.tolist() == [True, True, False]
    assert r.demand().tolist() == [1, 1, 1] and r.load().tolist() == [1, 1, 0]
    # capacity 2: the counter is 2 after both 2nd choices, t1's is at position 1 < 2: kept
    assert route(GS, 2, 2, "position", seed=seed, router="gshard", impl=impl).kept.tolist() == [True, True, True]
    # without the coin t0's 2nd choice is an assignment that takes the slot the same way
    r = route(GS, 2, 1, "position", router="gshard", second_expert_sampling=False, impl=impl)
    assert kept_pairs(r) == [(0, 0), (0, 2), (1, 1)]


def test_gshard_declined_choices_count_for_every_policy(impl):
    # probs ranks e2's two asks by weight: t1's (.5) before t0's declined one (.0002), so t1 keeps it
    r = route(GS, 2, 1, "probs", seed=0, router="gshard", impl=impl)
    assert kept_pairs(r) == [(0, 0), (1, 1), (1, 2)]
    # bpr ranks 2nd choices by the token's top probability: t0's declined ask (.9997) comes
    # before t1's (.4), takes e2's slot, and t1's is dropped
    r = route(GS, 2, 1, "bpr", seed=0, router="gshard", impl=impl)
    assert kept_pairs(r) == [(0, 0), (1, 1)] and r.kept.tolist() == [True, True, False]


# ---------------------------------------------------------------- bpr ranks by max_e p, not the weight
# 2 tokens, 4 experts, k = 2, renormalised weights, capacity 1.
#   t0: p = [.50, .40, .05, .05] -> e0, e1; top prob .50, renormalised w1 = .50/.90 = .556
#   t1: p = [.44, .06, .30, .20] -> e0, e2; top prob .44, renormalised w1 = .44/.74 = .595
# e0 is asked by both 1st choices: BPR keeps t0's (.50 > .44), though t1's weight is larger.
BPR = logits_of([[0.50, 0.40, 0.05, 0.05], [0.44, 0.06, 0.30, 0.20]])


def test_bpr_ranks_by_top_probability_not_renormalised_weight(impl):
    r = route(BPR, 2, 1, "bpr", renormalize=True, impl=impl)
    assert kept_pairs(r) == [(0, 0), (0, 1), (1, 2)]
    # ranking by the renormalised weight (what `probs` does among 1st choices) keeps t1's instead
    assert (1, 0) in kept_pairs(route(BPR, 2, 1, "probs", renormalize=True, impl=impl))
    # the same with Mixtral's softmax over the top-k (weights renormalised the same way)
    assert kept_pairs(route(BPR, 2, 1, "bpr", softmax_after_topk=True, impl=impl)) == [(0, 0), (0, 1), (1, 2)]
    # and for gshard (weights renormalised to sum 1)
    r = route(BPR, 2, 1, "bpr", router="gshard", second_expert_sampling=False, impl=impl)
    assert kept_pairs(r) == [(0, 0), (0, 1), (1, 2)]


def test_bpr_sigmoid_ranks_by_raw_score(impl):
    # sigmoid scores s (p = s, not the row-normalised probs a Routing carries):
    #   t0: s = [.6, .1, .1, .1] -> e0, e1; max s .6 (row-normalised .667, renormalised w1 .857)
    #   t1: s = [.8, .7, .7, .7] -> e0, e1; max s .8 (row-normalised .276, renormalised w1 .533)
    # BPR serves t1 first at e0 and among the 2nd choices at e1: t0 keeps nothing
    x = torch.logit(torch.tensor([[0.6, 0.1, 0.1, 0.1], [0.8, 0.7, 0.7, 0.7]]))
    r = route(x, 2, 1, "bpr", score="sigmoid", renormalize=True, impl=impl)
    assert kept_pairs(r) == [(1, 0), (1, 1)]
    r = route(x, 2, 1, "bpr", router="deepseek", impl=impl)
    assert kept_pairs(r) == [(1, 0), (1, 1)]

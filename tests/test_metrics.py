"""Routing metrics (docs/spec.md §4) on hand-built routings with known loads."""

import dataclasses
import math

import pytest
import torch

from moebench.core.metrics import METRICS, PHASES, direction, expert_loads, routing_metrics
from moebench.core.routing import Routing, SoftSlots


def routing(token, expert, kept, weight, probs, logits=None, top_k=1, capacity=None, choice=None, soft=None):
    probs = torch.tensor(probs, dtype=torch.float32)
    return Routing(
        token_index=torch.tensor(token, dtype=torch.int64),
        expert_index=torch.tensor(expert, dtype=torch.int64),
        choice=torch.tensor(choice if choice is not None else [0] * len(token), dtype=torch.int64),
        weight=torch.tensor(weight, dtype=torch.float32),
        kept=torch.tensor(kept, dtype=torch.bool),
        probs=probs,
        logits=torch.log(probs) if logits is None else torch.tensor(logits, dtype=torch.float32),
        top_k=top_k,
        capacity=capacity,
        soft=soft,
    )


# 4 tokens, 4 experts, k = 1. Token t asks expert [0, 0, 1, 2][t]; token 3's assignment is dropped.
# loads c = [2, 1, 0, 0], demand d = [2, 1, 1, 0], capacity 2.
PROBS = [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]]
# logits = log p + per-token shift [1, 2, 0, -1]: softmax is still PROBS, logsumexp is the shift
SHIFT = [1.0, 2.0, 0.0, -1.0]
LOGITS = [[math.log(p) + s for p in row] for row, s in zip(PROBS, SHIFT)]


@pytest.fixture
def uneven():
    return routing(
        token=[0, 1, 2, 3], expert=[0, 0, 1, 2], kept=[True, True, True, False],
        weight=[0.7, 0.4, 0.7, 0.7], probs=PROBS, logits=LOGITS, capacity=2,
    )


def test_loads(uneven):
    assert uneven.load().tolist() == [2, 1, 0, 0]
    assert uneven.demand().tolist() == [2, 1, 1, 0]
    assert expert_loads(uneven).tolist() == [2.0, 1.0, 0.0, 0.0]


def test_balance_metrics(uneven):
    m = routing_metrics(uneven)
    assert m["imbalance"] == pytest.approx(8 / 3)  # 2 / 0.75
    assert m["cv"] == pytest.approx(1.1055415967851332)  # sqrt(0.6875) / 0.75
    assert m["entropy"] == pytest.approx(0.4591479170272447)  # H(2/3, 1/3) / ln 4
    assert m["gini"] == pytest.approx(7 / 12)  # (-3*0 - 1*0 + 1*1 + 3*2) / (4 * 3)
    assert m["idle_experts"] == 2
    assert m["min_load"] == 0.0 and m["max_load"] == 2.0


def test_drop_metrics(uneven):
    m = routing_metrics(uneven)
    assert m["drop_rate"] == pytest.approx(0.25)  # (4 - 3) / 4
    assert m["token_drop_rate"] == pytest.approx(0.25)  # token 3 kept nothing
    assert m["experts_per_token_min"] == 0
    assert m["experts_per_token_mean"] == pytest.approx(0.75)
    assert m["experts_per_token_max"] == 1
    assert m["expert_usage"] == pytest.approx(3 / 8)  # 3 / (4 experts * C 2)


def test_loss_metrics(uneven):
    m = routing_metrics(uneven)
    # f = d / (k T) = [.5, .25, .25, 0]; P = mean_t p = [.325, .3, .275, .1]
    # aux = 4 * (.5*.325 + .25*.3 + .25*.275) = 1.225
    assert m["aux_loss"] == pytest.approx(1.225)
    assert m["z_loss"] == pytest.approx(1.5)  # mean(1, 4, 0, 1)
    assert m["load_cv2"] == pytest.approx(0.5)  # d mean 1, population var 0.5
    # gates per expert (all assignments, kept or not): [1.1, .7, .7, 0]: var .156875 / mean^2 .390625
    assert m["importance_cv2"] == pytest.approx(0.4016, rel=1e-4)


def test_router_behaviour_metrics(uneven):
    m = routing_metrics(uneven)
    assert m["router_confidence"] == pytest.approx(0.45)  # (.7 + .4 + .7 + 0) / 4
    # (3 * H(.7, .1, .1, .1) + H(.4, .3, .2, .1)) / 4 in nats
    assert m["gate_entropy"] == pytest.approx(1.0252995479499116, rel=1e-5)


def test_perfect_balance_uniform_probs():
    # 8 tokens round robin over 4 experts, uniform probabilities
    r = routing(token=list(range(8)), expert=[t % 4 for t in range(8)], kept=[True] * 8,
                weight=[0.25] * 8, probs=[[0.25] * 4] * 8, capacity=2)
    m = routing_metrics(r)
    assert m["aux_loss"] == pytest.approx(1.0)
    assert m["imbalance"] == 1.0 and m["cv"] == 0.0 and m["gini"] == 0.0
    assert m["entropy"] == pytest.approx(1.0)
    assert m["idle_experts"] == 0 and m["drop_rate"] == 0.0 and m["token_drop_rate"] == 0.0
    assert m["expert_usage"] == 1.0
    assert m["z_loss"] == pytest.approx(0.0, abs=1e-10)  # logits log(1/4): logsumexp 0
    assert m["gate_entropy"] == pytest.approx(math.log(4))
    assert m["router_confidence"] == pytest.approx(0.25)
    assert m["load_cv2"] == 0.0 and m["importance_cv2"] == 0.0


def test_aux_loss_collapse_is_e():
    # every token to expert 0 with p = 1 on expert 0: aux = E * 1 * 1
    r = routing(token=[0, 1, 2], expert=[0, 0, 0], kept=[True] * 3, weight=[1.0] * 3,
                probs=[[1.0, 0.0, 0.0, 0.0]] * 3, logits=[[0.0, -1e4, -1e4, -1e4]] * 3)
    m = routing_metrics(r)
    assert m["aux_loss"] == pytest.approx(4.0)
    assert m["imbalance"] == pytest.approx(4.0)
    assert m["gini"] == pytest.approx(0.75)
    assert m["entropy"] == 0.0
    assert m["idle_experts"] == 3


def test_aux_loss_top2_divides_by_k():
    # 2 tokens, k = 2, 2 experts: d = [2, 2], f = d / (2 * 2) = [.5, .5]; P = [.6, .4] -> aux = 2 * .5 = 1.0
    r = routing(token=[0, 1, 0, 1], expert=[0, 0, 1, 1], kept=[True] * 4, weight=[0.6, 0.6, 0.4, 0.4],
                probs=[[0.6, 0.4], [0.6, 0.4]], top_k=2, choice=[0, 0, 1, 1])
    m = routing_metrics(r)
    assert m["aux_loss"] == pytest.approx(1.0)
    assert m["router_confidence"] == pytest.approx(1.0)
    assert m["experts_per_token_mean"] == 2.0


def test_dropless_expert_usage_is_padding_cost():
    # dropless: C is the max load: loads [3, 1] -> 4 / (2 * 3)
    r = routing(token=[0, 1, 2, 3], expert=[0, 0, 0, 1], kept=[True] * 4, weight=[1.0] * 4,
                probs=[[0.5, 0.5]] * 4)
    assert routing_metrics(r)["expert_usage"] == pytest.approx(4 / 6)


def test_all_dropped():
    r = routing(token=[0, 1], expert=[0, 0], kept=[False, False], weight=[1.0, 1.0],
                probs=[[0.5, 0.5]] * 2, capacity=0)
    m = routing_metrics(r)
    assert m["drop_rate"] == 1.0 and m["token_drop_rate"] == 1.0
    assert math.isnan(m["imbalance"]) and math.isnan(m["entropy"]) and math.isnan(m["gini"])
    assert m["idle_experts"] == 2


def test_soft_loads_are_combine_mass():
    soft = SoftSlots(dispatch=torch.full((2, 2), 0.5), combine=torch.full((2, 2), 0.5), slots_per_expert=1)
    r = routing(token=[0, 0, 1, 1], expert=[0, 1, 0, 1], kept=[True] * 4, weight=[0.75, 0.25, 0.25, 0.75],
                probs=[[0.5, 0.5]] * 2, soft=soft, top_k=2)
    assert expert_loads(r).tolist() == [1.0, 1.0]
    r2 = routing(token=[0, 0, 1, 1], expert=[0, 1, 0, 1], kept=[True] * 4, weight=[0.75, 0.25, 0.75, 0.25],
                 probs=[[0.5, 0.5]] * 2, soft=soft, top_k=2)
    assert expert_loads(r2).tolist() == [1.5, 0.5]
    assert routing_metrics(r2)["imbalance"] == pytest.approx(1.5)


# ---------------------------------------------------------------- directions

def test_every_metric_has_a_direction():
    assert METRICS
    for name, metric in METRICS.items():
        assert metric.name == name
        assert metric.direction in {"lower", "higher", "none"}, name
        assert direction(name) == metric.direction


def test_specific_directions():
    assert direction("route.median_ms") == "lower"
    assert direction("route.tokens_per_s") == "higher"
    assert direction("dispatch.peak_mem_bytes") == "lower"
    assert direction("combine.rounds") == "none"
    assert direction("imbalance") == "lower"
    assert direction("entropy") == "higher"
    assert direction("drop_rate") == "lower"
    assert direction("token_drop_rate") == "lower"
    assert direction("aux_loss") == "lower"
    assert direction("router_confidence") == "none"
    assert direction("not_a_metric") == "none"
    assert direction("workload") == "none"


def test_every_routing_metric_is_documented():
    m = routing_metrics(routing(token=[0], expert=[0], kept=[True], weight=[1.0], probs=[[0.5, 0.5]]))
    assert set(m) <= set(METRICS)
    for key in m:
        assert METRICS[key].deterministic
    for phase in PHASES:
        assert not METRICS[f"{phase}.median_ms"].deterministic


# ---------------------------------------------------------------- GShard's aux loss (Algorithm 1)

def test_aux_loss_first_choices_literal():
    # 4 tokens, 4 experts, k = 2; 1st choices e0, e0, e2, e1 (before capacity), 2nd choices
    # e1, e2, e3, e3. P = column means = [.325, .275, .2, .2].
    probs = [[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.1, 0.2, 0.4, 0.3], [0.1, 0.5, 0.1, 0.3]]
    kw = dict(token=[0, 1, 2, 3, 0, 1, 2, 3], expert=[0, 0, 2, 1, 1, 2, 3, 3], kept=[True] * 8,
              weight=[0.5] * 8, probs=probs, top_k=2, choice=[0, 0, 0, 0, 1, 1, 1, 1])
    # all choices: d = [2, 2, 2, 2], f = d / 8 = 1/4 each -> aux = 4 * sum(P) / 4 = 1.0
    assert routing_metrics(routing(**kw))["aux_loss"] == pytest.approx(1.0)
    # 1st choices only: f = [2, 1, 1, 0] / 4 -> aux = 4 * (.5*.325 + .25*.275 + .25*.2) = 1.125
    first = dataclasses.replace(routing(**kw), aux_counts="first")
    assert routing_metrics(first)["aux_loss"] == pytest.approx(1.125)
    # capacity does not enter: dropping token 1's 1st choice changes nothing
    kept = [True, False] + [True] * 6
    assert routing_metrics(dataclasses.replace(routing(**dict(kw, kept=kept)), aux_counts="first"))[
        "aux_loss"] == pytest.approx(1.125)


def test_gshard_aux_loss_balanced_with_random_routing_is_one():
    # each expert is one token's 1st choice and every column of p averages 1/4 (cyclic rows);
    # the coin declines some 2nd choices (g2 = .3/.7: kept with probability .857), which the
    # all-choices form would count (aux = (4 + kept 2nd) / 8 < 1); Algorithm 1 gives 1.0
    from moebench.routers import RouteContext, RouteInputs, create_router

    row = [0.4, 0.3, 0.2, 0.1]
    probs = torch.tensor([row[-t:] + row[:-t] for t in range(4)] * 16)  # 64 tokens
    router = create_router("gshard", {})
    declined = 0
    for seed in range(3):
        r = router.route(RouteInputs(torch.log(probs)), RouteContext(2, None, "position", torch.Generator().manual_seed(seed)))
        declined += 64 - int((r.choice == 1).sum())
        assert routing_metrics(r)["aux_loss"] == pytest.approx(1.0, abs=1e-6)
    assert declined > 0  # the coin did decline some (else the test shows nothing)

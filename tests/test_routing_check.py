"""routing_check: literal cases on a hand-made 4-token Routing, and no false alarms on the
Routings every built-in router returns."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.errors import WorkloadMismatchError
from moebench.routers.base import RouteContext, RouteInputs
from moebench.routers.registry import ROUTERS
from moebench.core.routing import Routing, SoftSlots
from moebench.core.routing_check import InvalidRouting, check_routing, routing_problems
from moebench.core.workloads import generator


def good() -> Routing:
    """T=4 tokens, E=3 experts, k=1, capacity 2: token 3's choice (expert 0) was dropped."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]])
    return Routing(
        token_index=torch.tensor([0, 1, 2, 3]),
        expert_index=torch.tensor([0, 1, 0, 0]),
        choice=torch.tensor([0, 0, 0, 0]),
        weight=torch.tensor([0.7, 0.8, 0.6, 0.5]),
        kept=torch.tensor([True, True, True, False]),
        probs=probs,
        logits=probs.log(),
        top_k=1,
        capacity=2,
    )


def test_a_good_routing_has_no_problems():
    r = good()
    assert routing_problems(r) == []
    assert check_routing(r, "hand") is r


def test_empty_batch_is_fine():
    r = good()
    empty = torch.zeros(0, dtype=torch.int64)
    r = replace(r, token_index=empty, expert_index=empty, choice=empty, weight=torch.zeros(0), kept=empty.bool(),
                probs=torch.zeros(0, 3), logits=torch.zeros(0, 3))
    assert routing_problems(r) == []


def _with(**changes):
    return replace(good(), **changes)


CASES = {
    "expert too large": (_with(expert_index=torch.tensor([0, 1, 3, 0])),
                         "expert_index out of range [0, 3): min 0, max 3"),
    "negative expert": (_with(expert_index=torch.tensor([0, -1, 0, 0])),
                        "expert_index out of range [0, 3): min -1, max 0"),
    "token too large": (_with(token_index=torch.tensor([0, 1, 2, 4])),
                        "token_index out of range [0, 4): min 0, max 4"),
    "choice too large": (_with(choice=torch.tensor([0, 0, 0, 4])), "choice out of range [0, 4): min 0, max 4"),
    "nan weight": (_with(weight=torch.tensor([0.7, math.nan, 0.6, 0.5])), "weight has 1 NaN or infinite values of 4"),
    "inf weight": (_with(weight=torch.tensor([math.inf, 0.8, 0.6, 0.5])), "weight has 1 NaN or infinite values of 4"),
    "huge weight": (_with(weight=torch.tensor([0.7, 0.8, -3e4, 0.5])),
                    "weight has |value| up to 3e+04, beyond the sane 10000"),
    "nan probs": (_with(probs=torch.full((4, 3), math.nan)), "probs has 12 NaN or infinite values of 12"),
    "short weight": (_with(weight=torch.tensor([0.7, 0.8, 0.6])),
                     "the assignment arrays must be 1-D of one length A, got token_index [4], expert_index [4], "
                     "choice [4], weight [3], kept [4]"),
    "2-D kept": (_with(kept=torch.ones(4, 1, dtype=torch.bool)), "kept [4, 1]"),
    "probs 1-D": (_with(probs=torch.ones(4)), "probs has shape [4], expected [T, E]"),
    "logits shape": (_with(logits=torch.zeros(4, 2)), "logits has shape [4, 2], expected [T, E] = [4, 3] like probs"),
    "int32 experts": (_with(expert_index=torch.tensor([0, 1, 0, 0], dtype=torch.int32)),
                      "expert_index is torch.int32, expected torch.int64"),
    "float kept": (_with(kept=torch.ones(4)), "kept is torch.float32, expected torch.bool"),
    "int weight": (_with(weight=torch.ones(4, dtype=torch.int64)), "weight is torch.int64, expected a floating dtype"),
    "list weight": (_with(weight=[0.7, 0.8, 0.6, 0.5]), "weight is list, not a tensor"),
    "top_k 0": (_with(top_k=0), "top_k is 0, expected an int >= 1"),
    "capacity -1": (_with(capacity=-1), "capacity is -1, expected None or an int >= 0"),
    "float capacity": (_with(capacity=2.5), "capacity is 2.5, expected None or an int >= 0"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_violation_is_named(name):
    routing, expected = CASES[name]
    problems = routing_problems(routing)
    assert len(problems) == 1 and expected in problems[0], problems
    with pytest.raises(InvalidRouting, match=r"^router 'plug': ") as info:
        check_routing(routing, "plug")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_several_problems_are_all_named():
    r = _with(expert_index=torch.tensor([0, 1, 0, 9]), weight=torch.tensor([math.nan, 0.8, 0.6, 0.5]))
    assert routing_problems(r) == ["expert_index out of range [0, 3): min 0, max 9",
                                   "weight has 1 NaN or infinite values of 4"]


def test_not_a_routing():
    with pytest.raises(InvalidRouting, match=r"router 'plug' returned tuple, not a Routing"):
        check_routing((1, 2), "plug")


def soft(t=4, e=2, s=1, n=None, **changes) -> Routing:
    """A Soft MoE-shaped Routing: every token to every expert, slots [T, E*S]."""
    probs = torch.full((t, e), 1.0 / e)
    slots = SoftSlots(torch.full((t, e * s), 1.0 / t), torch.full((t, e * s), 1.0 / (e * s)), s, n)
    r = Routing(torch.arange(t).repeat_interleave(e), torch.arange(e).repeat(t), torch.zeros(t * e, dtype=torch.int64),
                probs.reshape(-1), torch.ones(t * e, dtype=torch.bool), probs, probs.log(), 1, s, slots)
    return replace(r, soft=replace(slots, **changes)) if changes else r


def test_soft_slots():
    assert routing_problems(soft()) == []
    assert routing_problems(soft(s=2, n=2)) == []
    assert routing_problems(soft(dispatch=torch.zeros(4, 3))) == [
        "soft.dispatch has shape [4, 3], expected [T, E*S] = [4, 2]"]
    assert routing_problems(soft(combine=torch.full((4, 2), math.nan))) == ["soft.combine has NaN or infinite values"]
    assert routing_problems(soft(n=3)) == ["soft.sequence_length is 3, expected None or an int >= 1 dividing T=4"]
    assert routing_problems(soft(slots_per_expert=0)) == ["soft.slots_per_expert is 0, expected an int >= 1"]


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_every_builtin_router_passes(capacity_factor):
    """No false alarms: what the shipped routers return keeps the contract."""
    torch.manual_seed(0)
    t, e = 96, 8
    inputs = RouteInputs(torch.randn(t, e), torch.randn(t, 16), torch.randint(0, 50, (t,)), torch.rand(50))
    checked = 0
    for name, cls in ROUTERS.classes().items():
        if name.startswith("peer:"):
            continue  # third-party libraries, mostly not installed here; they go through the same check
        router = ROUTERS.create(name)
        k = router.fixed_top_k or 2
        if router.applicable(k, e):
            continue
        cap = None if capacity_factor is None else expert_capacity(CapacitySpec(capacity_factor), t, e, k)
        ctx = RouteContext(k, cap, "position", generator("cpu", 0, 1), router.init_state(e, torch.device("cpu")))
        try:
            routing = router.route(inputs, ctx)
        except WorkloadMismatchError:  # needs a workload this plain batch is not (a trace)
            continue
        assert routing_problems(routing) == [], name
        checked += 1
    assert checked >= 10


def test_tensors_known_finite_are_not_read_again():
    r = _with(logits=torch.full((4, 3), math.nan))
    assert routing_problems(r) == ["logits has 12 NaN or infinite values of 12"]
    assert routing_problems(r, finite=(r.logits,)) == []  # the caller vouches for this very tensor
    assert routing_problems(r, finite=(r.logits.clone(),)) != []  # an equal-looking other one is read

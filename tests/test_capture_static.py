"""Capturability on a machine without a GPU: every capturable phase runs under FakeTensorMode.

A CUDA graph records fixed kernels; an operation whose output size or control flow depends on
tensor values (``nonzero``, ``bincount``, boolean indexing, ``.item()``, ``if tensor``) needs the
host and breaks capture. Under FakeTensorMode tensors have no values, so exactly those
operations raise (DynamicOutputShapeException, DataDependentOutputException): a phase that runs
to the end here has none. The eager paths are shown to fail the same check (the test can fail).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from _capture_cases import POLICIES, ROUTER_CONFIGS, config_id, make_case
from moebench.run.capture import capture_route, combine_static, dispatch_static, phase_problem
from moebench.core.dispatch import dispatch
from moebench.routers.base import RouteContext, RouteInputs, RouterState
from moebench.routers.registry import ROUTERS
from moebench.core.routing import Routing, SoftSlots

DATA_DEPENDENT = (DynamicOutputShapeException, DataDependentOutputException)


def fake(mode: FakeTensorMode, obj):
    """``obj`` with every tensor (also inside RouteInputs, RouteContext's state, Routing,
    SoftSlots) replaced by a fake tensor of ``mode``."""
    if isinstance(obj, torch.Tensor):
        return mode.from_tensor(obj)
    if isinstance(obj, RouterState):  # cached per-stream tensors too (noise gate, Soft MoE's phi)
        return RouterState(bias=fake(mode, obj.bias), extra={k: fake(mode, v) for k, v in obj.extra.items()})
    if isinstance(obj, tuple):
        return tuple(fake(mode, x) for x in obj)
    if isinstance(obj, (RouteInputs, RouteContext, Routing, SoftSlots)):
        return dataclasses.replace(obj, **{f.name: fake(mode, getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), (torch.Tensor, RouterState, SoftSlots))})
    return obj


def run_fake(fn, *args):
    """fn(*args) with fake tensors; raises if fn does anything data-dependent."""
    mode = FakeTensorMode()
    fargs = [fake(mode, a) for a in args]
    with mode:
        return fn(*fargs)


# (policy, top_k, capacity): every policy under capacity, dropless, k = 1 (argmax), k = E (sort)
SETTINGS = [(p, 2, 5) for p in POLICIES] + [("position", 2, None), ("probs", 1, 5), ("probs", 8, 9)]


@pytest.mark.parametrize("config", ROUTER_CONFIGS, ids=[config_id(c) for c in ROUTER_CONFIGS])
def test_every_capturable_phase_runs_without_data_dependent_ops(config):
    name, params = config
    for policy, k, capacity in SETTINGS:
        if (name == "switch" and k != 1) or (name == "deepseek" and "num_groups" in params and k > 4):
            continue
        logits = torch.randn(24, 8, generator=torch.Generator().manual_seed(k))
        router, inputs, ctx = make_case(name, params, logits, k, capacity, policy)
        for phase in ("route", "dispatch", "combine"):
            assert phase_problem(router, phase, ctx) is None, (phase, policy, phase_problem(router, phase, ctx))
        eager = router.route(inputs, ctx)  # the eager first batch fills per-stream caches (noise gate, phi)
        routing = run_fake(capture_route(router), inputs, ctx)
        assert routing.kept.shape == eager.kept.shape and routing.probs.shape == (24, 8)
        slots = run_fake(dispatch_static, eager, inputs.hidden)  # of a real Routing, as the runner times it
        assert slots.counts.shape == (8,)
        if eager.soft is None:  # (Soft MoE's rows are slots, not assignments)
            assert slots.token_index.shape == slots.rows.shape[:1] == eager.kept.shape
        out = run_fake(lambda r, h: combine_static(r, dispatch_static(r, h), dispatch_static(r, h).rows),
                       eager, inputs.hidden)
        assert out.shape == inputs.hidden.shape


def test_the_declared_routers_are_the_ones_tested():
    """Each registered router that declares its route capturable has a case above (and only those)."""
    # moebench's own routers only: other tests register throwaway subclasses of topk
    declared = {name for name, cls in ROUTERS.classes().items()
                if "route" in cls.capturable_phases and cls.__module__.startswith("moebench.")}
    assert declared == {name for name, _ in ROUTER_CONFIGS}
    for name in ("topk", "switch", "deepseek", "expert_choice", "round_robin"):  # the minimum
        assert name in declared


@pytest.mark.parametrize("name,params", [("topk", {"impl": "torch"}), ("switch", {"impl": "torch"}),
                                         ("deepseek", {"impl": "torch"}), ("round_robin", {"impl": "torch"})])
def test_the_eager_routes_fail_the_check(name, params):
    """The eager torch paths sync (bincount in keep_within_capacity, nonzero in top_k_experts):
    the fake-mode check catches them, so passing it means something."""
    logits = torch.zeros(16, 8)  # all tied: top_k_experts takes its nonzero branch
    router, inputs, ctx = make_case(name, params, logits, 1 if name == "switch" else 2, 3, "position")
    with pytest.raises(DATA_DEPENDENT):
        run_fake(router.route, inputs, ctx)
    routing = router.route(inputs, ctx)
    with pytest.raises(DATA_DEPENDENT):
        run_fake(lambda r, h: dispatch(r, h, impl="torch"), routing, inputs.hidden)


@pytest.mark.parametrize("name,why", [("sinkhorn", "tol"), ("base", "CPU"), ("gshard", "coin"), ("hash", "host")])
def test_uncapturable_routes_say_why(name, why):
    router = ROUTERS.create(name, {})
    ctx = RouteContext(1, 4, "position")
    problem = phase_problem(router, "route", ctx)
    assert problem and why in problem and problem.startswith(name)
    assert phase_problem(router, "dispatch", ctx) is None and phase_problem(router, "combine", ctx) is None


def test_an_uncapturable_drop_policy_is_named(monkeypatch):
    from moebench.core import drop_policies

    monkeypatch.setitem(drop_policies.DROP_POLICIES, "made_up", drop_policies.position_priority)
    ctx = RouteContext(2, 4, "made_up")
    assert "made_up" in phase_problem(ROUTERS.create("topk", {}), "route", ctx)
    assert phase_problem(ROUTERS.create("topk", {}), "route", RouteContext(2, None, "made_up")) is None  # dropless
    assert phase_problem(ROUTERS.create("expert_choice", {}), "route", ctx) is None  # no drop policy


def test_a_subclass_gets_the_form_of_the_route_it_runs():
    from dataclasses import dataclass

    from moebench.run.capture.routes import route_topk
    from moebench.routers.token_choice import TopK

    @dataclass(frozen=True)
    class Keeps(TopK):
        renormalize: bool = True

    @dataclass(frozen=True)
    class Overrides(TopK):
        def route(self, inputs, ctx):
            return "own"

    inputs, ctx = RouteInputs(torch.zeros(8, 4)), RouteContext(2, 3, "position")
    router = Keeps(impl="torch")
    with pytest.raises(DATA_DEPENDENT):  # its (inherited) eager route syncs ...
        run_fake(router.route, inputs, ctx)
    run_fake(capture_route(router), inputs, ctx)  # ... its capturable route is TopK's form
    assert torch.equal(capture_route(router)(inputs, ctx).kept, route_topk(router, inputs, ctx).kept)
    assert capture_route(Overrides())(inputs, ctx) == "own"

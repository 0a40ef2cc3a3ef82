"""The trained MoE layer: gradients reach the gate as the routers define them, seeds reproduce,
the expert-bias update is its formula, and routers that cannot learn say why."""

import dataclasses
import math

import pytest
import torch

from moebench.core import kernels
from moebench.core.case import Case, NamedSpec
from moebench.routers.base import RouteContext
from moebench.routers.registry import ROUTERS
from moebench.routers.soft_moe import make_phi
from moebench.kinds.train.layer import MoELayer, aux_loss, learns, trainable, z_loss
from moebench.kinds.train.loop import CannotLearn, Trainer, bias_update, train_router
from moebench.kinds.train.spec import TrainSpec

T, D, E = 12, 3, 4

# (router, params, top_k): every router whose combine weights depend on the gate
TRAINABLE = [
    ("softmax_dense", {}, 1), ("switch", {}, 1), ("topk", {}, 2), ("topk", {"renormalize": True}, 2),
    ("topk", {"softmax_after_topk": True}, 2), ("topk", {"score": "sigmoid"}, 2), ("noisy_topk", {"noise_std": 0.5}, 2),
    ("gshard", {}, 2), ("deepseek", {}, 2), ("expert_choice", {}, 1), ("base", {}, 1), ("sinkhorn", {}, 1),
    ("sinkhorn", {}, 2),
]


def _layer(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return MoELayer(D, 5, 2, E, g, **kw)


def _loss_fn(layer, router, h, target, top_k, capacity):
    """Scalar loss of the layer on h with every source of randomness re-seeded per call."""
    def loss():
        state = router.init_state(E, torch.device("cpu"))
        ctx = RouteContext(top_k, capacity, "position", torch.Generator().manual_seed(3), state)
        y, routing = layer(h, router, ctx)
        # summed in float64 so that rounding stays far below the finite-difference step
        value = (y.double() * target.double()).sum() + 0.1 * aux_loss(routing).double() + 0.01 * z_loss(routing).double()
        return value, routing
    return loss


def _finite_difference_check(param, loss, eps=1e-3):
    value, routing = loss()
    param.grad = None
    value.backward()
    analytic = param.grad.clone()
    numeric = torch.zeros_like(param)
    checked = 0
    with torch.no_grad():
        flat = param.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            plus, r_plus = loss()
            flat[i] = old - eps
            minus, r_minus = loss()
            flat[i] = old
            same = all(torch.equal(r.expert_index, routing.expert_index) and torch.equal(r.kept, routing.kept)
                       for r in (r_plus, r_minus))
            if same:  # the discrete routing did not move: the loss is smooth here
                numeric.view(-1)[i] = (float(plus) - float(minus)) / (2 * eps)
                checked += 1
            else:
                numeric.view(-1)[i] = analytic.view(-1)[i]
    assert checked >= flat.numel() // 2
    assert analytic.abs().max() > 1e-4  # the gate does get a gradient
    torch.testing.assert_close(analytic, numeric, rtol=2e-2, atol=3e-3)


@pytest.mark.parametrize("name, params, top_k", TRAINABLE, ids=[f"{n}-{p}-k{k}" for n, p, k in TRAINABLE])
def test_gate_gradient_matches_finite_differences(name, params, top_k):
    layer = _layer(gate_std=3.0)  # spread logits: fewer near-ties for the step to cross
    router = trainable(ROUTERS.create(name, params))
    g = torch.Generator().manual_seed(1)
    h, target = torch.randn(T, D, generator=g), torch.randn(T, 2, generator=g)
    _finite_difference_check(layer.gate_w, _loss_fn(layer, router, h, target, top_k, capacity=5))


def test_soft_moe_learns_through_its_slots():
    router = trainable(dataclasses.replace(ROUTERS.create("soft_moe", {}), slots_per_expert=2))
    layer = _layer(soft_slots=2, phi=make_phi(D, E * 2, 0))
    g = torch.Generator().manual_seed(1)
    h, target = torch.randn(T, D, generator=g), torch.randn(T, 2, generator=g)
    loss = _loss_fn(layer, router, h, target, 1, capacity=None)
    _, routing = loss()
    assert routing.soft is not None and learns(routing) is None
    assert routing.soft.dispatch.shape == (T, E * 2)
    _finite_difference_check(layer.phi, loss)


def test_soft_moe_layer_is_dispatch_then_combine():
    """y = C . expert(D^T h): checked against the matrices written out by hand."""
    router = dataclasses.replace(ROUTERS.create("soft_moe", {}), slots_per_expert=1)
    layer = _layer(soft_slots=1, phi=make_phi(D, E, 0))
    h = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    state = router.init_state(E, torch.device("cpu"))
    y, routing = layer(h, router, RouteContext(1, None, "position", None, state))
    slots = routing.soft.dispatch.t() @ h  # [E, d]
    outs = torch.stack([layer.experts.one(e, slots[e:e + 1])[0] for e in range(E)])  # [E, out]
    torch.testing.assert_close(y, routing.soft.combine @ outs)


@pytest.mark.parametrize("name", ["hash", "random", "round_robin"])
def test_fixed_rule_routers_train_their_experts_only(name):
    layer = _layer()
    router = trainable(ROUTERS.create(name, {}))
    h = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(T) % 5
    state = router.init_state(E, torch.device("cpu"))
    y, routing = layer(h, router, RouteContext(1, None, "position", torch.Generator().manual_seed(0), state), token_ids=ids)
    assert learns(routing) == "fixed"
    y.sum().backward()
    assert layer.experts.w2.grad.abs().sum() > 0


@pytest.mark.skipif(not kernels.available(), reason="numba not importable")
def test_numba_weights_cannot_train_and_say_why():
    layer = _layer()
    router = ROUTERS.create("topk", {"impl": "numba"})  # weights computed outside autograd
    h = torch.randn(T, D)
    y, routing = layer(h, router, RouteContext(2, None, "position", None, router.init_state(E, torch.device("cpu"))))
    assert "no gradient" in learns(routing)
    assert learns(layer(h, trainable(router), RouteContext(2, None))[1]) is None


def test_bias_update_is_its_formula():
    load = torch.tensor([6, 2, 0, 4])  # mean 3
    sign = torch.zeros(4)
    bias_update(sign, load, 0.01, "sign")
    assert sign.tolist() == pytest.approx([-0.01, 0.01, 0.01, -0.01])
    mag = torch.zeros(4)
    bias_update(mag, load, 0.01, "magnitude")
    assert mag.tolist() == pytest.approx([-0.01, 0.01 / 3, 0.01, -0.01 / 3])
    router = ROUTERS.create("deepseek", {"bias_update_rate": 0.01})
    state = router.init_state(4, torch.device("cpu"))
    from moebench.core.routing import Routing
    routing = Routing(torch.arange(12), torch.tensor([0] * 6 + [1] * 2 + [3] * 4), torch.zeros(12, dtype=torch.long),
                      torch.ones(12), torch.ones(12, dtype=torch.bool), torch.full((12, 4), 0.25), torch.zeros(12, 4), 1, None)
    router.update_state(state, routing)
    assert state.bias.tolist() == pytest.approx(sign.tolist())  # the same as the benchmark's update


def _case(task="teacher", **kw):
    fields = dict(workload=NamedSpec(task, {}), tokens=32, experts=4, top_k=2, capacity_factor=1.25, hidden=6)
    fields.update(kw)
    return Case(**fields)


def test_trainer_step_updates_the_bias_from_the_training_batch():
    spec = TrainSpec(steps=1, tasks=(NamedSpec("teacher"),), eval_tokens=32, expert_hidden=8, bias_update_rate=0.05)
    trainer = Trainer(_case(), spec, ROUTERS.create("deepseek", {}), seed=0)
    assert trainer.router.bias_update_rate == 0.05
    trainer.state.bias += torch.tensor([0.3, -0.2, 0.0, 0.1])  # a bias that changes the selection
    before = trainer.state.bias.clone()
    saved = trainer.data_rng.get_state()
    data = trainer.task.sample(32, trainer.data_rng)  # the batch step() will draw
    trainer.data_rng.set_state(saved)
    with torch.no_grad():
        _, routing = trainer.forward(data, RouteContext(2, trainer.capacity_train, "position", None, trainer.state))
    load = routing.load().float()
    trainer.step(1)
    expected = before + 0.05 * torch.sign(load.mean() - load)
    assert trainer.state.bias.tolist() == pytest.approx(expected.tolist())
    assert not torch.equal(trainer.state.bias, before)


def test_identical_seeds_give_identical_records():
    spec = TrainSpec(steps=6, tasks=(NamedSpec("language", {"vocab": 16}),), eval_interval=3, eval_tokens=64,
                     probe_tokens=16, seeds=(0, 1), expert_hidden=8, aux_loss_coeff=0.01, gate_noise=0.1)
    case = _case("language")
    row = {"case_id": case.case_id, "router": "topk", "status": "ok", "reason": None}
    a = train_router(case, spec, NamedSpec("topk"), dict(row))
    b = train_router(case, spec, NamedSpec("topk"), dict(row))
    strip = lambda recs: [{k: v for k, v in r.items() if k != "step_ms"} for r in recs]  # noqa: E731
    assert a.row["status"] == "ok" and len(a.steps) == 2 * 3
    assert strip(a.steps) == strip(b.steps)
    assert [r["seed"] for r in a.steps] == [0, 0, 0, 1, 1, 1]
    assert a.steps[0]["eval_loss"] != a.steps[3]["eval_loss"]  # another seed, another run
    final = a.steps[2]
    assert len(final["probe_last_change"]) == 16 and len(final["contingency"]) == 4  # classes x (E + 1)
    assert a.row["eval_loss"] == pytest.approx((a.steps[2]["eval_loss"] + a.steps[5]["eval_loss"]) / 2)
    assert a.row["eval_loss_ci_low"] < a.row["eval_loss"] < a.row["eval_loss_ci_high"]


def test_skipped_and_error_rows_say_why():
    spec = TrainSpec(steps=2, tasks=(NamedSpec("teacher"),), eval_tokens=32, expert_hidden=4)
    case = _case()
    row = {"case_id": case.case_id, "router": "x", "status": "ok", "reason": None}
    hashed = train_router(case, spec, NamedSpec("hash"), dict(row)).row
    assert hashed["status"] == "skipped" and "token ids" in hashed["reason"]
    switch = train_router(case, spec, NamedSpec("switch"), dict(row)).row  # top_k 2
    assert switch["status"] == "skipped" and "exactly 1" in switch["reason"]
    wide = train_router(_case(dtype="bfloat16"), spec, NamedSpec("topk"), dict(row)).row
    assert wide["status"] == "skipped" and "float32" in wide["reason"]


def test_competitive_loss_is_jacobs_1991():
    from moebench.kinds.train.layer import competitive_loss

    layer = _layer()
    h = torch.randn(5, D, generator=torch.Generator().manual_seed(4))
    target = torch.randn(5, 2, generator=torch.Generator().manual_seed(5))
    router = ROUTERS.create("switch", {})
    with torch.no_grad():
        _, routing = layer(h, router, RouteContext(1, 2, "position", None, router.init_state(E, torch.device("cpu"))))
        got = float(competitive_loss(layer, h, routing, target))
        expected = []  # -log sum_kept w exp(-|y - o_e|^2 / 2), token by token; a dropped token: |y|^2 / 2
        for t in range(5):
            terms = [float(routing.weight[i]) * math.exp(-0.5 * float(
                (layer.experts.one(int(routing.expert_index[i]), h[t:t + 1])[0] - target[t]).square().sum()))
                for i in range(len(routing.weight)) if int(routing.token_index[i]) == t and bool(routing.kept[i])]
            expected.append(-math.log(sum(terms)) if terms else 0.5 * float(target[t].square().sum()))
    assert int((~routing.kept).sum()) >= 1  # capacity 2 for 5 tokens: the dropped-token branch is covered
    assert got == pytest.approx(sum(expected) / 5, rel=1e-5)


def test_bias_flip_rate_counts_reversed_updates():
    spec = TrainSpec(steps=1, tasks=(NamedSpec("teacher"),), eval_tokens=32, expert_hidden=4)
    trainer = Trainer(_case(), spec, ROUTERS.create("deepseek", {}), seed=0)
    for direction in ([1, 1, -1, 0], [1, -1, 1, 1], [-1, -1, 1, 1]):
        trainer._track_flips(torch.tensor(direction, dtype=torch.float32))
    # 2nd vs 1st: experts 1 and 2 reversed, expert 3 had not moved -> 2/4; 3rd vs 2nd: expert 0 -> 1/4
    assert trainer._flips == [0.5, 0.25]
    records = Trainer(_case(), TrainSpec(steps=3, tasks=(NamedSpec("teacher"),), eval_tokens=32, expert_hidden=4,
                                         bias_update_rate=0.1), ROUTERS.create("deepseek", {}), seed=0).run()
    assert records[0]["bias_flip_rate"] is None and 0 <= records[-1]["bias_flip_rate"] <= 1
    assert len(records[-1]["expert_bias"]) == 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_matches_the_cpu_rows_shape():
    spec = TrainSpec(steps=2, tasks=(NamedSpec("language", {"vocab": 16}),), eval_tokens=32, probe_tokens=8,
                     expert_hidden=4)
    case = _case("language", device="cuda")
    row = {"case_id": case.case_id, "router": "topk", "status": "ok", "reason": None}
    out = train_router(case, spec, NamedSpec("topk"), dict(row))
    assert out.row["status"] == "ok", out.row["reason"]
    assert len(out.steps) == 3 and out.row["perplexity"] > 1


def test_combine_ones_weights_each_kept_expert_1_and_freezes_the_gate():
    case = Case(NamedSpec("teacher", {"experts": 4}), 32, 4, 2, None, hidden=6)
    spec = TrainSpec(steps=3, tasks=(case.workload,), expert_hidden=5, eval_tokens=32, combine="ones",
                     aux_loss_coeff=0.01)
    trainer = Trainer(case, spec, ROUTERS.create("topk", {}), seed=0)
    w0, b0 = trainer.layer.gate_w.clone(), trainer.layer.gate_b.clone()
    data = trainer.batch()
    ctx = RouteContext(2, trainer.capacity_train, case.drop_policy, trainer.router_rng, trainer.state)
    y, routing = trainer.layer(data.x, trainer.router, ctx, ones=True)
    expected = torch.zeros_like(y)  # by hand: the plain sum of each token's kept experts
    for t, e in zip(routing.token_index[routing.kept].tolist(), routing.expert_index[routing.kept].tolist()):
        expected[t] += trainer.layer.experts.one(e, data.x[t:t + 1])[0]
    assert torch.allclose(y, expected, atol=1e-6)
    assert not torch.allclose(routing.weight, torch.ones_like(routing.weight))  # the routing keeps its weights
    records = trainer.run()
    assert trainer.gate_learns is False and len(records) >= 2
    assert torch.equal(trainer.layer.gate_w, w0) and torch.equal(trainer.layer.gate_b, b0)  # frozen
    soft = Trainer.__new__(Trainer)  # Soft MoE has no per-token experts to weight 1
    with pytest.raises(CannotLearn, match="combine: ones"):
        Trainer.__init__(soft, case, spec, ROUTERS.create("soft_moe", {}), seed=0)

"""The numba fast paths (moebench.core.kernels) give exactly what the plain-torch paths give.

Every comparison is torch.equal on every tensor of the Routing / Dispatched / combine output:
the kernels reproduce the torch code's floats bit for bit, including on adversarial inputs
(all-equal logits, few distinct values, +-1e4 extremes, ties created by the expert bias).
Speed is shown by benchmarks/bench_routing.py, not here.
"""

from __future__ import annotations

import itertools

import pytest
import numpy as np
import torch

pytest.importorskip("numba")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moebench.core import kernels  # noqa: E402
from moebench.core.dispatch import combine, dispatch  # noqa: E402
from moebench.core.drop_policies import keep_within_capacity, position_priority, probs_priority  # noqa: E402
from moebench.core.errors import MoebenchError  # noqa: E402
from moebench.routers import RouteContext, RouteInputs, RouterState, create_router  # noqa: E402
from moebench.routers.base import normalize_weights, top_k_experts  # noqa: E402
from _capture_cases import adversarial_logits, tied_assignments  # one set of tie and extreme inputs for every path

FIELDS = ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits")


def stable_top_k(scores, k):
    """The reference convention: highest first, ties -> lowest expert index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def route(name, impl, logits, top_k, capacity, policy, bias=None, **params):
    router = create_router(name, dict(params, impl=impl))
    state = RouterState(bias=bias.clone()) if bias is not None else None
    ctx = RouteContext(top_k, capacity, policy, torch.Generator().manual_seed(0), state)
    return router.route(RouteInputs(logits.clone()), ctx)


def assert_same_routing(name, logits, top_k, capacity, policy, bias=None, **params):
    a = route(name, "torch", logits, top_k, capacity, policy, bias, **params)
    b = route(name, "numba", logits, top_k, capacity, policy, bias, **params)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert torch.equal(x, y), f"{f} differs ({name}, {params}, k={top_k}, C={capacity}, {policy})"
    assert (a.top_k, a.capacity) == (b.top_k, b.capacity)
    # and the selection follows the tie convention
    t = logits.shape[0]
    chosen = b.expert_index.view(top_k, t).t()
    scores = torch.sigmoid(logits) if params.get("score") == "sigmoid" else torch.softmax(logits, -1)
    if bias is not None:
        scores = scores + bias
    assert torch.equal(chosen, stable_top_k(scores, top_k))
    return b


def capacities(t, e, k):
    return [None, 1, max(1, (k * t) // (2 * e)), -(-5 * k * t // (4 * e)), k * t]


TOPK_OPTIONS = [
    dict(score=score, softmax_after_topk=sat, renormalize=ren, route_scale=scale)
    for score, sat, ren, scale in itertools.product(
        ["softmax", "sigmoid"], [False, True], [False, True], [1.0, 2.5, 1.1]
    )
    if not (sat and score == "sigmoid")
]


# ---------------------------------------------------------------- whole routers


@pytest.mark.parametrize("options", TOPK_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_topk_option_combos(options, policy):
    t, e = 37, 8  # E does not divide T
    for name, logits in adversarial_logits(t, e).items():
        for k in (1, 2, 3):
            for capacity in capacities(t, e, k):
                assert_same_routing("topk", logits, k, capacity, policy, **options)


@pytest.mark.parametrize("e,k", [(64, 2), (64, 1), (64, 8), (33, 4), (256, 2), (16, 2), (8, 8), (64, 64), (40, 9)])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_topk_shapes(e, k, policy):
    """Both selection kernels (packed-key max reductions for k <= 8, insertion for k > 8),
    k = E, and capacities from 1 to dropless."""
    t = 300
    for name, logits in adversarial_logits(t, e, seed=e + k).items():
        for capacity in capacities(t, e, k):
            assert_same_routing("topk", logits, k, capacity, policy, renormalize=True)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("e", [1, 5, 64])
def test_switch(policy, e):
    t = 129
    for name, logits in adversarial_logits(t, e).items():
        for capacity in capacities(t, e, 1):
            assert_same_routing("switch", logits, 1, capacity, policy)


@pytest.mark.parametrize("name,k", [("topk", 2), ("topk", 1), ("switch", 1)])
def test_single_token(name, k):
    for logits in adversarial_logits(1, 6).values():
        for capacity in (None, 1):
            for policy in ("position", "probs"):
                assert_same_routing(name, logits, k, capacity, policy)


@pytest.mark.parametrize("e", [8, 64])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_expert_bias_ties(e, policy):
    """A bias that exactly cancels score differences, or makes groups of experts equal."""
    t = 97
    g = torch.Generator().manual_seed(1)
    for name, logits in adversarial_logits(t, e).items():
        for bias in (
            torch.zeros(e),
            torch.randint(0, 2, (e,), generator=g).float() * 0.5,
            torch.randn(e, generator=g) * 1e-3,
            -torch.full((e,), 1.0 / e),  # all-equal softmax + this bias is exactly 0
        ):
            for k in (1, 2):
                for capacity in (None, 3):
                    assert_same_routing("topk", logits, k, capacity, policy, bias=bias, expert_bias=True)
            assert_same_routing("switch", logits, 1, 3, policy, bias=bias, expert_bias=True)


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_renormalize_after_drop(policy):
    logits = adversarial_logits(50, 8)["few_values"]
    assert_same_routing("topk", logits, 2, 4, policy, renormalize=True, renormalize_after_drop=True)


def test_other_policies_still_agree():
    """bpr/random have no kernel: impl=numba selects with numba and drops with torch."""
    logits = adversarial_logits(64, 8)["normal"]
    for policy in ("bpr", "random"):
        assert_same_routing("topk", logits, 2, 5, policy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(1, 200),
    e=st.integers(1, 72),
    data=st.data(),
)
def test_random_inputs(t, e, data):
    k = data.draw(st.integers(1, min(e, 10)))
    palette = data.draw(st.sampled_from(["floats", "few", "extremes"]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if palette == "floats":
        logits = torch.randn(t, e, generator=g) * data.draw(st.sampled_from([0.01, 1.0, 30.0]))
    elif palette == "few":
        logits = torch.randint(-2, 3, (t, e), generator=g).float() / 3
    else:
        logits = torch.randint(-1, 2, (t, e), generator=g).float() * 1e4
    capacity = data.draw(st.one_of(st.none(), st.integers(1, max(1, 2 * k * t // e + 2))))
    policy = data.draw(st.sampled_from(["position", "probs"]))
    options = data.draw(st.sampled_from(TOPK_OPTIONS))
    bias = None
    if data.draw(st.booleans()):
        bias = torch.randint(-1, 2, (e,), generator=g).float() * data.draw(st.sampled_from([1e-3, 0.25]))
        options = dict(options, expert_bias=True)
    assert_same_routing("topk", logits, k, capacity, policy, bias=bias, **options)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_deepseek_without_groups(policy, k):
    """DeepSeek (sigmoid, bias, normalised weights, route_scale) through the fused selection."""
    t, e = 53, 16
    g = torch.Generator().manual_seed(k)
    bias = torch.randint(-1, 2, (e,), generator=g).float() * 0.25
    for name, logits in adversarial_logits(t, e, seed=k).items():
        for capacity in capacities(t, e, k):
            for scale in (1.0, 2.5):
                a = route("deepseek", "torch", logits, k, capacity, policy, bias, route_scale=scale)
                b = route("deepseek", "numba", logits, k, capacity, policy, bias, route_scale=scale)
                for f in FIELDS:
                    assert torch.equal(getattr(a, f), getattr(b, f)), (name, f, capacity, scale)


def test_mixtral_weights_are_the_softmax_of_the_chosen_logits():
    """softmax_after_topk divides the chosen probabilities by their sum: the softmax of the
    chosen logits up to rounding (checked in float64)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(300, 64, generator=g) * 4
    for impl in ("torch", "numba"):
        r = route("topk", impl, logits, 2, None, "position", softmax_after_topk=True)
        expert = r.expert_index.view(2, -1).t()
        weight = r.weight.view(2, -1).t()
        exact = torch.softmax(logits.double().gather(1, expert), dim=-1)
        assert torch.allclose(weight.double(), exact, rtol=1e-6, atol=0)


def test_fused_normalisation_matches_normalize_weights():
    g = torch.Generator().manual_seed(9)
    cases = [torch.rand(100, 40, generator=g), torch.zeros(7, 5), torch.rand(30, 12, generator=g) * 1e-30,
             torch.randint(0, 3, (40, 9), generator=g).float()]
    for scores in cases:
        for k in sorted({1, 2, 3, scores.shape[1]}):
            expert, weight = kernels.topk_select(scores, k, normalize=True)
            assert torch.equal(weight, normalize_weights(scores.gather(1, expert)))
            assert torch.isfinite(weight).all()


# ---------------------------------------------------------------- building blocks


def test_top_k_experts_matches_stable_sort():
    g = torch.Generator().manual_seed(3)
    for e in (1, 2, 7, 64):
        for scores in (torch.zeros(50, e), torch.randint(0, 3, (50, e), generator=g).float(), torch.rand(50, e, generator=g)):
            for k in sorted({1, min(2, e), min(3, e), e}):
                assert torch.equal(top_k_experts(scores, k), stable_top_k(scores, k))
                expert, weight = kernels.topk_select(scores, k)
                assert torch.equal(expert, stable_top_k(scores, k))
                assert torch.equal(weight, scores.gather(1, expert))


def test_topk_select_signed_zero_and_infinities():
    """-0.0 and +0.0 are equal (index order); -inf is ordinary and still selectable."""
    inf = float("inf")
    for e in (4, 40):
        row = torch.full((e,), -inf)
        row[:4] = torch.tensor([-0.0, 0.0, -inf, -0.0])
        scores = row.repeat(3, 1)
        for k in sorted({1, 2, 3, 4, min(e, 9), e}):  # packed-key kernel (k <= 8), insertion (k > 8)
            expert, _ = kernels.topk_select(scores, k)
            assert torch.equal(expert, stable_top_k(scores, k)), (e, k)


@settings(max_examples=60, deadline=None)
@given(a=st.integers(1, 3000), e=st.integers(1, 70), capacity=st.integers(0, 400), seed=st.integers(0, 10**6),
       distinct=st.integers(1, 6))
def test_capacity_kernels_match_keep_within_capacity(a, e, capacity, seed, distinct):
    expert, score = tied_assignments(a, e, seed, distinct)
    flat = expert.reshape(-1)
    want_pos = keep_within_capacity(flat, position_priority(expert, score).reshape(-1), capacity, e)
    want_probs = keep_within_capacity(flat, probs_priority(expert, score).reshape(-1), capacity, e)
    assert torch.equal(kernels.keep_position(expert, capacity, e), want_pos)
    assert torch.equal(kernels.keep_by_score(expert, score, capacity, e), want_probs)
    # both forms of each kernel (the wrappers pick the parallel one only with >= 4 threads)
    mod = kernels._load()
    flat_np, score_np = flat.numpy(), score.reshape(-1).numpy()
    for fn in (mod.keep_position, mod.keep_position_serial):
        kept = np.zeros(flat.numel(), np.bool_)
        fn(flat_np, capacity, e, kept)
        assert torch.equal(torch.from_numpy(kept), want_pos), fn
    for fn in (mod.keep_by_score, mod.keep_by_score_serial):
        kept = np.zeros(flat.numel(), np.bool_)
        fn(flat_np, score_np, capacity, e, kept)
        assert torch.equal(torch.from_numpy(kept), want_probs), fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("capacity", [None, 1, 7])
def test_dispatch_and_combine_identical(dtype, capacity):
    t, e, d = 203, 8, 19
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 3, (t, e), generator=g).float()  # ties: uneven, tied loads
    hidden = torch.randn(t, d, generator=g).to(dtype)
    for policy in ("position", "probs"):
        routing = route("topk", "torch", logits, 2, capacity, policy, renormalize=True)
        a = dispatch(routing, hidden, impl="torch")
        b = dispatch(routing, hidden, impl="numba")
        for f in ("rows", "token_index", "weight", "counts"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        out = a.rows * 3 - 1  # any expert output
        want = combine(routing, a, out, impl="torch")
        if dtype == torch.float32:
            got = combine(routing, a, out, impl="numba")
            assert torch.equal(want, got)
        else:
            assert torch.equal(want, combine(routing, a, out, impl="auto"))  # auto: torch for non-fp32
            with pytest.raises(ValueError, match="float32"):
                combine(routing, a, out, impl="numba")


def test_dispatch_and_combine_with_heavy_drops():
    """All tokens want experts 0 and 1: two rows kept, idle experts, tokens with nothing kept."""
    logits = torch.zeros(10, 4)
    hidden = torch.randn(10, 3)
    routing = route("topk", "torch", logits, 2, 1, "position")
    a, b = (dispatch(routing, hidden, impl=impl) for impl in ("torch", "numba"))
    assert b.rows.shape == (2, 3) and b.counts.tolist() == [1, 1, 0, 0]
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("rows", "token_index", "weight", "counts"))
    assert torch.equal(combine(routing, a, a.rows, impl="torch"), combine(routing, a, a.rows, impl="numba"))


def test_identical_at_scale_on_several_threads():
    """Big enough that torch and the kernels both run multi-threaded (parallel reductions,
    index_add_, counting passes over several blocks)."""
    t, e, d = 20000, 64, 48
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(t, e, generator=g)
    hidden = torch.randn(t, d, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for policy in ("position", "probs"):
            routing = assert_same_routing("topk", logits, 2, 700, policy, renormalize=True)
            a, b = (dispatch(routing, hidden, impl=impl) for impl in ("torch", "numba"))
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("rows", "token_index", "weight", "counts"))
            out = a.rows * 1.5 - 0.25
            assert torch.equal(combine(routing, a, out, impl="torch"), combine(routing, a, out, impl="numba"))
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- choosing the path


def test_impl_option():
    assert create_router("topk", {}).impl == "auto"
    assert create_router("switch", {"impl": "torch"}).impl == "torch"
    with pytest.raises(MoebenchError):
        create_router("topk", {"impl": "cuda"})


def test_use_numba():
    x = torch.zeros(2, 2)
    assert kernels.use_numba("auto", x) is kernels.available()
    assert kernels.use_numba("torch", x) is False
    assert kernels.use_numba("auto", x.double()) is False
    with pytest.raises(ValueError, match="float32"):
        kernels.use_numba("numba", x.double())
    with pytest.raises(ValueError, match="impl"):
        kernels.use_numba("fast", x)
    assert kernels.use_numba("numba", x.double(), float32=False) is True


def test_auto_is_numba_on_cpu():
    logits = adversarial_logits(40, 8)["few_values"]
    auto = route("topk", "auto", logits, 2, 6, "probs")
    numba_ = route("topk", "numba", logits, 2, 6, "probs")
    assert all(torch.equal(getattr(auto, f), getattr(numba_, f)) for f in FIELDS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_falls_back_to_torch_on_cuda():
    logits = torch.randn(64, 8, device="cuda")
    r = route("topk", "auto", logits, 2, 20, "probs")
    assert r.kept.device.type == "cuda"
    with pytest.raises(ValueError, match="CPU"):
        route("topk", "numba", logits, 2, 20, "probs")

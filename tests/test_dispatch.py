"""dispatch / combine: expert-contiguous gather and weighted scatter back."""

import pytest
import torch

from moebench.core import kernels
from moebench.core.dispatch import combine as _combine
from moebench.core.dispatch import dispatch as _dispatch
from moebench.routers import RouteContext, RouteInputs, create_router
from moebench.core.routing import Routing


# every test runs on both implementations of dispatch/combine: plain torch and, where numba
# imports, the numba kernels (combine's kernel takes float32 only; "auto" falls back to torch)
IMPLS = ["torch"] + (["auto"] if kernels.available() else [])


@pytest.fixture(params=IMPLS, autouse=True)
def impl(request):
    global IMPL
    IMPL = request.param
    yield request.param
    IMPL = "torch"


IMPL = "torch"


def dispatch(routing, hidden):
    return _dispatch(routing, hidden, impl=IMPL)


def combine(routing, d, out):
    return _combine(routing, d, out, impl=IMPL)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def route(name, logits, top_k, capacity=None, policy="position", **params):
    return create_router(name, params).route(RouteInputs(logits), RouteContext(top_k, capacity, policy, gen()))


def row_experts(d):
    return torch.repeat_interleave(torch.arange(d.counts.numel()), d.counts)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_round_trip_identity_experts(dtype, tol, k):
    logits = torch.randn(50, 8, generator=gen(1))
    hidden = torch.randn(50, 16, generator=gen(2)).to(dtype)
    r = route("topk", logits, k, capacity=None, renormalize=True)
    d = dispatch(r, hidden)
    assert d.rows.dtype == dtype and d.weight.dtype == dtype
    assert d.rows.shape == (50 * k, 16)
    out = combine(r, d, d.rows)  # identity experts
    assert out.dtype == dtype and out.shape == hidden.shape
    assert torch.allclose(out.float(), hidden.float(), atol=tol, rtol=tol)


def test_round_trip_is_not_trivially_true():
    # without renormalised weights the combine scales each token by its weight sum (< 1)
    logits = torch.randn(20, 4, generator=gen(1))
    hidden = torch.randn(20, 3, generator=gen(2))
    r = route("topk", logits, 2)
    d = dispatch(r, hidden)
    out = combine(r, d, d.rows)
    sums = r.kept_weight_per_token()
    assert torch.allclose(out, hidden * sums[:, None], atol=1e-6)
    assert not torch.allclose(out, hidden, atol=1e-3)


def test_rows_are_expert_contiguous_and_counts_match_loads():
    logits = torch.randn(40, 6, generator=gen(3))
    hidden = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 2)  # row value = token id
    for policy in ("position", "probs", "bpr", "random"):
        r = route("topk", logits, 2, capacity=10, policy=policy)
        d = dispatch(r, hidden)
        assert torch.equal(d.counts, r.load())
        assert int(d.counts.sum()) == d.rows.shape[0] == int(r.kept.sum())
        experts = row_experts(d)
        assert bool((experts[1:] >= experts[:-1]).all())
        # each row is a kept (token, expert) assignment, each kept one appears once
        kept_pairs = sorted(zip(r.token_index[r.kept].tolist(), r.expert_index[r.kept].tolist()))
        assert sorted(zip(d.token_index.tolist(), experts.tolist())) == kept_pairs
        assert torch.equal(d.rows[:, 0].long(), d.token_index)
        # the row's weight is its assignment's weight
        lookup = {(tk, e): w for tk, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist())}
        assert d.weight.tolist() == [lookup[p] for p in zip(d.token_index.tolist(), experts.tolist())]


def test_literal_dispatch():
    # 3 tokens, 2 experts, k = 1: t0 -> e1, t1 -> e0, t2 -> e1 (dropped, capacity 1)
    r = Routing(
        token_index=torch.tensor([0, 1, 2]), expert_index=torch.tensor([1, 0, 1]), choice=torch.tensor([0, 0, 0]),
        weight=torch.tensor([0.5, 0.25, 0.75]), kept=torch.tensor([True, True, False]),
        probs=torch.full((3, 2), 0.5), logits=torch.zeros(3, 2), top_k=1, capacity=1,
    )
    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    d = dispatch(r, hidden)
    assert d.rows.tolist() == [[3.0, 4.0], [1.0, 2.0]]
    assert d.token_index.tolist() == [1, 0]
    assert d.weight.tolist() == [0.25, 0.5]
    assert d.counts.tolist() == [1, 1]
    out = combine(r, d, d.rows * 2)
    assert out.tolist() == [[1.0, 2.0], [1.5, 2.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_tokens_get_zero_rows(dtype):
    logits = torch.zeros(12, 4)
    logits[:, 0] = 5.0  # everyone wants expert 0
    hidden = torch.randn(12, 5, generator=gen(4)).to(dtype) + 3
    r = route("switch", logits, 1, capacity=3)
    assert r.kept.tolist() == [True] * 3 + [False] * 9
    d = dispatch(r, hidden)
    assert d.counts.tolist() == [3, 0, 0, 0]
    out = combine(r, d, d.rows)
    assert torch.equal(out[3:], torch.zeros(9, 5, dtype=dtype))
    p0 = torch.softmax(logits[0], -1)[0]
    assert torch.allclose(out[:3].float(), hidden[:3].float() * float(p0), rtol=2e-2, atol=2e-2)


def test_partially_dropped_token_keeps_its_kept_share():
    # k = 2, capacity 1: token 1 keeps only its 2nd choice
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]]))
    hidden = torch.tensor([[1.0], [10.0]])
    r = route("topk", logits, 2, capacity=1)
    d = dispatch(r, hidden)
    out = combine(r, d, d.rows)
    # token 0: e0 (.6) kept, e1 (.3) kept; token 1: e0 dropped, e2 (.4) kept
    assert torch.allclose(out, torch.tensor([[0.9], [4.0]]), atol=1e-6)


def test_expert_choice_and_dense_dispatch():
    logits = torch.randn(10, 4, generator=gen(5))
    hidden = torch.randn(10, 3, generator=gen(6))
    r = route("expert_choice", logits, 1, capacity=3)
    d = dispatch(r, hidden)
    assert d.counts.tolist() == [3, 3, 3, 3]
    out = combine(r, d, d.rows)
    w = torch.zeros(10).index_add_(0, r.token_index, r.weight)
    assert torch.allclose(out, hidden * w[:, None], atol=1e-6)
    r = route("softmax_dense", logits, 1)
    d = dispatch(r, hidden)
    assert d.counts.tolist() == [10] * 4
    assert torch.allclose(combine(r, d, d.rows), hidden, atol=1e-5)  # softmax weights sum to 1

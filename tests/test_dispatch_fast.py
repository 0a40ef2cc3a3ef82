"""dispatch/combine: the numba kernels (moebench.core.kernels.dispatch_rows / combine_rows) give
exactly what the plain-torch paths of moebench.core.dispatch give, on Routings built by hand to
be awkward (everything dropped, nothing dropped, no assignments, one token repeated many
times, out-of-order token lists, k up to 8, E not dividing T), on any dtype for dispatch, on
non-contiguous tensors, and on floats where the order of the additions shows.
Speed is shown by benchmarks/bench_routing.py, not here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebench.core import kernels
from moebench.core.dispatch import combine, dispatch
from moebench.core.routing import Routing

FIELDS = ("rows", "token_index", "weight", "counts")


def make_routing(token, expert, kept, weight, t, e, k=1):
    """A Routing from explicit assignment lists (probs/logits only give T and E)."""
    a = token.numel()
    return Routing(token_index=token, expert_index=expert, choice=torch.zeros(a, dtype=torch.int64),
                   weight=weight, kept=kept, probs=torch.zeros(t, e), logits=torch.zeros(t, e),
                   top_k=k, capacity=None)


def random_routing(t, e, k, keep=0.8, seed=0, layout="rank_major"):
    """k distinct experts per token; rank-major like the token-choice routers, or shuffled."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.rand(t, e, generator=g).argsort(dim=1)[:, :k].t().reshape(-1)
    token = torch.arange(t).repeat(k)
    if layout == "shuffled":
        perm = torch.randperm(t * k, generator=g)
        expert, token = expert[perm], token[perm]
    kept = torch.rand(t * k, generator=g) < keep
    weight = torch.rand(t * k, generator=g)
    return make_routing(token, expert, kept, weight, t, e, k)


def check_dispatch(routing, hidden):
    a = dispatch(routing, hidden, impl="torch")
    b = dispatch(routing, hidden, impl="numba")
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert _same_bits(x, y), f
    return a


def _same_bits(x, y):
    """Equal as stored bits (torch.equal would call -0.0 == 0.0 and NaN != NaN)."""
    if x.is_complex():
        x, y = torch.view_as_real(x), torch.view_as_real(y)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.shape == y.shape and torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()]))


def check_combine(routing, dispatched, out):
    want = combine(routing, dispatched, out, impl="torch")
    got = combine(routing, dispatched, out, impl="numba")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _same_bits(want, got)  # bits: also -0.0 vs 0.0 and NaN payloads
    return got


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", ["rank_major", "shuffled"])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_random(k, layout, keep):
    t, e, d = 301, 13, 7  # E does not divide T
    routing = random_routing(t, e, k, keep, seed=k, layout=layout)
    hidden = torch.randn(t, d, generator=torch.Generator().manual_seed(1))
    a = check_dispatch(routing, hidden)
    check_combine(routing, a, a.rows * 0.5 - 1)


def test_all_dropped_and_empty():
    t, e, d = 9, 4, 5
    routing = random_routing(t, e, 2, keep=0.0)
    a = check_dispatch(routing, torch.randn(t, d))
    assert a.rows.shape == (0, d) and a.counts.tolist() == [0] * e
    assert torch.equal(check_combine(routing, a, a.rows), torch.zeros(t, d))
    empty = make_routing(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                         torch.zeros(0, dtype=torch.bool), torch.zeros(0), t, e)
    a = check_dispatch(empty, torch.randn(t, d))
    check_combine(empty, a, a.rows)
    no_tokens = make_routing(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0, dtype=torch.bool), torch.zeros(0), 0, e)
    a = check_dispatch(no_tokens, torch.randn(0, d))
    assert check_combine(no_tokens, a, a.rows).shape == (0, d)


@pytest.mark.parametrize("d", [0, 1, 2, 33])
def test_widths(d):
    routing = random_routing(50, 6, 2, keep=0.7, seed=d)
    a = check_dispatch(routing, torch.randn(50, d))
    check_combine(routing, a, a.rows * 3)


def test_one_token_many_rows_order_matters():
    """Token 3 gets 40 rows (expert-choice style) at scattered positions, with values whose
    float32 sum depends on the order of the additions; weights include -0.0 and 0."""
    t, e = 6, 40
    g = torch.Generator().manual_seed(3)
    token = torch.full((60,), 3, dtype=torch.int64)
    token[torch.randperm(60, generator=g)[:20]] = torch.randint(0, t, (20,), generator=g)
    expert = torch.randint(0, e, (60,), generator=g)
    weight = torch.rand(60, generator=g)
    weight[::7] = -0.0
    weight[1::9] = 0.0
    routing = make_routing(token, expert, torch.ones(60, dtype=torch.bool), weight, t, e)
    hidden = torch.tensor([1e8, 1.0, -1e8, 3e-8]).repeat(t, 1) * torch.randn(t, 1, generator=g)
    a = check_dispatch(routing, hidden)
    out = a.rows * torch.tensor([1.0, -1.0, 1e-3, 1e3]) + torch.randn(a.rows.shape, generator=g) * 1e7
    check_combine(routing, a, out)


def test_special_floats():
    """-0.0 products (0 + -0.0 is +0.0 in both paths), inf, NaN, subnormals."""
    t, e = 8, 3
    routing = random_routing(t, e, 2, keep=1.0, seed=4)
    vals = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40, 3.4e38])
    hidden = vals.repeat(t, 1)
    a = check_dispatch(routing, hidden)
    check_combine(routing, a, a.rows)
    neg = torch.full_like(a.weight, -0.0)
    check_combine(routing, type(a)(a.rows, a.token_index, neg, a.counts), a.rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int32,
                                   torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_dispatch_dtypes(dtype):
    t, d = 40, 6
    routing = random_routing(t, 5, 2, keep=0.6, seed=2)
    hidden = (torch.randn(t, d, generator=torch.Generator().manual_seed(0)) * 50)
    hidden = hidden.to(torch.complex64) * 1j if dtype == torch.complex64 else hidden.to(dtype)
    a = check_dispatch(routing, hidden)
    assert a.rows.dtype == dtype and a.weight.dtype == dtype


def test_non_contiguous():
    t, e, d = 64, 8, 10
    routing = random_routing(t, e, 3, keep=0.9, seed=5)
    base = torch.randn(d * 2, t, generator=torch.Generator().manual_seed(6))
    for hidden in (base.t()[:, ::2], base[:d].t(), torch.randn(1, d).expand(t, d)):
        assert not hidden.is_contiguous()
        a = check_dispatch(routing, hidden)
        check_combine(routing, a, a.rows.t().contiguous().t())  # column-major expert output
        check_combine(routing, a, torch.randn(a.rows.shape[0], 2 * d)[:, ::2])


def test_out_of_range_indices_raise():
    t, e = 5, 3
    hidden = torch.randn(t, 2)
    ok = torch.ones(2, dtype=torch.bool)
    for token, expert in (([0, 5], [0, 1]), ([0, -1], [0, 1]), ([0, 1], [0, 3]), ([0, 1], [-1, 0])):
        routing = make_routing(torch.tensor(token), torch.tensor(expert), ok, torch.ones(2), t, e)
        with pytest.raises(IndexError):
            dispatch(routing, hidden, impl="numba")
    with pytest.raises(IndexError):
        kernels.combine_rows(torch.tensor([0, t]), torch.ones(2), torch.ones(2, 2), t)
    # a dropped assignment may point anywhere: it is never read
    routing = make_routing(torch.tensor([0, 99]), torch.tensor([0, 1]), torch.tensor([True, False]),
                           torch.ones(2), t, e)
    check_dispatch(routing, hidden)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 70), e=st.integers(1, 9), k=st.integers(1, 8), d=st.integers(1, 9),
       keep=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16),
       layout=st.sampled_from(["rank_major", "shuffled"]))
def test_hypothesis(t, e, k, d, keep, seed, layout):
    routing = random_routing(t, e, min(k, e), keep, seed, layout)
    hidden = torch.randn(t, d, generator=torch.Generator().manual_seed(seed))
    a = check_dispatch(routing, hidden)
    check_combine(routing, a, a.rows * 1.7 + 0.1)


def test_several_blocks_and_threads():
    """Enough assignments for many counting blocks and both threads, tokens in any order."""
    t, e, d = 9000, 37, 16
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for layout in ("rank_major", "shuffled"):
            routing = random_routing(t, e, 4, keep=0.9, seed=7, layout=layout)
            hidden = torch.randn(t, d, generator=torch.Generator().manual_seed(8))
            a = check_dispatch(routing, hidden)
            check_combine(routing, a, a.rows * 1.5 - 0.25)
    finally:
        torch.set_num_threads(previous)

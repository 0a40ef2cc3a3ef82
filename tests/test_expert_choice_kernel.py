"""Expert choice's numba selection (`kernels.expert_choice_select`) against a stable sort.

Per expert the C highest probs[:, e], descending, ties to the lower token: exactly
``torch.sort(probs.t(), descending=True, stable=True)`` cut to C, on random, tied, constant
and adversarial columns, on both of the kernel's paths (sampled threshold, exact radix select)
and on several threads. The router's torch path (torch.topk) gives the same routing wherever
the values have no ties. Speed: benchmarks/bench_routing.py and suites/scaling.yaml.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moebench.core import kernels  # noqa: E402
from moebench.core.kernels import _numba_expert_choice as ec  # noqa: E402
from moebench.routers import RouteContext, RouteInputs, create_router  # noqa: E402
from _capture_cases import adversarial_logits  # noqa: E402


def reference(probs: torch.Tensor, c: int):
    s = torch.sort(probs.t(), dim=1, descending=True, stable=True)
    return s.indices[:, :c], s.values[:, :c]


def assert_selects(probs: torch.Tensor, c: int):
    token, weight = kernels.expert_choice_select(probs, c)
    want_t, want_w = reference(probs, c)
    assert torch.equal(token, want_t)
    assert torch.equal(weight.view(torch.int32), want_w.view(torch.int32))  # the same bits


@pytest.mark.parametrize("name", ["normal", "all_equal", "few_values", "extremes", "huge_spread", "near_ties"])
@pytest.mark.parametrize("t,e,c", [(1, 4, 1), (17, 8, 5), (300, 64, 12), (9000, 16, 703), (20000, 8, 20000)])
def test_equals_a_stable_sort(name, t, e, c):
    probs = torch.softmax(adversarial_logits(t, e, seed=t)[name], dim=-1)
    assert_selects(probs, c)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 3000), e=st.integers(1, 40), data=st.data())
def test_random_shapes_and_palettes(t, e, data):
    c = data.draw(st.integers(1, t))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    palette = data.draw(st.sampled_from(["floats", "few", "one_hot"]))
    if palette == "floats":
        logits = torch.randn(t, e, generator=g) * data.draw(st.sampled_from([1e-3, 1.0, 40.0]))
    elif palette == "few":
        logits = torch.randint(0, 4, (t, e), generator=g).float()
    else:
        logits = torch.nn.functional.one_hot(torch.randint(0, e, (t,), generator=g), e).float() * 50
    assert_selects(torch.softmax(logits, dim=-1), c)


def test_raw_values_with_signs_zeros_and_infinities():
    # not probabilities: the key orders every float; -0.0 ties with +0.0 (and comes back as +0.0)
    x = torch.tensor([[1.0, -1.0], [0.0, float("inf")], [-0.0, -float("inf")], [-2.5, 0.0], [3.0, -0.0]])
    token, weight = kernels.expert_choice_select(x, 5)
    assert token.tolist() == [[4, 0, 1, 2, 3], [1, 3, 4, 0, 2]]
    assert weight.tolist() == [[3.0, 1.0, 0.0, 0.0, -2.5], [float("inf"), 0.0, 0.0, -1.0, -float("inf")]]


def sampled(probs: torch.Tensor, c: int):
    """(taken, chosen tokens as sets) of the sampled path alone on all columns."""
    bits = probs.numpy().view(np.int32)
    t, e = probs.shape
    ct, ck = np.empty((e, c), np.int64), np.empty((e, c), np.int64)
    return ec._sampled(bits, c, 0, e, ec.SAMPLE, ct, ck), ct


def test_the_sampled_path_takes_random_columns_and_refuses_what_would_mislead_it():
    t, e, c = 40000, 4, 1500
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(t, e, generator=g), dim=-1)
    taken, ct = sampled(probs, c)
    assert taken  # the usual case: one pass, no fallback
    want, _ = reference(probs, c)
    assert all(set(ct[j].tolist()) == set(want[j].tolist()) for j in range(e))
    # the sample reads rows i*stride + stride//2: put every large value on rows it skips, so
    # the sample's bracket sits below the true C-th value (more than C keys are 'sure')
    stride = t // ec.SAMPLE
    skipped = torch.ones(t, dtype=torch.bool)
    skipped[stride // 2::stride] = False
    hostile = torch.full((t, e), 0.1)
    hostile[skipped] = torch.linspace(0.5, 0.9, int(skipped.sum()))[:, None]
    assert not sampled(hostile, c)[0]  # refused: the exact path runs instead
    assert_selects(hostile, c)
    # all equal: every key is a candidate, more than the candidates' room
    assert not sampled(torch.full((t, e), 0.25), c)[0]
    assert_selects(torch.full((t, e), 0.25), c)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result(threads):
    t, e, c = 70000, 24, 2700  # parallel over groups of experts, sampled path
    probs = torch.softmax(torch.randn(t, e, generator=torch.Generator().manual_seed(5)) * 3, dim=-1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_selects(probs, c)
    finally:
        torch.set_num_threads(previous)


def test_capacity_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"capacity must be in \[1, T=3\]"):
        kernels.expert_choice_select(torch.rand(3, 2), 4)


def route(impl: str, logits: torch.Tensor, c: int | None, k: int = 2):
    return create_router("expert_choice", {"impl": impl}).route(RouteInputs(logits), RouteContext(top_k=k, capacity=c))


FIELDS = ("token_index", "expert_index", "choice", "weight", "kept", "probs")


@pytest.mark.parametrize("t,e,c", [(5000, 64, 200), (10000, 16, 1500), (1000, 8, None)])
def test_router_paths_agree_up_to_the_order_of_ties(t, e, c):
    # float32 probs of continuous logits still tie (thousands of values per column): torch.topk
    # orders tied tokens as it likes, the kernel lower token first
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t), dtype=torch.float64).float()
    a, b = route("torch", logits, c), route("numba", logits, c)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("expert_index", "choice", "weight", "kept", "probs"))
    c = a.capacity
    column = torch.sort(a.probs.t(), dim=1, descending=True).values
    assert not (column[:, c - 1] == column[:, c]).any()  # no tie across the cut: the same tokens chosen

    def ties_by_token(x):  # each expert's tokens by weight descending, equal weights by token
        w, tok = x.weight.view(e, c).numpy(), x.token_index.view(e, c).numpy()
        return np.stack([tok[i][np.lexsort((tok[i], -w[i]))] for i in range(e)])

    assert np.array_equal(ties_by_token(a), ties_by_token(b))
    assert np.array_equal(ties_by_token(b), b.token_index.view(e, c).numpy())  # the kernel's order already is that


def test_auto_takes_numba_where_it_pays():
    assert not kernels.expert_choice_pays(4096) and kernels.expert_choice_pays(ec.SAMPLED_MIN_TOKENS)
    logits = torch.randint(0, 3, (ec.SAMPLED_MIN_TOKENS, 8), generator=torch.Generator().manual_seed(1)).float()
    r = route("auto", logits, 3000)
    want, _ = reference(torch.softmax(logits, -1), 3000)  # ties: the numba path's order, not topk's
    assert torch.equal(r.token_index, want.reshape(-1))


def test_a_trained_gate_keeps_its_gradient_on_the_numba_path():
    logits = torch.randn(64, 8, requires_grad=True)
    r = route("numba", logits, 20)
    assert r.weight.grad_fn is not None
    r.weight.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

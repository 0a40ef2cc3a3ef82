"""Workloads (docs/spec.md §5): seeded, shaped, finite, and distributed as documented."""

import pytest
import torch

from moebench.core.errors import MoebenchError, WorkloadMismatchError
from moebench.routers import RouteContext, create_router
from moebench.core.workloads import BatchShape, create_workload, workload_classes, zipf_weights

SHAPE = BatchShape(tokens=256, experts=8, hidden=16)


def build(name):
    try:
        return create_workload(name)
    except (MoebenchError, TypeError) as exc:  # e.g. `trace` needs a file to replay
        pytest.skip(f"workload {name} needs options to build: {exc}")


def top1(inputs, experts):
    return torch.bincount(inputs.logits.float().argmax(1), minlength=experts)


def assert_same(a, b):
    assert torch.equal(a.logits, b.logits)
    assert (a.hidden is None) == (b.hidden is None)
    if a.hidden is not None:
        assert torch.equal(a.hidden, b.hidden)
    assert (a.token_ids is None) == (b.token_ids is None)
    if a.token_ids is not None:
        assert torch.equal(a.token_ids, b.token_ids)
        assert torch.equal(a.vocab_freq, b.vocab_freq)


def test_builtin_workloads_registered():
    assert {"uniform", "zipf", "hot_experts", "zero_load", "clustered", "collapsed", "rotating_hotspot",
            "burst", "tokens"} <= set(workload_classes())


@pytest.mark.parametrize("name", list(workload_classes()))
def test_deterministic_per_seed(name):
    w = build(name)
    for batch in (0, 3):
        assert_same(w.batch(SHAPE, 7, batch), w.batch(SHAPE, 7, batch))
    # a fresh instance with the same options gives the same stream
    assert_same(w.batch(SHAPE, 7, 1), build(name).batch(SHAPE, 7, 1))


@pytest.mark.parametrize("name", list(workload_classes()))
def test_differs_across_seeds_and_batches(name):
    w = build(name)
    assert not torch.equal(w.batch(SHAPE, 0, 0).logits, w.batch(SHAPE, 1, 0).logits)
    assert not torch.equal(w.batch(SHAPE, 0, 0).logits, w.batch(SHAPE, 0, 1).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(workload_classes()))
def test_shapes_dtypes_finite(name, dtype):
    w = build(name)
    shape = BatchShape(tokens=100, experts=6, hidden=12, dtype=dtype)
    for batch in range(3):
        x = w.batch(shape, 3, batch)
        assert x.logits.shape == (100, 6) and x.logits.dtype == dtype
        assert torch.isfinite(x.logits.float()).all()
        assert x.hidden is not None and x.hidden.shape == (100, 12) and x.hidden.dtype == dtype
        assert torch.isfinite(x.hidden.float()).all()
        if "token_ids" in w.makes:
            assert x.token_ids is not None and x.token_ids.shape == (100,) and x.token_ids.dtype == torch.int64
            assert x.vocab_freq is not None and x.vocab_freq.dim() == 1
        else:
            assert x.token_ids is None


def test_zipf_top1_frequencies_follow_rank_power():
    tokens, experts = 60000, 8
    for s in (1.2, 0.5):
        x = create_workload("zipf", {"s": s}).batch(BatchShape(tokens, experts, 8), seed=0)
        freq = top1(x, experts).double().sort(descending=True).values / tokens
        ranks = torch.arange(1, experts + 1, dtype=torch.float64)
        expected = ranks**-s / (ranks**-s).sum()
        assert torch.allclose(freq, expected, atol=0.008), (freq, expected)
    assert zipf_weights(4, 1.0, "cpu").tolist() == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])


def test_zipf_s0_is_uniform():
    x = create_workload("zipf", {"s": 0.0}).batch(BatchShape(40000, 4, 8), seed=1)
    assert torch.allclose(top1(x, 4).double() / 40000, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


def test_hot_experts_fraction():
    tokens = 40000
    x = create_workload("hot_experts", {"hot": 2, "fraction": 0.6}).batch(BatchShape(tokens, 8, 8), seed=2)
    freq = top1(x, 8).double().sort(descending=True).values / tokens
    assert float(freq[:2].sum()) == pytest.approx(0.6, abs=0.015)
    assert torch.allclose(freq[:2], torch.full((2,), 0.3, dtype=torch.float64), atol=0.015)
    assert torch.allclose(freq[2:], torch.full((6,), 0.4 / 6, dtype=torch.float64), atol=0.01)
    with pytest.raises(WorkloadMismatchError):
        create_workload("hot_experts", {"hot": 4}).batch(BatchShape(8, 4, 4), seed=0)


@pytest.mark.parametrize("idle", [1, 3])
def test_zero_load_idle_experts_never_win(idle):
    experts = 8
    x = create_workload("zero_load", {"idle": idle}).batch(BatchShape(2000, experts, 16), seed=4)
    counts = top1(x, experts)
    assert int((counts == 0).sum()) == idle
    dead = (counts == 0).nonzero().squeeze(1)
    live = (counts > 0).nonzero().squeeze(1)
    # every dead logit is below every live logit of every token: never in any top-k, k <= E - idle
    assert float(x.logits[:, dead].max()) < float(x.logits[:, live].min())
    r = create_router("topk").route(x, RouteContext(experts - idle, None))
    assert not torch.isin(r.expert_index, dead).any()


def test_collapsed_routes_nearly_everything_to_one_expert():
    for seed in range(4):
        x = create_workload("collapsed").batch(BatchShape(1024, 8, 64), seed=seed)
        assert int(top1(x, 8).max()) >= 0.95 * 1024
    # with much more noise it is no longer collapsed
    x = create_workload("collapsed", {"noise": 10.0}).batch(BatchShape(1024, 8, 64), seed=0)
    assert int(top1(x, 8).max()) < 0.5 * 1024


def test_uniform_is_near_balance():
    x = create_workload("uniform").batch(BatchShape(8192, 8, 64), seed=0)
    counts = top1(x, 8).double()
    assert float(counts.max() / counts.mean()) < 1.3
    assert int((counts == 0).sum()) == 0


def test_rotating_hotspot_moves_with_batch_index():
    w = create_workload("rotating_hotspot", {"hot": 2, "fraction": 0.5, "step": 1})
    shape = BatchShape(8000, 8, 8)
    for b in range(10):
        counts = top1(w.batch(shape, seed=0, batch_index=b), 8)
        hot = set(counts.topk(2).indices.tolist())
        assert hot == {b % 8, (b + 1) % 8}, (b, counts.tolist())
        assert float(counts.topk(2).values.sum()) / 8000 == pytest.approx(0.5, abs=0.03)
    w3 = create_workload("rotating_hotspot", {"hot": 1, "fraction": 0.8, "step": 3})
    for b in range(4):
        assert int(top1(w3.batch(shape, seed=1, batch_index=b), 8).argmax()) == (3 * b) % 8


def test_burst_has_occasional_extreme_batches():
    w = create_workload("burst", {"probability": 0.25, "fraction": 0.9})
    shape = BatchShape(2048, 8, 16)
    peaks = [float(top1(w.batch(shape, seed=0, batch_index=b), 8).max()) / 2048 for b in range(40)]
    bursts = [p for p in peaks if p > 0.8]
    assert 2 <= len(bursts) <= 20  # ~10 expected
    assert all(p < 0.4 for p in peaks if p <= 0.8)
    none = create_workload("burst", {"probability": 0.0})
    assert all(float(top1(none.batch(shape, 0, b), 8).max()) / 2048 < 0.4 for b in range(5))


def test_tokens_ids_and_frequencies():
    w = create_workload("tokens", {"vocab": 100, "s": 1.1})
    x = w.batch(BatchShape(20000, 8, 32), seed=5)
    assert x.token_ids.dtype == torch.int64
    assert int(x.token_ids.min()) >= 0 and int(x.token_ids.max()) < 100
    assert x.vocab_freq.shape == (100,)
    assert float(x.vocab_freq.sum()) == pytest.approx(1.0, abs=1e-5)
    assert bool((x.vocab_freq[:-1] >= x.vocab_freq[1:]).all())
    empirical = torch.bincount(x.token_ids, minlength=100).double() / 20000
    assert torch.allclose(empirical[:5], x.vocab_freq[:5].double(), atol=0.01)
    # hidden = embedding[id] + 0.1 noise: tokens of one id sit close together, of different ids far apart
    ids = x.token_ids
    a, b = (ids == 0).nonzero()[:2, 0].tolist()
    c = int((ids == 1).nonzero()[0, 0])
    same = float((x.hidden[a] - x.hidden[b]).norm())
    other = float((x.hidden[a] - x.hidden[c]).norm())
    assert same < 2.0 < other

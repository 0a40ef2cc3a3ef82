"""Literal tests of the task generators (moebench/kinds/train/tasks.py)."""

import math

import pytest
import torch

from moebench.kinds.train.tasks import TASKS, Language, LocalExperts, Teacher, _LanguageInstance, _LocalExpertsInstance, _TeacherInstance


def test_local_experts_targets_are_each_regions_own_linear_map():
    task = LocalExperts(regions=2, spread=0.0, output_dim=1)
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    maps = torch.tensor([[[2.0], [3.0]], [[-1.0], [5.0]]])  # [K, d, o]
    inst = _LocalExpertsInstance(task, centres, maps)
    data = inst.sample(200, torch.Generator().manual_seed(0))
    region0 = data.truth == 0
    assert 40 < int(region0.sum()) < 160  # regions drawn uniformly
    assert torch.equal(data.x[region0], centres[0].expand(int(region0.sum()), 2))  # spread 0: the centre itself
    # y = x . A_k / sqrt(d): region 0 -> (1*2 + 0*3)/sqrt 2, region 1 -> (0*-1 + 2*5)/sqrt 2
    assert torch.allclose(data.y[region0], torch.full((int(region0.sum()), 1), 2 / math.sqrt(2)))
    assert torch.allclose(data.y[~region0], torch.full((int((~region0).sum()), 1), 10 / math.sqrt(2)))


def test_local_experts_build_is_seeded_and_spread_is_the_noise_scale():
    a, b = LocalExperts(regions=3).build(4, seed=7), LocalExperts(regions=3).build(4, seed=7)
    assert torch.equal(a.centres, b.centres) and torch.equal(a.maps, b.maps)
    assert not torch.equal(a.centres, LocalExperts(regions=3).build(4, seed=8).centres)
    data = a.sample(4000, torch.Generator().manual_seed(1))
    offsets = data.x - a.centres[data.truth]
    assert abs(float(offsets.std()) - 0.5) < 0.02  # spread default 0.5


def test_teacher_targets_follow_its_argmax_expert():
    task = Teacher(experts=2, expert_hidden=1, output_dim=1)
    gate = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # x1 > 0 -> expert 0, x1 < 0 -> expert 1
    u = torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]])  # [K, d, f]
    v = torch.tensor([[[3.0]], [[-1.0]]])  # [K, f, o]
    inst = _TeacherInstance(task, gate, u, v)
    y, k = inst.targets(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
    assert k.tolist() == [0, 1]
    expected = [3 * math.tanh(1 / math.sqrt(2)), -math.tanh(2 / math.sqrt(2))]
    assert y[:, 0].tolist() == pytest.approx(expected, rel=1e-6)
    data = inst.sample(100, torch.Generator().manual_seed(0))
    assert torch.equal(data.truth, (data.x @ gate).argmax(1))


def test_language_unigram_classes_and_floor():
    inst = Language(vocab=4, classes=2, s=1.0, mix=1.0).build(8, seed=0)
    # (r+1)^-1 / (1 + 1/2 + 1/3 + 1/4) = [12, 6, 4, 3] / 25
    assert inst.unigram.tolist() == pytest.approx([0.48, 0.24, 0.16, 0.12])
    # mix 1: every class's next-token distribution is the unigram permuted, so H(next | current) = H(unigram)
    h = -sum(p * math.log(p) for p in [0.48, 0.24, 0.16, 0.12])
    assert inst.floor_perplexity() == pytest.approx(math.exp(h))
    data = inst.sample(20000, torch.Generator().manual_seed(0))
    assert torch.equal(data.truth, data.ids % 2)
    freq = torch.bincount(data.ids, minlength=4).double() / 20000
    assert freq.tolist() == pytest.approx([0.48, 0.24, 0.16, 0.12], abs=0.015)
    # the next token of class c is pi_c[rank] with rank ~ unigram: pi_c[0] is the most common successor
    for c in range(2):
        nxt = data.y[data.truth == c]
        assert int(torch.bincount(nxt, minlength=4).argmax()) == int(inst.perms[c, 0])


def test_language_mix_zero_ignores_the_class():
    inst = _LanguageInstance(Language(vocab=3, classes=3, s=1.0, mix=0.0), torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]]))
    cond = inst.conditional()
    assert torch.allclose(cond, inst.unigram.expand(3, 3))
    assert inst.floor_perplexity() == pytest.approx(math.exp(-sum(p * math.log(p) for p in inst.unigram.tolist())))


def test_task_registry_checks_options():
    assert set(TASKS.classes()) == {"local_experts", "teacher", "language"}
    assert "no option" in TASKS.problem("teacher", {"nope": 1})
    assert TASKS.problem("language", {"classes": 1}) is not None


def test_teacher_bias_shifts_its_expert_literally():
    task = Teacher(experts=2, expert_hidden=1, output_dim=1)
    gate = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    u, v = torch.ones(2, 2, 1), torch.ones(2, 1, 1)
    x = torch.tensor([[0.5, 0.0], [2.0, 0.0]])  # scores (0.5, -0.5) and (2, -2)
    assert _TeacherInstance(task, gate, u, v).expert(x).tolist() == [0, 0]
    # bias +1.5 on expert 1: 0.5 < -0.5 + 1.5, but 2 > -2 + 1.5
    assert _TeacherInstance(task, gate, u, v, torch.tensor([0.0, 1.5])).expert(x).tolist() == [1, 0]


def test_balanced_teacher_splits_fresh_inputs_evenly_and_keeps_its_maps():
    plain = Teacher(experts=8).build(32, seed=3)
    balanced = Teacher(experts=8, balanced=True).build(32, seed=3)
    assert plain.bias is None
    assert torch.equal(plain.gate, balanced.gate) and torch.equal(plain.u, balanced.u)  # same teacher
    x = torch.randn(65536, 32, generator=torch.Generator().manual_seed(99))  # not the calibration sample
    vio = lambda k: float(torch.bincount(k, minlength=8).max()) / (65536 / 8) - 1  # noqa: E731
    assert vio(plain.expert(x)) > 0.1  # a random gate is uneven...
    assert vio(balanced.expert(x)) < 0.05  # ...the calibrated one is even up to sampling noise (~0.03)
    again = Teacher(experts=8, balanced=True).build(32, seed=3)
    assert torch.equal(again.bias, balanced.bias)  # deterministic per seed


def test_calibration_that_cannot_converge_is_an_error():
    from moebench.kinds.train.tasks import calibrate_bias

    gate = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="calibration reached MaxVio"):
        calibrate_bias(gate, seed=0, target=0.0, max_steps=1)  # one step cannot even out a random gate


def test_a_balanced_teacher_with_too_many_experts_is_refused_up_front():
    assert "up to 256 experts" in TASKS.problem("teacher", {"balanced": True, "experts": 1000})
    assert TASKS.problem("teacher", {"experts": 1000}) is None

"""Expert capacity (docs/spec.md §1): C = ceil(cf*k*T/E), then min_capacity, then the multiple, never above T."""

import pytest

from moebench.core.capacity import CapacitySpec, expert_capacity


@pytest.mark.parametrize(
    "factor, tokens, experts, top_k, expected",
    [
        (1.0, 100, 10, 1, 10),  # exact division
        (1.0, 101, 10, 1, 11),  # ceil(10.1)
        (1.25, 64, 8, 1, 10),  # 1.25*64/8 = 10
        (1.25, 64, 8, 2, 20),  # factor k: 1.25*2*64/8 = 20
        (2.0, 10, 4, 2, 10),  # 2*2*10/4 = 10 (= T, not clamped)
        (0.5, 7, 3, 1, 2),  # ceil(7/6) = 2
        (1.5, 7, 3, 2, 7),  # ceil(7.0) = 7
        (0.25, 1, 16, 1, 1),  # ceil(1/64) = 1: never 0 for cf > 0
        (1.1, 100, 10, 1, 11),  # 11 exactly, not 12 (float 1.1*100/10 = 11.000000000000002)
        (1.1, 1000, 10, 1, 110),
        (1.1, 100, 10, 2, 22),  # float 1.1*2*100/10 = 22.000000000000004
        (0.3, 30, 9, 1, 1),  # 0.3*30/9 = 1 exactly
        (3, 8, 4, 1, 6),  # integer factor
    ],
)
def test_ceil_rule(factor, tokens, experts, top_k, expected):
    assert expert_capacity(CapacitySpec(factor), tokens, experts, top_k) == expected


def test_float_product_would_round_up_but_capacity_does_not():
    # the guard above is only meaningful if naive float arithmetic actually overshoots
    import math

    assert math.ceil(1.1 * 1 * 100 / 10) == 12
    assert expert_capacity(CapacitySpec(1.1), 100, 10, 1) == 11


def test_min_capacity_raises_small_capacity():
    assert expert_capacity(CapacitySpec(1.0, min_capacity=4), 16, 8, 1) == 4  # ceil(2) -> 4
    assert expert_capacity(CapacitySpec(1.0, min_capacity=4), 64, 8, 1) == 8  # 8 already >= 4
    assert expert_capacity(CapacitySpec(1.0, min_capacity=8), 64, 8, 1) == 8


def test_capacity_multiple_rounds_up():
    assert expert_capacity(CapacitySpec(1.0, multiple=8), 100, 10, 1) == 16  # 10 -> 16
    assert expert_capacity(CapacitySpec(1.0, multiple=8), 160, 10, 1) == 16  # 16 stays 16
    assert expert_capacity(CapacitySpec(1.0, multiple=4), 90, 10, 1) == 12  # 9 -> 12
    assert expert_capacity(CapacitySpec(1.0, multiple=1), 90, 10, 1) == 9


def test_min_capacity_applied_before_multiple():
    # ceil(1*1*10/10) = 1 -> max(1, 5) = 5 -> next multiple of 4 = 8
    assert expert_capacity(CapacitySpec(1.0, min_capacity=5, multiple=4), 10, 10, 1) == 8


def test_never_above_tokens():
    assert expert_capacity(CapacitySpec(4.0), 10, 2, 2) == 10  # 4*2*10/2 = 40 -> 10
    assert expert_capacity(CapacitySpec(1.0, min_capacity=32), 10, 4, 1) == 10
    assert expert_capacity(CapacitySpec(1.0, multiple=16), 10, 4, 1) == 10  # 3 -> 16 -> 10


def test_dropless_is_none():
    spec = CapacitySpec(None)
    assert spec.dropless
    assert not CapacitySpec(1.0).dropless
    assert expert_capacity(spec, 100, 10, 2) is None
    assert expert_capacity(CapacitySpec(None, min_capacity=4, multiple=8), 100, 10, 2) is None

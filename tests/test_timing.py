"""Adaptive rounds, clocks, peak memory and thread pinning.

Times are only bounded from below: the machine is noisy.
"""

import time

import pytest
import torch

from moebench.core.case import TimingSpec
from moebench.run.timing import (
    CpuClock,
    CudaClock,
    clock_for,
    default_threads,
    measure,
    peak_memory,
    pinned_threads,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Counter:
    """A phase that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


class FakeClock:
    """Reports a fixed duration per call (ms) and runs the phase."""

    name = "fake"

    def __init__(self, ms):
        self.ms = ms
        self.timed = 0

    def time_call(self, fn):
        self.timed += 1
        fn()
        return self.ms


def test_warmup_is_untimed_and_min_rounds_respected():
    fn, clock = Counter(), FakeClock(ms=1000.0)  # every round alone exceeds min_time_s
    spec = TimingSpec(warmup_rounds=3, min_rounds=5, max_rounds=50, min_time_s=0.0)
    stats = measure(fn, spec, clock)
    assert stats.rounds == 5
    assert clock.timed == 5
    assert fn.calls == 3 + 5


def test_min_time_adds_rounds():
    # 10 ms per round, 0.25 s wanted -> 25 rounds (more than min_rounds)
    fn, clock = Counter(), FakeClock(ms=10.0)
    spec = TimingSpec(warmup_rounds=0, min_rounds=2, max_rounds=1000, min_time_s=0.25)
    stats = measure(fn, spec, clock)
    assert stats.rounds == 25
    assert fn.calls == 25
    assert stats.median == 10.0 and stats.iqr == 0.0


def test_max_rounds_caps_both():
    fn, clock = Counter(), FakeClock(ms=0.001)
    spec = TimingSpec(warmup_rounds=2, min_rounds=20, max_rounds=7, min_time_s=10.0)
    stats = measure(fn, spec, clock)
    assert stats.rounds == 7
    assert fn.calls == 2 + 7


def test_no_warmup():
    fn = Counter()
    spec = TimingSpec(warmup_rounds=0, min_rounds=3, max_rounds=3, min_time_s=0.0)
    assert measure(fn, spec, CpuClock()).rounds == 3
    assert fn.calls == 3


def test_bad_max_rounds():
    with pytest.raises(ValueError, match="max_rounds"):
        measure(Counter(), TimingSpec(max_rounds=0), CpuClock())


def test_real_sleep_min_time():
    calls = []

    def sleepy():
        calls.append(1)
        time.sleep(0.001)

    spec = TimingSpec(warmup_rounds=1, min_rounds=2, max_rounds=100, min_time_s=0.02)
    stats = measure(sleepy, spec, CpuClock())
    # each round takes >= 1 ms, so 0.02 s is reached after at most 20 rounds
    assert 2 <= stats.rounds <= 20
    total_ms = stats.rounds * stats.mean
    assert total_ms >= 20.0  # measured time reached min_time_s ...
    assert total_ms - stats.max < 20.0  # ... and timing stopped once it did
    assert len(calls) == 1 + stats.rounds


def test_cpu_clock_times_are_plausible():
    spec = TimingSpec(warmup_rounds=1, min_rounds=6, max_rounds=10, min_time_s=0.0)  # 6: a 95% CI exists
    stats = measure(lambda: time.sleep(0.002), spec, CpuClock())
    assert stats.median >= 2.0
    assert stats.min >= 2.0
    assert stats.ci_low <= stats.median <= stats.ci_high


def test_clock_for():
    assert isinstance(clock_for("cpu"), CpuClock)
    cuda = clock_for("cuda:1")  # constructing touches no device
    assert isinstance(cuda, CudaClock) and cuda.device == torch.device("cuda:1")
    with pytest.raises(ValueError, match="no clock"):
        clock_for("meta")


def test_peak_memory_cpu_sees_allocation():
    mb4 = 1024 * 1024  # float32 elements in 4 MiB

    def alloc():
        return torch.ones(mb4).sum()

    peak = peak_memory(alloc, "cpu")
    assert peak is not None
    assert peak >= 4 * 1024 * 1024


def test_peak_memory_cpu_counts_live_overlap():
    n = 256 * 1024  # 1 MiB of float32

    def two_then_one():
        a, b = torch.ones(n), torch.ones(n)  # 2 MiB live
        del a, b
        return torch.ones(n)  # 1 MiB

    peak = peak_memory(two_then_one, "cpu")
    assert peak is not None
    assert 2 * 1024 * 1024 <= peak < 3 * 1024 * 1024


def test_peak_memory_other_device_none():
    assert peak_memory(lambda: None, "meta") is None


def test_pinned_threads_sets_and_restores():
    before = torch.get_num_threads()
    with pinned_threads(1) as n:
        assert n == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_pinned_threads_default_and_restore_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError):
            with pinned_threads(None) as n:
                assert n == default_threads() == torch.get_num_threads()
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_pinned_threads_rejects_zero():
    with pytest.raises(ValueError, match="threads"):
        with pinned_threads(0):
            pass


@pytest.mark.cuda
@needs_cuda
def test_cuda_clock_measures():
    x = torch.randn(1024, 1024, device="cuda")
    spec = TimingSpec(warmup_rounds=2, min_rounds=5, max_rounds=20, min_time_s=0.0)
    stats = measure(lambda: x @ x, spec, clock_for("cuda"))
    assert stats.rounds == 5
    assert stats.median > 0.0


@pytest.mark.cuda
@needs_cuda
def test_cuda_peak_memory():
    n = 1024 * 1024  # 4 MiB float32
    peak = peak_memory(lambda: torch.ones(n, device="cuda").sum(), "cuda")
    assert peak is not None and peak >= 4 * 1024 * 1024

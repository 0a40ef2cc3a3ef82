"""Timing of benchmark phases: clocks, adaptive rounds, peak memory, thread pinning.

A *phase* is a zero-argument callable ``fn()`` (its return value is ignored); the runner
builds one per phase (route, dispatch, combine) with its inputs already on the device.
A :class:`Clock` times one call; :func:`measure` decides how many calls to time and
summarizes them into :class:`~moebench.core.timing_stats.Stats` (milliseconds).

No CUDA call happens at import time or in defaults: a :class:`CudaClock` touches the
device only when it times something.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from moebench.core.case import TimingSpec
from moebench.core.timing_stats import Stats, summarize

Phase = Callable[[], Any]


class Clock(Protocol):
    """Times one call of a phase.  ``name`` says which clock ("cpu" or "cuda")."""

    name: str

    def time_call(self, fn: Phase) -> float:
        """Run ``fn()`` once and return its elapsed time in milliseconds."""
        ...


class CpuClock:
    """Wall-clock timing with ``time.perf_counter`` around one call."""

    name = "cpu"

    def time_call(self, fn: Phase) -> float:
        """Run ``fn()`` once; elapsed milliseconds."""
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def __repr__(self) -> str:
        return "CpuClock()"


class CudaClock:
    """Device-side timing with a pair of ``torch.cuda.Event(enable_timing=True)``.

    The device is synchronized before the start event (so earlier queued work is not
    counted) and after the end event (so the kernels of this call are finished).
    """

    name = "cuda"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)

    def time_call(self, fn: Phase) -> float:
        """Run ``fn()`` once; elapsed milliseconds between the two CUDA events."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return float(start.elapsed_time(end))

    def __repr__(self) -> str:
        return f"CudaClock({str(self.device)!r})"


def clock_for(device: str) -> Clock:
    """The clock for a device string: "cpu" -> CpuClock, "cuda"/"cuda:N" -> CudaClock.

    Raises ValueError for other device types (mps, xpu, ...), which have no clock yet.
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return CpuClock()
    if kind == "cuda":
        return CudaClock(device)
    raise ValueError(f"no clock for device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def measure(fn: Phase, timing: TimingSpec, clock: Clock) -> Stats:
    """Time ``fn`` with adaptive rounds and summarize the samples (milliseconds).

    First ``timing.warmup_rounds`` untimed calls; then one timed call per round, until both
    ``min_rounds`` rounds are done and the measured time reaches ``min_time_s`` seconds,
    but never more than ``max_rounds`` rounds (which wins over ``min_rounds``).
    ``timing.enabled`` and ``timing.threads`` are for the caller (see :func:`pinned_threads`).
    """
    if timing.max_rounds < 1:
        raise ValueError(f"timing.max_rounds must be >= 1, got {timing.max_rounds}")
    for _ in range(max(0, timing.warmup_rounds)):
        fn()
    samples: list[float] = []
    total_ms = 0.0
    min_time_ms = timing.min_time_s * 1e3
    while len(samples) < timing.max_rounds and (
        len(samples) < timing.min_rounds or total_ms < min_time_ms
    ):
        ms = clock.time_call(fn)
        samples.append(ms)
        total_ms += ms
    return summarize(samples)


def peak_memory(fn: Phase, device: str) -> int | None:
    """Extra peak bytes allocated by one call of ``fn`` on ``device`` (never timed).

    CUDA: resets the peak counter, runs ``fn`` once between synchronizations, and returns
    ``max_memory_allocated - memory_allocated`` measured before the call.
    CPU: runs ``fn`` once under ``torch.profiler`` with ``profile_memory=True`` and returns
    the peak of the running sum of its CPU allocations and frees (bytes, >= 0).  This
    reads the profiler's kineto results, a semi-private API; if that is unavailable the
    answer is None.  The first profiled call in a process pays about a second of profiler
    start-up, and kineto may print a start/stop line to stderr.
    Other device types: None.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return _cuda_peak(fn, torch.device(device))
    if kind == "cpu":
        return _cpu_peak(fn)
    return None


def _cuda_peak(fn: Phase, device: torch.device) -> int:
    """Peak extra CUDA bytes of one call (see :func:`peak_memory`)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, int(torch.cuda.max_memory_allocated(device)) - int(before))


def _cpu_peak(fn: Phase) -> int | None:
    """Peak extra CPU bytes of one call from the profiler's memory events, or None."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        records = sorted(
            (e.start_ns(), int(e.nbytes()))
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except (AttributeError, RuntimeError):
        return None
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints profiler start/stop lines from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def default_threads() -> int:
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``, else 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def pinned_threads(n: int | None) -> Iterator[int]:
    """Set torch's intra-op threads to ``n`` (None: :func:`default_threads`) for a block.

    Yields the number in effect (``torch.get_num_threads()``); restores the previous
    setting on exit, also on error.
    """
    wanted = default_threads() if n is None else n
    if wanted < 1:
        raise ValueError(f"threads must be >= 1 or None, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


class RouterTimeout(Exception):
    """A router ran past ``timing.timeout_s`` in the main process (``isolate: false``)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, SIGALRM after ``seconds`` raises `RouterTimeout` in the main thread: how
    ``timing.timeout_s`` holds without isolation (#23). It stops Python code only: a kernel stuck
    in C returns first, which only an isolated worker (killed by its parent) can cut short. A
    no-op for None, off the main thread, or where there is no setitimer."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise RouterTimeout(f"exceeded timing.timeout_s={seconds:g} s (not isolated: stopped at its next Python line)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

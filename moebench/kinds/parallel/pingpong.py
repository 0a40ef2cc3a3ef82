"""A cost-model profile fitted on the spot: a gloo ping-pong between two local processes.

Rank 0 sends n bytes to rank 1, which sends them back (torch.distributed send/recv); half the
first quartile of the round trips is one transfer of n bytes. A low quantile, not the median:
a round trip needs both processes on a core at once, and on a busy machine the median mostly
measures the scheduler. `fit_latency_bandwidth` fits t = alpha + n / bw
over sizes from 4 KiB to 4 MiB; `local_profile` caches the profile for the process.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from moebench.kinds.parallel.costmodel import Profile, fit_latency_bandwidth
from moebench.kinds.parallel.profiles import gloo_profile

SIZES = tuple(4096 * 4 ** i for i in range(6))  # 4 KiB .. 4 MiB
ROUNDS = 32
_CACHE: dict[str, Profile] = {}


def first_quartile(times: list[float]) -> float:
    return statistics.quantiles(times, n=4)[0] if len(times) > 1 else times[0]


def pingpong(sizes=SIZES, rounds: int = ROUNDS) -> list[tuple[int, float]] | None:
    """On each of two ranks: [(bytes, one-way seconds)] on rank 0 (None on rank 1)."""
    rank = dist.get_rank()
    out = []
    for n in sizes:
        buf = torch.zeros(n // 4, dtype=torch.float32)
        times = []
        for i in range(rounds + 1):  # the first exchange of each size warms up
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i:
                times.append((time.perf_counter() - t0) / 2)
        out.append((n, first_quartile(times)))
    return out if rank == 0 else None


def _worker(timeout_s: float):
    from moebench.kinds.parallel.engine import ensure_group

    ensure_group("gloo", timeout_s)
    torch.set_num_threads(1)
    return pingpong()


def measure(timeout_s: float = 60.0) -> list[tuple[int, float]]:
    """Ping-pong samples from two freshly launched local gloo processes."""
    from moebench.kinds.parallel.launch import spawn

    return spawn(_worker, timeout_s, 2, timeout_s)[0]


def local_profile(timeout_s: float = 60.0) -> Profile:
    """The gloo_local profile of this machine (measured once per process)."""
    if "gloo_local" not in _CACHE:
        samples = measure(timeout_s)
        alpha, bw = fit_latency_bandwidth([n for n, _ in samples], [t for _, t in samples])
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        _CACHE["gloo_local"] = gloo_profile(
            alpha, bw, f"gloo ping-pong on this machine: alpha {alpha * 1e6:.0f} us, {bw / 1e9:.2f} GB/s "
                       f"(sizes {SIZES[0]}-{SIZES[-1]} B), {cores} cores", cores)
    return _CACHE["gloo_local"]

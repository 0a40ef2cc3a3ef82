"""The gloo-fitted cost-model profile against measured all-to-alls on this machine.

1. `moebench.kinds.parallel.pingpong.local_profile`: a gloo ping-pong between two local processes,
   fitted to t = alpha + bytes / bw.
2. For N = 2 and 4 local gloo ranks: all_to_all_single of an even byte matrix (every rank
   sends ``size / N`` bytes to every rank), timed after a barrier each round; the slowest
   rank's median and first quartile (the statistic the ping-pong is fitted on) against the
   model's prediction for the same matrix.

    .venv/bin/python benchmarks/bench_ep_alltoall.py [--sizes 262144 1048576 4194304] [--rounds 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moebench.kinds.parallel.costmodel import alltoall_times
from moebench.kinds.parallel.launch import spawn
from moebench.kinds.parallel.pingpong import first_quartile, local_profile


def _measure(arg):
    sizes, rounds = arg
    from moebench.kinds.parallel.engine import ensure_group

    ensure_group("gloo", 120)
    torch.set_num_threads(1)
    world = dist.get_world_size()
    out = {}
    for size in sizes:
        send = torch.zeros(size // 4, dtype=torch.float32)  # size bytes, size / world to each rank
        recv = torch.empty_like(send)
        times = []
        for i in range(rounds + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[size] = (statistics.median(times), first_quartile(times))
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[262144, 1048576, 4194304])
    parser.add_argument("--rounds", type=int, default=32)
    args = parser.parse_args()
    profile = local_profile(120)
    print(f"profile: {profile.source}")
    print("| ranks | bytes sent per rank | measured median ms | measured first quartile ms | predicted ms "
          "| predicted / median | predicted / first quartile |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (2, 4):
        per_rank = spawn(_measure, (args.sizes, args.rounds), n, 120)[0]
        for size in args.sizes:
            median = max(r[size][0] for r in per_rank)  # the slowest rank's
            fastest = max(r[size][1] for r in per_rank)  # the slowest rank's first quartile
            matrix = torch.full((n, n), size / n, dtype=torch.float64)
            predicted = float(alltoall_times(matrix, profile).max())
            print(f"| {n} | {size} | {median * 1e3:.3f} | {fastest * 1e3:.3f} | {predicted * 1e3:.3f} "
                  f"| {predicted / median:.2f} | {predicted / fastest:.2f} |")


if __name__ == "__main__":
    main()

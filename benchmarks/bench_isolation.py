"""What crash isolation and the Routing check cost: worker start-up, per case, per row.

    python benchmarks/bench_isolation.py                  # quickstart --quick, 3 repeats
    python benchmarks/bench_isolation.py --cases 8 --repeats 5

One process. Rows:
- worker start-up: a fresh worker (python -c, import torch and the runner) until it answers,
  median of ``--starts``; paid once per run (and again after each crash or timeout).
- the same quick suite run in-process and isolated, alternating, median wall time of
  ``--repeats`` each, with timing on (as `moebench run --quick` measures) and off (routing and
  metrics only, where the overhead is largest relative to the work); the worker is warm
  (started before the first isolated repeat), so the difference is the per-case cost of
  isolation: the case sent to the worker (its inputs regenerated there), every row pickled
  back over the pipe, the parent's wait.
- one row through the pipe: pickle + send + receive + unpickle of a RowResult of that suite.
- the Routing check: `check_routing` on the numba `topk` route's output at T=65536, E=64,
  k=2, beside the route call itself (moebench.run.timing.measure medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from multiprocessing import Pipe
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebench.core.capacity import CapacitySpec, expert_capacity  # noqa: E402
from moebench.core.case import TimingSpec  # noqa: E402
from moebench.run.isolation import WORKERS, Worker, isolated_rows  # noqa: E402
from moebench.routers import RouteContext, RouteInputs, create_router  # noqa: E402
from moebench.core.routing_check import check_routing  # noqa: E402
from moebench.run.runner import CaseRunner, quick_case, quick_timing  # noqa: E402
from moebench.run.session import RunOptions, execute, plan_cases  # noqa: E402
from moebench.suite.load import load_suite, validate_document  # noqa: E402
from moebench.run.timing import CpuClock, measure, pinned_threads  # noqa: E402


def run_seconds(suite, isolate: bool, enabled: bool) -> float:
    timing = replace(suite.timing, isolate=isolate, enabled=enabled)
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        execute(replace(suite, timing=timing), RunOptions(results_root=Path(tmp), quick=True, device="cpu"))
        return time.perf_counter() - begin


def worker_start_seconds(starts: int) -> tuple[list[float], list[float]]:
    """(wall s, CPU s) of each start; CPU (the worker's user + system time, read once it is
    reaped) is what start-up costs on an idle machine, wall what it took on this one."""
    import resource

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    wall, cpu = [], []
    for _ in range(starts):
        before, begin = children_cpu(), time.perf_counter()
        w = Worker()
        wall.append(time.perf_counter() - begin)
        w.stop()  # reaped: its CPU time is counted now (includes its ~ms of exiting)
        cpu.append(children_cpu() - before)
    return wall, cpu


def row_pipe_ms(suite, rounds: int = 200) -> tuple[float, int]:
    """Median ms of one RowResult of the suite's first case through a pipe, and its pickled size."""
    import pickle

    case = quick_case(suite.cases[0])
    results = list(CaseRunner(case, quick_timing(suite.timing), {"run_id": "x", "suite": suite.name})
                   .rows(list(suite.routers)))
    result = results[0]
    a, b = Pipe()
    times = []
    for _ in range(rounds):
        got = []
        reader = threading.Thread(target=lambda: got.append(b.recv()))
        begin = time.perf_counter()
        reader.start()
        a.send(result)
        reader.join()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), len(pickle.dumps(result))


def check_cost(threads: int):
    """(route, check) Stats (ms) at T=65536, E=64, k=2, cf 1.25, numba topk."""
    t, e, k = 65536, 64, 2
    torch.manual_seed(0)
    inputs = RouteInputs(torch.randn(t, e))
    router = create_router("topk")
    ctx = RouteContext(k, expert_capacity(CapacitySpec(1.25), t, e, k), "position")
    timing = TimingSpec(warmup_rounds=3, min_rounds=20, max_rounds=200, min_time_s=0.5)
    with pinned_threads(threads):
        routing = router.route(inputs, ctx)
        route = measure(lambda: router.route(inputs, ctx), timing, CpuClock())
        check = measure(lambda: check_routing(routing, "topk", finite=(inputs.logits,)), timing, CpuClock())
    return route, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=str(ROOT / "suites" / "quickstart.yaml"))
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases of the suite")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--tiny-cases", type=int, default=50, help="cases of the overhead-only suite")
    parser.add_argument("--threads", type=int, default=2, help="threads of the check-cost rows (and 1)")
    args = parser.parse_args()

    suite = load_suite(args.suite)
    if args.cases:
        suite = replace(suite, cases=suite.cases[: args.cases])
    cases = len(plan_cases(suite, "cpu", True))
    rows = cases * len(suite.routers)
    print(f"suite {suite.name} --quick: {cases} cases x {len(suite.routers)} routers = {rows} rows; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    wall, cpu = worker_start_seconds(args.starts)
    print(f"worker start-up: median {statistics.median(wall):.2f} s wall (of {', '.join(f'{s:.2f}' for s in wall)}), "
          f"{statistics.median(cpu):.2f} s CPU (of {', '.join(f'{s:.2f}' for s in cpu)}); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    WORKERS.get()  # warm: the isolated repeats below measure per-case cost, not start-up
    for enabled in (True, False):
        samples = {False: [], True: []}
        for _ in range(args.repeats):
            for isolate in (False, True):
                samples[isolate].append(run_seconds(suite, isolate, enabled))
        print(f"timing {'on ' if enabled else 'off'}: in-process {', '.join(f'{s:.2f}' for s in samples[False])} s; "
              f"isolated {', '.join(f'{s:.2f}' for s in samples[True])} s")
        for stat in (statistics.median, min):  # min: the least disturbed by other load on the machine
            inproc, iso = (stat(samples[m]) for m in (False, True))
            print(f"  {stat.__name__:>6}: in-process {inproc:.2f} s, isolated {iso:.2f} s, difference "
                  f"{iso - inproc:+.2f} s = {(iso - inproc) / cases * 1e3:+.1f} ms per case, "
                  f"{(iso - inproc) / rows * 1e3:+.1f} ms per row ({(iso / inproc - 1) * 100:+.1f}%)")

    # the overhead alone: tiny cases (T=8) whose routing costs microseconds, timing off
    tiny = validate_document({
        "name": "tiny_overhead", "version": 1, "routers": ["topk", "switch", "random", "round_robin"],
        "grid": {"workload": "uniform", "tokens": 8, "experts": 2, "top_k": 1, "seed": list(range(args.tiny_cases))},
        "timing": {"threads": 1}}, "tiny")
    tiny_rows = args.tiny_cases * len(tiny.routers)
    samples = {False: [], True: []}
    for _ in range(args.repeats):
        for isolate in (False, True):
            samples[isolate].append(run_seconds(tiny, isolate, False))
    inproc, iso = (statistics.median(samples[m]) for m in (False, True))
    print(f"tiny cases ({args.tiny_cases} cases x {len(tiny.routers)} routers, T=8, timing off): median in-process "
          f"{inproc:.2f} s, isolated {iso:.2f} s; isolation costs {(iso - inproc) / args.tiny_cases * 1e3:+.1f} ms "
          f"per case, {(iso - inproc) / tiny_rows * 1e3:+.2f} ms per row (in-process "
          f"{', '.join(f'{s:.2f}' for s in samples[False])}; isolated {', '.join(f'{s:.2f}' for s in samples[True])})")

    # the same tiny cases as bare row generators, no run folder: isolation's own cost, without
    # the overlap of the worker's routing with the parent's row writes (fsync) seen above
    base = {"run_id": "x", "suite": tiny.name}
    tiny_cases, tiny_timing = plan_cases(tiny, "cpu", True), replace(quick_timing(tiny.timing), enabled=False)
    samples = {False: [], True: []}
    for _ in range(args.repeats):
        for isolate in (False, True):
            begin = time.perf_counter()
            for case in tiny_cases:
                if isolate:
                    list(isolated_rows(case, tiny_timing, base, list(tiny.routers)))
                else:
                    list(CaseRunner(case, tiny_timing, base).rows(list(tiny.routers)))
            samples[isolate].append(time.perf_counter() - begin)
    inproc, iso = (statistics.median(samples[m]) for m in (False, True))
    print(f"  rows only, no run folder: median in-process {inproc:.3f} s, isolated {iso:.3f} s; isolation costs "
          f"{(iso - inproc) / args.tiny_cases * 1e3:+.2f} ms per case, {(iso - inproc) / tiny_rows * 1e3:+.3f} ms per row")

    ms, size = row_pipe_ms(suite)
    print(f"one row through a pipe: {ms * 1e3:.0f} us median ({size} bytes pickled)")
    for threads in sorted({1, args.threads}):
        route, check = check_cost(threads)
        print(f"check_routing at T=65536, E=64, k=2 ({threads} threads): median {check.median:.3f} ms "
              f"(min {check.min:.3f}); the numba topk route: median {route.median:.3f} ms (min {route.min:.3f}); "
              f"check/route {check.median / route.median * 100:.1f}% of medians, "
              f"{check.min / route.min * 100:.1f}% of mins")
    WORKERS.shutdown()


if __name__ == "__main__":
    main()

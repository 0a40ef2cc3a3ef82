"""CPU cost of the capturable phases (moebench.run.capture) against the eager torch and numba paths.

The capturable forms exist for CUDA graphs (fixed sizes, no host sync); on CPU they only have
to be correct, but what they cost against today's paths is worth knowing. One process, threads
pinned, every phase timed with moebench.run.timing.measure (median, 95% CI of the median), one run:

    python benchmarks/bench_capture.py                 # T=65536, E=64, k=2, cf=1.25, d=1024, 2 threads
    python benchmarks/bench_capture.py --quick         # a smoke run (T=4096, few rounds)

Logits: standard normal plus a per-expert skew from 1.5 (expert 0) to 0, so capacity drops.
Rows: route of topk (position and probs drop policies), topk with renormalisation, switch,
deepseek, round_robin and expert_choice; dispatch and combine of topk/position's Routing.
Each through the capturable form ("capture"), the eager torch path ("torch": impl torch, and
impl torch for dispatch/combine) and the numba path ("numba", where one exists). Columns: the
medians and capture / torch, capture / numba. Where they come from: the capturable top-k
builds int64 keys over [T, E] (the eager path runs torch.topk on floats and re-sorts only tied
rows); capacity and dispatch sort all A = k*T assignments (eager: bincount, and a sort of only
the N kept); dispatch copies all A rows, dropped ones included, into fixed slots.
On a machine shared with other work set OMP_WAIT_POLICY=PASSIVE (see bench_routing.py and
docs/timing_stability.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moebench.core import kernels
from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.run.capture import capture_route, combine_static, dispatch_static
from moebench.core.case import TimingSpec
from moebench.core.dispatch import combine, dispatch
from moebench.routers import RouteContext, RouteInputs, create_router
from moebench.run.timing import CpuClock, measure, pinned_threads

ROUTES = [  # (label, router, params, top_k of the case or 1, policy)
    ("topk", "topk", {}, None, "position"),
    ("topk", "topk", {}, None, "probs"),
    ("topk renormalize", "topk", {"renormalize": True}, None, "position"),
    ("switch", "switch", {}, 1, "position"),
    ("deepseek", "deepseek", {}, None, "position"),
    ("round_robin", "round_robin", {}, None, "position"),
    ("expert_choice", "expert_choice", {}, None, "position"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="T=4096 and few rounds")
    args = ap.parse_args(argv)
    t = 4096 if args.quick else args.tokens
    e, k = args.experts, args.top_k
    timing = TimingSpec(warmup_rounds=2, min_rounds=5 if args.quick else 9, max_rounds=30 if args.quick else 60,
                        min_time_s=0.05 if args.quick else 0.4)
    clock = CpuClock()
    g = torch.Generator().manual_seed(args.seed)
    # skewed towards low expert ids (like the zipf workload): experts overflow, so capacity
    # drops assignments and dispatch's fixed slots hold dropped rows too
    logits = torch.randn(t, e, generator=g) + torch.linspace(1.5, 0.0, e)
    hidden = torch.randn(t, args.hidden, generator=g)
    inputs = RouteInputs(logits, hidden=hidden)
    numba_ok = kernels.available()

    def median(fn) -> float:
        return measure(fn, timing, clock).median

    table = []
    with pinned_threads(args.threads) as threads:
        print(f"T={t} E={e} k={k} cf={args.capacity_factor} d={args.hidden} fp32; torch {torch.__version__}, "
              f"threads={threads}, numba {'yes' if numba_ok else 'no: ' + str(kernels.unavailable_reason())}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.2f}")
        for label, name, params, kk, policy in ROUTES:
            kk = kk or k
            ctx = RouteContext(kk, expert_capacity(CapacitySpec(args.capacity_factor), t, e, kk), policy,
                               torch.Generator().manual_seed(0))
            router = create_router(name, params)
            ctx = RouteContext(ctx.top_k, ctx.capacity, policy, ctx.generator, router.init_state(e, logits.device))
            form = capture_route(router)
            row = {"phase": f"route {label}, {policy}", "capture": median(lambda: form(inputs, ctx))}
            has_impl = "impl" in type(router).__dataclass_fields__
            torch_router = create_router(name, {**params, "impl": "torch"}) if has_impl else router
            row["torch"] = median(lambda: torch_router.route(inputs, ctx))
            if has_impl and numba_ok:
                numba_router = create_router(name, {**params, "impl": "numba"})
                row["numba"] = median(lambda: numba_router.route(inputs, ctx))
            table.append(row)
        router = create_router("topk", {"impl": "torch"})
        ctx = RouteContext(k, expert_capacity(CapacitySpec(args.capacity_factor), t, e, k), "position")
        routing = router.route(inputs, ctx)
        slots = dispatch_static(routing, hidden)
        eager = dispatch(routing, hidden, impl="torch")
        kept = eager.rows.shape[0]
        row = {"phase": f"dispatch ({kept} kept of {routing.kept.numel()})",
               "capture": median(lambda: dispatch_static(routing, hidden)),
               "torch": median(lambda: dispatch(routing, hidden, impl="torch"))}
        if numba_ok:
            row["numba"] = median(lambda: dispatch(routing, hidden, impl="numba"))
        table.append(row)
        row = {"phase": "combine", "capture": median(lambda: combine_static(routing, slots, slots.rows)),
               "torch": median(lambda: combine(routing, eager, eager.rows, impl="torch"))}
        if numba_ok:
            row["numba"] = median(lambda: combine(routing, eager, eager.rows, impl="numba"))
        table.append(row)

    print(f"\n| {'phase':<34} | capture ms | torch ms | numba ms | capture/torch | capture/numba |")
    print(f"|{'-' * 36}|-----------:|---------:|---------:|--------------:|--------------:|")
    for r in table:
        nb = r.get("numba")
        print(f"| {r['phase']:<34} | {r['capture']:10.3f} | {r['torch']:8.3f} | "
              f"{nb if nb is not None else float('nan'):8.3f} | {r['capture'] / r['torch']:13.2f} | "
              f"{r['capture'] / nb if nb else float('nan'):13.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of token-choice routing, capacity, dispatch and combine: torch path vs numba kernels.

One process, torch (and numba) threads pinned, every phase timed with moebench.timing.measure
(median and a 95% CI of the median), so the rows of the table are comparable with each other.
Run from the repository root:

    python benchmarks/bench_routing.py                 # T=65536, E=64, k=2, cf=1.25, d=1024, 2 threads
    python benchmarks/bench_routing.py --hidden 4096   # dispatch/combine on wider rows
    python benchmarks/bench_routing.py --quick         # a smoke run (few rounds, small linearity grid)

Rows: a memcopy of the logits (``logits.clone()``, the bound the route phase is compared to;
like every phase it writes a freshly allocated tensor, so it pays the page faults of a new
allocation where the allocator hands out fresh pages; ``copy_`` into a preallocated tensor is
shown beside it),
torch softmax + topk alone, Megatron-Core's ``topk_routing_with_score_function`` (softmax before
top-k, like moebench's ``topk``) + ``apply_router_token_dropping`` when megatron-core imports,
moebench ``topk`` (position and probs drop policies) and ``switch`` through the torch path and
the numba path, a memcopy of the hidden states [T, d], and dispatch/combine through both paths.
Then the linearity check: the numba route at several T and E, with the fitted log-log slopes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import numpy as np
import torch

from moebench import kernels
from moebench.capacity import CapacitySpec, expert_capacity
from moebench.case import TimingSpec
from moebench.dispatch import combine, dispatch
from moebench.environment import cpu_model
from moebench.routers import RouteContext, RouteInputs, create_router
from moebench.timing import CpuClock, measure, pinned_threads


def megatron_utils():
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception:  # not installed, or it fails to import here
        return None
    return moe_utils


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--hidden", type=int, default=1024, help="d of the hidden states for dispatch/combine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few rounds and a small linearity grid")
    ap.add_argument("--no-linearity", action="store_true")
    args = ap.parse_args(argv)

    if not kernels.available():
        print(f"numba is not importable: {kernels.unavailable_reason()}", file=sys.stderr)
        return 2
    timing = TimingSpec(warmup_rounds=2, min_rounds=5 if args.quick else 9, max_rounds=30 if args.quick else 60,
                        min_time_s=0.1 if args.quick else 0.4)
    clock = CpuClock()
    t, e, k, d = args.tokens, args.experts, args.top_k, args.hidden
    capacity = expert_capacity(CapacitySpec(args.capacity_factor), t, e, k)
    g = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(t, e, generator=g)
    hidden = torch.randn(t, d, generator=g)
    mu = megatron_utils()

    with pinned_threads(args.threads) as threads:
        import numba

        print(f"T={t} E={e} k={k} cf={args.capacity_factor} (C={capacity}) fp32, hidden d={d}; "
              f"torch {torch.__version__}, numba {numba.__version__} ({numba.threading_layer() if _warm() else ''}), "
              f"threads={threads}; {cpu_model()}; python {platform.python_version()}; "
              f"load average before: {_load()}")
        rows: list[dict] = []

        def add(what, impl, fn, base, kind):
            s = measure(fn, timing, clock)
            rows.append(dict(what=what, impl=impl, stats=s, base=base, kind=kind))
            return s

        copy_logits = add("memcopy logits [T, E]", "torch", lambda: logits.clone(), None, "bound")
        logits_out = torch.empty_like(logits)
        add("memcopy logits, preallocated (copy_)", "torch", lambda: logits_out.copy_(logits), copy_logits, "bound")
        add("softmax + topk (no capacity)", "torch", lambda: torch.topk(torch.softmax(logits, -1), k, dim=-1), copy_logits, "route")
        megatron = {}
        if mu is not None:
            for policy in ("position", "probs"):
                def meg(policy=policy):
                    probs, routing_map = mu.topk_routing_with_score_function(
                        logits, k, use_pre_softmax=True, score_function="softmax")
                    return mu.apply_router_token_dropping(probs, routing_map, router_topk=k,
                                                          capacity_factor=args.capacity_factor, drop_policy=policy)
                megatron[policy] = add(f"Megatron-Core topk + dropping, {policy}", "megatron-core", meg, copy_logits, "route")
        inputs = RouteInputs(logits, hidden=hidden)
        routed = {}
        cases = [("topk", k, "position"), ("topk", k, "probs")] + ([("switch", 1, "position")] if k != 1 else [])
        for name, kk, policy in cases:
            ctx = RouteContext(kk, expert_capacity(CapacitySpec(args.capacity_factor), t, e, kk), policy,
                               torch.Generator().manual_seed(0))
            for impl in ("torch", "numba"):
                router = create_router(name, {"impl": impl})
                routed[(name, policy, impl)] = router.route(inputs, ctx)
                s = add(f"moebench {name}, {policy}", impl, lambda r=router, c=ctx: r.route(inputs, c), copy_logits, "route")
                rows[-1]["megatron"] = megatron.get(policy) if name == "topk" else None
                rows[-1]["torch_path"] = rows[-2]["stats"] if impl == "numba" else None
                del s

        routing = routed[("topk", "position", "numba")]
        copy_hidden = add("memcopy hidden [T, d]", "torch", lambda: hidden.clone(), None, "bound")
        hidden_out = torch.empty_like(hidden)
        add("memcopy hidden, preallocated (copy_)", "torch", lambda: hidden_out.copy_(hidden), copy_hidden, "bound")
        parts = dispatch(routing, hidden, impl="torch")
        for phase, fns in (
            ("dispatch", {impl: (lambda i=impl: dispatch(routing, hidden, impl=i)) for impl in ("torch", "numba")}),
            ("combine", {impl: (lambda i=impl: combine(routing, parts, parts.rows, impl=i)) for impl in ("torch", "numba")}),
        ):
            first = add(f"{phase} ({parts.rows.shape[0]} rows)", "torch", fns["torch"], copy_hidden, phase)
            add(f"{phase} ({parts.rows.shape[0]} rows)", "numba", fns["numba"], copy_hidden, phase)
            rows[-1]["torch_path"] = first

        print()
        print("| what | impl | median ms | 95% CI ms | x memcopy | torch path / this | Megatron / this |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            s = r["stats"]
            ratio = f"{s.median / r['base'].median:.1f}" if r["base"] is not None else "1"
            tp = r.get("torch_path")
            meg = r.get("megatron")
            print(f"| {r['what']} | {r['impl']} | {s.median:.2f} | {s.ci_low:.2f}-{s.ci_high:.2f} | {ratio} | "
                  f"{f'{tp.median / s.median:.1f}' if tp else ''} | {f'{meg.median / s.median:.1f}' if meg else ''} |")
        if mu is None:
            print("\n(megatron-core is not importable here: no Megatron rows)")
        print(f"\nmemcopy of hidden = hidden.clone() of [{t}, {d}] fp32 ({t * d * 4 / 2**20:.0f} MiB); "
              f"dispatch writes {parts.rows.shape[0]} rows ({parts.rows.numel() * 4 / 2**20:.0f} MiB), "
              "combine reads them and writes [T, d]. 'x memcopy' is relative to the clone row above it.")

        if not args.no_linearity:
            linearity(args, timing, clock)
        print(f"\nload average after: {_load()}")
    return 0


def linearity(args, timing, clock):
    """Median route (topk, position) at several T and E; log-log slopes, beside a memcopy of
    the logits at each point (a fresh [T, E] allocation costs more per byte once it is big
    enough to come from fresh pages: the memcopy column shows that share)."""
    k = args.top_k
    ts = [args.tokens // 4, args.tokens // 2, args.tokens] if not args.quick else [args.tokens // 4, args.tokens // 2]
    es = [16, 64, 256] if not args.quick else [16, 64]
    spec = TimingSpec(warmup_rounds=1, min_rounds=5, max_rounds=30, min_time_s=0.2)
    print("\nLinearity (moebench topk, position, cf=%.2f):" % args.capacity_factor)
    print("| impl | T | E | median ms | memcopy logits ms | x memcopy |\n|---|---:|---:|---:|---:|---:|")
    for impl in ("numba", "torch"):
        router = create_router("topk", {"impl": impl})
        fits = {}
        for axis, grid in (("T", [(t, args.experts) for t in ts]), ("E", [(ts[-1], e) for e in es])):
            xs, ys, cs = [], [], []
            for t, e in grid:
                logits = torch.randn(t, e, generator=torch.Generator().manual_seed(1))
                ctx = RouteContext(k, expert_capacity(CapacitySpec(args.capacity_factor), t, e, k), "position")
                s = measure(lambda: router.route(RouteInputs(logits), ctx), spec, clock)
                c = measure(lambda: logits.clone(), spec, clock)
                print(f"| {impl} | {t} | {e} | {s.median:.2f} | {c.median:.2f} | {s.median / c.median:.1f} |")
                xs.append(math.log(t if axis == "T" else e))
                ys.append(math.log(s.median))
                cs.append(math.log(c.median))
            fits[axis] = (float(np.polyfit(xs, ys, 1)[0]), float(np.polyfit(xs, cs, 1)[0]))
        print(f"{impl}: route ~ T^{fits['T'][0]:.2f} (memcopy ~ T^{fits['T'][1]:.2f}) at E={args.experts}; "
              f"route ~ E^{fits['E'][0]:.2f} (memcopy ~ E^{fits['E'][1]:.2f}) at T={ts[-1]}")


def _warm() -> bool:
    """Run one tiny parallel kernel so numba's threading layer is chosen (for the header)."""
    kernels.topk_select(torch.zeros(1, 2), 1)
    return True


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())

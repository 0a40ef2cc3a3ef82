"""Speed of token-choice routing, capacity, dispatch and combine: torch path vs numba kernels.

One process, torch (and numba) threads pinned, every phase timed with moebench.run.timing.measure
(median and a 95% CI of the median), so the rows of the table are comparable with each other.
Run from the repository root:

    python benchmarks/bench_routing.py                 # T=65536, E=64, k=2, cf=1.25, d=1024, 2 threads
    python benchmarks/bench_routing.py --hidden 4096   # dispatch/combine on wider rows
    python benchmarks/bench_routing.py --quick         # a smoke run (few rounds, small linearity grid)
    python benchmarks/bench_routing.py --dispatch-only --hidden 64,256,1024
    python benchmarks/bench_routing.py --dispatch-only --hidden 256 --tokens 4096,16384,65536,262144

Rows: a memcopy of the logits (``logits.clone()``, the bound the route phase is compared to;
like every phase it writes a freshly allocated tensor, so it pays the page faults of a new
allocation where the allocator hands out fresh pages; ``copy_`` into a preallocated tensor is
shown beside it),
torch softmax + topk alone, Megatron-Core's ``topk_routing_with_score_function`` +
``apply_router_token_dropping`` when megatron-core imports, with softmax before top-k (paired
with moebench's ``topk``) and after it (its default, paired with ``topk_mixtral``), moebench
``topk``, ``topk_mixtral`` (position and probs drop policies) and ``switch`` through the torch
path and the numba path, a memcopy of the hidden states [T, d], and dispatch/combine through both paths.
Then the linearity check: the numba route at several T and E, with the fitted log-log slopes.

Dispatch/combine rows come for every d in ``--hidden`` (a list), each with three memcopies
beside them: ``hidden.clone()`` (a fresh [T, d]: the 'x memcopy' base), ``copy_`` into a
preallocated [T, d] (the 'x copy_' column), and a clone of dispatch's output [N, d] (N ~ k*T
kept rows: the bytes dispatch must write, page faults included, so its floor). Fresh tensors
of 32 MiB and more come from new pages on every call (glibc's largest mmap threshold), which
costs several times the copy itself here; smaller ones are reused from the heap. That is why
a clone can be far cheaper than dispatch's twice-as-large output at small T*d, and why times
grow faster than T across that size.
On a machine shared with other work, torch's OpenMP threads spin-wait after each parallel op
and a torch op then often costs a whole scheduler slice (~8 ms seen on 2 busy cores, also for a
4 MiB copy_). The moebench command shortens that spin (GOMP_SPINCOUNT=10000, numba on OpenMP: see
moebench/run/threads.py); run this script with the same variables, or OMP_WAIT_POLICY=PASSIVE on a busy machine.
``--dispatch-only`` skips the route phase and times only dispatch/combine (the numba route of
topk/position gives the Routing), at every T in ``--tokens`` (a list), with log-log slopes in T.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import numpy as np
import torch

from moebench.core import kernels
from moebench.run.allocator import ALLOCATORS, cpu_allocator
from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.case import TimingSpec
from moebench.core.dispatch import combine, dispatch
from moebench.run.machine import cpu_model
from moebench.routers import RouteContext, RouteInputs, create_router
from moebench.run.timing import CpuClock, measure, pinned_threads


def megatron_utils():
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception:  # not installed, or it fails to import here
        return None
    return moe_utils


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=_ints, default=[65536],
                    help="T; a comma list with --dispatch-only (slopes in T)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--hidden", type=_ints, default=[1024],
                    help="d of the hidden states for dispatch/combine (a comma list: one set of rows each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few rounds and a small linearity grid")
    ap.add_argument("--no-linearity", action="store_true")
    ap.add_argument("--dispatch-only", action="store_true", help="only the dispatch/combine rows")
    ap.add_argument("--cpu-allocator", choices=ALLOCATORS, default="system",
                    help="reuse: large blocks kept for reuse instead of fresh pages per call (moebench/run/allocator.py)")
    ap.add_argument("--numba-only", action="store_true",
                    help="dispatch/combine through the numba path only (the torch combine is slow at large T*d)")
    args = ap.parse_args(argv)
    if len(args.tokens) > 1 and not args.dispatch_only:
        ap.error("several --tokens need --dispatch-only")

    if not kernels.available():
        print(f"numba is not importable: {kernels.unavailable_reason()}", file=sys.stderr)
        return 2
    timing = TimingSpec(warmup_rounds=2, min_rounds=5 if args.quick else 9, max_rounds=30 if args.quick else 60,
                        min_time_s=0.1 if args.quick else 0.4)
    clock = CpuClock()
    if args.dispatch_only:
        return dispatch_only(args, timing, clock)
    t, e, k = args.tokens[0], args.experts, args.top_k
    capacity = expert_capacity(CapacitySpec(args.capacity_factor), t, e, k)
    g = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(t, e, generator=g)
    mu = megatron_utils()

    with pinned_threads(args.threads) as threads, cpu_allocator(args.cpu_allocator):
        print(f"T={t} E={e} k={k} cf={args.capacity_factor} (C={capacity}) fp32, hidden d={args.hidden}; "
              f"{_versions(threads)}; cpu_allocator={args.cpu_allocator}; load average before: {_load()}")
        rows: list[dict] = []
        add = _adder(rows, timing, clock)

        copy_logits = add("memcopy logits [T, E]", "torch", lambda: logits.clone(), None, "bound")
        logits_out = torch.empty_like(logits)
        pre = add("memcopy logits, preallocated (copy_)", "torch", lambda: logits_out.copy_(logits), copy_logits, "bound")
        add("softmax + topk (no capacity)", "torch", lambda: torch.topk(torch.softmax(logits, -1), k, dim=-1), copy_logits,
            "route", pre)
        # Megatron's two softmax orders, each paired with the moebench router of the same
        # semantics: pre-softmax <-> topk, softmax over the chosen logits <-> topk_mixtral
        megatron = {}
        if mu is not None:
            for pre_softmax, label in ((True, "pre-softmax"), (False, "softmax after top-k")):
                for policy in ("position", "probs"):
                    def meg(policy=policy, pre_softmax=pre_softmax):
                        probs, routing_map = mu.topk_routing_with_score_function(
                            logits, k, use_pre_softmax=pre_softmax, score_function="softmax")
                        return mu.apply_router_token_dropping(probs, routing_map, router_topk=k,
                                                              capacity_factor=args.capacity_factor, drop_policy=policy)
                    megatron[(pre_softmax, policy)] = add(f"Megatron-Core topk ({label}) + dropping, {policy}",
                                                          "megatron-core", meg, copy_logits, "route", pre)
        inputs = RouteInputs(logits)
        routed = {}
        cases = [("topk", {}, k, "position"), ("topk", {}, k, "probs"),
                 ("topk_mixtral", {"softmax_after_topk": True}, k, "position"),
                 ("topk_mixtral", {"softmax_after_topk": True}, k, "probs")]
        cases += [("switch", {}, 1, "position")] if k != 1 else []
        for label, params, kk, policy in cases:
            name = "switch" if label == "switch" else "topk"
            ctx = RouteContext(kk, expert_capacity(CapacitySpec(args.capacity_factor), t, e, kk), policy,
                               torch.Generator().manual_seed(0))
            for impl in ("torch", "numba"):
                router = create_router(name, {**params, "impl": impl})
                routed[(label, policy, impl)] = router.route(inputs, ctx)
                s = add(f"moebench {label}, {policy}", impl, lambda r=router, c=ctx: r.route(inputs, c), copy_logits,
                        "route", pre)
                pair = {"topk": True, "topk_mixtral": False}.get(label)
                rows[-1]["megatron"] = megatron.get((pair, policy)) if pair is not None else None
                rows[-1]["torch_path"] = rows[-2]["stats"] if impl == "numba" else None
                del s

        routing = routed[("topk", "position", "numba")]
        for d in args.hidden:
            dispatch_rows(routing, torch.randn(t, d, generator=g), add, args.numba_only)
        print_table(rows, mu is None)

        if not args.no_linearity:
            linearity(args, timing, clock)
        print(f"\nload average after: {_load()}")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _versions(threads) -> str:
    import numba

    return (f"torch {torch.__version__}, numba {numba.__version__} ({numba.threading_layer() if _warm() else ''}), "
            f"threads={threads}; {cpu_model()}; python {platform.python_version()}")


def _adder(rows, timing, clock):
    """add(what, impl, fn, base, kind, pre=None): time fn, append a table row, return its stats.
    base: the stats of the fresh memcopy it is compared to; pre: those of the copy_ into a
    preallocated tensor (the 'x copy_' column)."""
    def add(what, impl, fn, base, kind, pre=None):
        s = measure(fn, timing, clock)
        rows.append({"what": what, "impl": impl, "stats": s, "base": base, "kind": kind, "pre": pre})
        return s
    return add


def dispatch_rows(routing, hidden, add, numba_only=False) -> dict:
    """Time dispatch and combine of ``hidden`` [T, d] for ``routing`` beside three memcopies
    (fresh [T, d], preallocated [T, d], fresh [N, d]); returns the medians by row name."""
    t, d = hidden.shape
    tag = f"T={t} d={d}"
    copy_hidden = add(f"memcopy hidden [T, d], {tag}", "torch", lambda: hidden.clone(), None, "bound")
    hidden_out = torch.empty_like(hidden)
    pre = add(f"memcopy hidden, preallocated (copy_), {tag}", "torch", lambda: hidden_out.copy_(hidden),
              copy_hidden, "bound")
    parts = dispatch(routing, hidden, impl="torch")
    n = parts.rows.shape[0]
    medians = {"clone": copy_hidden.median, "copy_": pre.median}
    medians["clone_rows"] = add(f"memcopy of dispatch's output [N, d] (N={n}), {tag}", "torch",
                                lambda: parts.rows.clone(), copy_hidden, "bound", pre).median
    impls = ("numba",) if numba_only else ("torch", "numba")
    for phase, call in (("dispatch", lambda i: dispatch(routing, hidden, impl=i)),
                        ("combine", lambda i: combine(routing, parts, parts.rows, impl=i))):
        for impl in impls:  # print_table puts the torch row's median over the numba row's
            medians[f"{phase} {impl}"] = add(f"{phase} ({n} rows), {tag}", impl, lambda i=impl, c=call: c(i),
                                             copy_hidden, phase, pre).median
    return medians


def print_table(rows, no_megatron=False):
    print()
    print("| what | impl | median ms | 95% CI ms | x memcopy | x copy_ | torch path / this | Megatron / this |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    previous = None
    for r in rows:
        s = r["stats"]
        ratio = f"{s.median / r['base'].median:.1f}" if r["base"] is not None else "1"
        pre = f"{s.median / r['pre'].median:.1f}" if r.get("pre") is not None else ""
        tp = r.get("torch_path")
        if tp is None and previous is not None and r["impl"] == "numba" and previous["impl"] == "torch" \
                and previous["what"] == r["what"]:
            tp = previous["stats"]
        meg = r.get("megatron")
        print(f"| {r['what']} | {r['impl']} | {s.median:.2f} | {f'{s.ci_low:.2f}-{s.ci_high:.2f}' if s.has_ci else f'none ({s.rounds} rounds)'} | {ratio} | {pre} | "
              f"{f'{tp.median / s.median:.1f}' if tp else ''} | {f'{meg.median / s.median:.1f}' if meg else ''} |")
        previous = r
    if no_megatron:
        print("\n(megatron-core is not importable here: no Megatron rows)")
    print("\n'x memcopy': relative to hidden.clone() (a fresh [T, d]; for route rows, logits.clone()); "
          "'x copy_': relative to copy_ into a preallocated [T, d]. Dispatch writes N ~ k*T rows, "
          "combine reads them and writes [T, d]; the clone of [N, d] is dispatch's floor.")


def dispatch_only(args, timing, clock) -> int:
    """Only the dispatch/combine rows, at every T in --tokens and d in --hidden; slopes in T."""
    e, k = args.experts, args.top_k
    rows: list[dict] = []
    add = _adder(rows, timing, clock)
    found: dict[tuple[int, int], dict] = {}
    with pinned_threads(args.threads) as threads, cpu_allocator(args.cpu_allocator):
        print(f"dispatch/combine only: T={args.tokens} E={e} k={k} cf={args.capacity_factor} fp32, "
              f"d={args.hidden}; {_versions(threads)}; cpu_allocator={args.cpu_allocator}; load average before: {_load()}")
        router = create_router("topk", {"impl": "numba"})
        for t in args.tokens:
            g = torch.Generator().manual_seed(args.seed)
            logits = torch.randn(t, e, generator=g)
            ctx = RouteContext(k, expert_capacity(CapacitySpec(args.capacity_factor), t, e, k), "position",
                               torch.Generator().manual_seed(0))
            routing = router.route(RouteInputs(logits), ctx)
            for d in args.hidden:
                found[(t, d)] = dispatch_rows(routing, torch.randn(t, d, generator=g), add, args.numba_only)
        print_table(rows, no_megatron=False)
        if len(args.tokens) > 1:
            print("\nSlopes in T (log-log fit of the medians):")
            for d in args.hidden:
                xs = [math.log(t) for t in args.tokens]
                fits = {name: float(np.polyfit(xs, [math.log(found[(t, d)][name]) for t in args.tokens], 1)[0])
                        for name in found[(args.tokens[0], d)]}
                print(f"d={d}: " + ", ".join(f"{name} ~ T^{v:.2f}" for name, v in fits.items()))
        print(f"\nload average after: {_load()}")
    return 0


def linearity(args, timing, clock):
    """Median route (topk, position) at several T and E; log-log slopes, beside a memcopy of
    the logits at each point (a fresh [T, E] allocation costs more per byte once it is big
    enough to come from fresh pages: the memcopy column shows that share)."""
    k, t = args.top_k, args.tokens[0]
    ts = [t // 4, t // 2, t] if not args.quick else [t // 4, t // 2]
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
    """Run one parallel kernel so numba's threading layer is chosen (for the header): big enough
    for the parallel form (smaller selections run the serial kernel and choose no layer)."""
    kernels.topk_select(torch.zeros(kernels.PARALLEL_MIN_WORK // 2, 2), 1)
    return True


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())

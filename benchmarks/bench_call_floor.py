"""The per-call floor of one route call, split into its parts, at decode to prefill sizes.

One `topk` route (E=64, k=2, fp32, CPU, cf=1.25, `position` drops) at T in {1, 16, 64, 256,
1024, 4096}, each part timed alone, beside two references of the same shape: a bare
``torch.topk(torch.softmax(x, -1), k)`` and an empty numba kernel call. Then the whole route
of a few routers at the same T (`--routers`). Microseconds per call, medians over rounds of
many calls each (a round lasts >= 200 us, so perf_counter's resolution and overhead vanish).

Parts (each a call of the code the route runs, timed on its own):
- ``score``: ``torch.softmax(logits.float(), -1)``;
- ``select``: `moebench.core.kernels.topk_select` (numba thread count set, k largest, gather);
- ``capacity``: `kernels.keep_position` on the rank-major experts (the `position` pass);
- ``finish``: `TokenChoiceRouter.finish` (capacity + building the Routing), and ``build``: the
  same without capacity (only the Routing's tensors);
- ``fused``: `kernels.route_fused` (where it exists): selection, capacity and the Routing's
  tensors in one serial call, what the route runs below the parallel threshold;
- ``overhead``: route - (score + select + finish), or route - (score + fused) where the fused
  call is the route's path: Python, dataclasses, dtype casts, calls;
- ``numba empty`` / ``numba empty parallel``: a no-op kernel with one array argument, serial and
  with a prange over the threads (launch + thread wake-up); ``set_num_threads``: numba's call.
A part the measured revision does not have is shown as "-".

Runs on the working tree, or on git revisions side by side (each exported with ``git archive``
to a temporary folder and measured in its own process, this script's code driving both):

    python benchmarks/bench_call_floor.py                          # working tree
    python benchmarks/bench_call_floor.py --rev HEAD~3 --rev WORKTREE   # before | after
    python benchmarks/bench_call_floor.py --quick                  # a smoke run

Threads are pinned (``--threads``, default 2) with moebench's thread settings (GOMP_SPINCOUNT,
numba on OpenMP: moebench/run/threads.py), as in a `moebench run`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = [1, 16, 64, 256, 1024, 4096]
PARTS = ["bare softmax+topk", "numba empty", "numba empty parallel", "set_num_threads", "memcopy logits",
         "score", "select", "capacity", "build", "finish", "fused", "overhead", "route"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _timer(quick: bool):
    """time_us(fn) -> median microseconds per call over rounds of n calls (n: a round >= 200 us)."""
    budget = 0.05 if quick else 0.4
    min_rounds = 5 if quick else 25

    def time_us(fn) -> float:
        for _ in range(3):
            fn()
        start = time.perf_counter()
        probe = 0
        while probe < 10 or time.perf_counter() - start < 1e-3:
            fn()
            probe += 1
        one = (time.perf_counter() - start) / probe
        n = max(1, math.ceil(200e-6 / max(one, 1e-9)))
        samples = []
        begin = time.perf_counter()
        while len(samples) < min_rounds or (time.perf_counter() - begin < budget and len(samples) < 2000):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples.append((time.perf_counter() - t0) / n * 1e6)
        samples.sort()
        return samples[len(samples) // 2]

    return time_us


def measure(tokens: list[int], routers: list[str], threads: int, quick: bool) -> dict:
    """{"parts": {T: {part: us}}, "routes": {T: {router: us}}, "env": str} for the moebench on sys.path."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
    import numba
    import numpy as np
    import torch
    from numba import njit, prange

    import moebench
    from moebench.core import kernels
    from moebench.core.capacity import CapacitySpec, expert_capacity
    from moebench.routers import RouteContext, RouteInputs, create_router

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    time_us = _timer(quick)

    @njit(nogil=True)
    def empty(a):
        return a.size

    @njit(parallel=True, nogil=True)
    def empty_parallel(a):
        s = 0
        for i in prange(numba.get_num_threads()):
            s += a[i % a.size]
        return s

    e, k = 64, 2
    parts: dict = {}
    routes: dict = {}
    for t in tokens:
        g = torch.Generator().manual_seed(t)
        logits = torch.randn(t, e, generator=g)
        cap = expert_capacity(CapacitySpec(factor=1.25), t, e, k)
        ctx = RouteContext(top_k=k, capacity=cap, drop_policy="position", generator=torch.Generator().manual_seed(0))
        inputs = RouteInputs(logits=logits)
        router = create_router("topk")
        state = router.init_state(e, torch.device("cpu"))
        ctx = RouteContext(top_k=k, capacity=cap, drop_policy="position", generator=ctx.generator, state=state)
        arr = np.zeros(max(threads, 1), np.float32)
        row: dict = {}
        row["bare softmax+topk"] = time_us(lambda: torch.topk(torch.softmax(logits, -1), k))
        row["numba empty"] = time_us(lambda: empty(arr))
        row["numba empty parallel"] = time_us(lambda: empty_parallel(arr))
        row["set_num_threads"] = time_us(lambda: numba.set_num_threads(1))
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        row["memcopy logits"] = time_us(lambda: logits.clone())
        scores = torch.softmax(logits.float(), -1)
        row["score"] = time_us(lambda: torch.softmax(logits.float(), -1))
        expert, weight = kernels.topk_select(scores, k)
        row["select"] = time_us(lambda: kernels.topk_select(scores, k))
        if hasattr(kernels, "keep_position"):
            ekt = expert.t().contiguous()
            row["capacity"] = time_us(lambda: kernels.keep_position(ekt, cap, e))
        nocap = RouteContext(top_k=k, capacity=None, drop_policy="position", generator=ctx.generator, state=state)
        row["build"] = time_us(lambda: router.finish(expert, weight, scores, logits, nocap))
        row["finish"] = time_us(lambda: router.finish(expert, weight, scores, logits, ctx))
        row["route"] = time_us(lambda: router.route(inputs, ctx))
        row["overhead"] = row["route"] - row["score"] - row["select"] - row["finish"]
        if hasattr(kernels, "route_fused"):  # selection + Routing tensors in one call (decode sizes)
            row["fused"] = time_us(lambda: kernels.route_fused(scores, k, None, False, cap, "position"))
            if kernels.fused_route_pays(scores):
                row["overhead"] = row["route"] - row["score"] - row["fused"]
        parts[t] = row
        routes[t] = {}
        for name in routers:
            r = create_router(name)
            st = r.init_state(e, torch.device("cpu"))
            c = RouteContext(top_k=1 if name in ("switch", "base") else k,
                             capacity=expert_capacity(CapacitySpec(factor=1.25), t, e, 1 if name in ("switch", "base") else k),
                             drop_policy="position", generator=torch.Generator().manual_seed(0), state=st)
            routes[t][name] = time_us(lambda: r.route(inputs, c))
        routes[t]["bare softmax+topk"] = row["bare softmax+topk"]
    env = (f"moebench from {os.path.dirname(os.path.dirname(moebench.__file__))}; torch {torch.__version__}, "
           f"numba {numba.__version__} ({numba.threading_layer()}), threads {threads}; load average {os.getloadavg()}")
    return {"parts": parts, "routes": routes, "env": env}


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def table(results: dict[str, dict], key: str, rows: list[str], tokens: list[int]) -> str:
    """Markdown: one row per part (or router), one column per T and revision (us per call),
    and for the route a row of its ratio to the bare softmax+topk."""
    revs = list(results)
    head = ["part (us/call)"] + [f"T={t}" + (f" {r}" if len(revs) > 1 else "") for t in tokens for r in revs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio_of = "route" if key == "parts" else None
    for name in rows:
        cells = [_fmt(results[r][key][str(t)].get(name)) for t in tokens for r in revs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = [ratio_of] if ratio_of else [n for n in rows if n != "bare softmax+topk"]
    for name in names:
        cells = []
        for t in tokens:
            for r in revs:
                d = results[r][key][str(t)]
                cells.append(f"{d[name] / d['bare softmax+topk']:.2f}x" if d.get(name) else "-")
        lines.append(f"| {name} / bare | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _export(rev: str, root: str) -> str:
    """A folder holding ``rev``'s tree (WORKTREE: this checkout as it is)."""
    if rev == "WORKTREE":
        return REPO
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = os.path.join(root, sha)
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", sha, "moebench"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=_ints, default=TOKENS)
    ap.add_argument("--routers", default="topk,switch,sinkhorn,expert_choice",
                    help="comma list of routers whose whole route is timed too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rev", action="append", default=[],
                    help="git revision to measure (repeatable; WORKTREE = this checkout); default: this checkout")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON (one revision)")
    ap.add_argument("--out", help="also write the Markdown tables here")
    args = ap.parse_args(argv)
    routers = [r for r in args.routers.split(",") if r]
    if args.json or not args.rev:
        res = json.loads(json.dumps(measure(args.tokens, routers, args.threads, args.quick)))
        if args.json:
            print(json.dumps(res))
            return 0
        results = {"": res}
    else:
        results = {}
        with tempfile.TemporaryDirectory(prefix="moebench-floor-") as root:
            for rev in args.rev:
                src = _export(rev, root)
                cmd = [sys.executable, os.path.abspath(__file__), "--json", "--threads", str(args.threads),
                       "--tokens", ",".join(map(str, args.tokens)), "--routers", ",".join(routers)]
                if args.quick:
                    cmd.append("--quick")
                env = dict(os.environ, PYTHONPATH=src)
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=src).stdout
                results[rev] = json.loads(out.strip().splitlines()[-1])
    text = "\n".join([f"- {r or 'this checkout'}: {results[r]['env']}" for r in results] + [
        "", "Parts of one `topk` route (E=64, k=2, fp32, cf=1.25, position):", "",
        table(results, "parts", PARTS, args.tokens), "",
        "Whole route per router (us/call):", "",
        table(results, "routes", ["bare softmax+topk"] + routers, args.tokens), ""])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does one call's time hold still? Thread-pool settings against back-to-back call times.

torch's CPU ops run on an OpenMP (libgomp) pool whose threads spin-wait after each parallel
region; moebench's numba kernels run on numba's own pool. While one pool's threads spin, the
other's wait for a core, so a call that alternates between them (the numba route: torch softmax,
numba top-k, torch again) is slow and bimodal. Each candidate fix is an environment setting that
must be in place before torch (libgomp) and numba initialise, so every setting runs in a fresh
process of its own:

    default        nothing set (numba on its workqueue layer, libgomp's default spin)
    omp_passive    OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning
    gomp_spin0     GOMP_SPINCOUNT=0: libgomp's own knob for the same
    numba_omp      NUMBA_THREADING_LAYER=omp: numba on an OpenMP pool too
    numba_omp_passive  both of the above
    gomp_spin10k   GOMP_SPINCOUNT=10000: spin briefly (~10 us), then sleep
    numba_omp_spin10k  numba on OpenMP and GOMP_SPINCOUNT=10000 (what moebench applies)
    numba_omp_spin1k, numba_omp_spin100k  the same with a shorter / longer spin
    numba_omp_passive_bind  numba_omp_passive with OMP_PROC_BIND=close, OMP_PLACES=cores
    numba_tbb      NUMBA_THREADING_LAYER=tbb (skipped where the tbb package is missing)
    numba_1thread  NUMBA_NUM_THREADS=1: numba kernels serial, torch on every core
    torch_1thread  OMP_NUM_THREADS=1: one thread for everything (not a fix: shown for scale)

For each setting and router (topk through the numba path, topk through torch, sinkhorn,
expert_choice) at T=65536, E=64, k=2, capacity factor 1.25, position: p10/p50/p90/max of
``--calls`` back-to-back calls (200 for the numba topk), the median of
torch.utils.benchmark.Timer's blocked_autorange and adaptive_autorange for the same call, and
the medians of ``--repeats`` runs of moebench's own ``measure`` (their spread: max/min - 1), with
the load average (/proc/loadavg, 1 minute) before and after each router. Run from the repo root:

    python benchmarks/bench_timing_stability.py                     # every setting, ~2-4 min idle
    python benchmarks/bench_timing_stability.py --settings default,omp_passive --json out.json --markdown out.md
    python benchmarks/bench_timing_stability.py --quick             # a smoke run (T=4096, few calls)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The variables a setting may change; each child starts with all of them removed, then its own.
THREAD_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "OMP_PROC_BIND", "OMP_PLACES")

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "omp_passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "gomp_spin0": {"GOMP_SPINCOUNT": "0"},
    "numba_omp": {"NUMBA_THREADING_LAYER": "omp"},
    "numba_omp_passive": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "PASSIVE"},
    "gomp_spin10k": {"GOMP_SPINCOUNT": "10000"},
    "numba_omp_spin10k": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "10000"},
    "numba_omp_spin1k": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "1000"},
    "numba_omp_spin100k": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "100000"},
    "numba_omp_passive_bind": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "PASSIVE",
                               "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "numba_tbb": {"NUMBA_THREADING_LAYER": "tbb"},
    "numba_1thread": {"NUMBA_NUM_THREADS": "1"},
    "torch_1thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}

# label -> (router, params); the first is the call the issue measures (200 calls)
ROUTERS: dict[str, tuple[str, dict]] = {
    "topk (numba)": ("topk", {"impl": "numba"}),
    "topk (torch)": ("topk", {"impl": "torch"}),
    "sinkhorn": ("sinkhorn", {}),
    "expert_choice": ("expert_choice", {}),
}


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def percentile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100] of sorted samples (numpy's default)."""
    pos = (len(sorted_ms) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


# ------------------------------------------------------------------------------- child side


def child(spec: dict) -> dict:
    """Measure every router in this process (its environment is the setting); a JSON-ready dict."""
    import torch
    import torch.utils.benchmark as tb

    from moebench.core import kernels
    from moebench.core.capacity import CapacitySpec, expert_capacity
    from moebench.core.case import TimingSpec
    from moebench.routers import RouteContext, RouteInputs, create_router
    from moebench.run.timing import CpuClock, measure, pinned_threads
    from moebench.core.workloads import WORKLOADS, BatchShape

    if spec["env"].get("NUMBA_THREADING_LAYER") == "tbb":
        try:
            import tbb  # noqa: F401
        except ImportError:
            return {"skipped": "numba's tbb layer needs the tbb package (pip install tbb)"}
    t, e, k = spec["tokens"], spec["experts"], spec["top_k"]
    logits = WORKLOADS.create("uniform", {}).batch(BatchShape(t, e, 16, "cpu", torch.float32), 0, 0).logits
    inputs = RouteInputs(logits)
    capacity = expert_capacity(CapacitySpec(1.25), t, e, k)
    timing = TimingSpec(warmup_rounds=3, min_rounds=5, max_rounds=200, min_time_s=spec["min_time_s"])
    out: dict = {"routers": {}}
    with pinned_threads(None) as threads:  # as a suite with timing.threads: null runs
        out["torch_threads"] = threads
        for label in spec["routers"]:
            name, params = ROUTERS[label]
            router = create_router(name, params)
            ctx = RouteContext(k, capacity, "position", torch.Generator().manual_seed(0))

            def call(router=router, ctx=ctx):
                router.route(inputs, ctx)

            load_before = loadavg()
            for _ in range(10):
                call()
            calls = spec["calls"] if label == "topk (numba)" else spec["other_calls"]
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                call()
                samples.append((time.perf_counter() - start) * 1e3)
            samples.sort()
            timer = tb.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
            blocked = timer.blocked_autorange(min_run_time=spec["timer_s"]).median * 1e3
            adaptive = timer.adaptive_autorange(threshold=0.1, max_run_time=spec["timer_s"] * 4).median * 1e3
            ours = [measure(call, timing, CpuClock()).median for _ in range(spec["repeats"])]
            out["routers"][label] = {
                "calls": calls, "p10": percentile(samples, 10), "p50": percentile(samples, 50),
                "p90": percentile(samples, 90), "max": samples[-1], "timer_blocked": blocked,
                "timer_adaptive": adaptive, "measure": ours, "load_before": load_before, "load_after": loadavg(),
            }
    if kernels.available():
        import numba

        out["numba_threading_layer"] = _numba_layer(numba)
        out["numba_threads"] = numba.get_num_threads()
    out["torch_parallel"] = torch.__config__.parallel_info().splitlines()[3].strip()
    return out


def _numba_layer(numba) -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel ran
        return None


# ------------------------------------------------------------------------------- parent side


def run_setting(name: str, spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(SETTINGS[name])
    spec = dict(spec, env=SETTINGS[name])
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"child failed (exit {done.returncode}): {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_of(results: dict) -> list[dict]:
    rows = []
    for setting, res in results.items():
        if "skipped" in res:
            rows.append({"setting": setting, "skipped": res["skipped"]})
            continue
        for label, r in res["routers"].items():
            ours = r["measure"]
            rows.append({
                "setting": setting, "router": label, "calls": r["calls"],
                "p10": r["p10"], "p50": r["p50"], "p90": r["p90"], "max": r["max"],
                "spread_p90_p10": r["p90"] / r["p10"] - 1,
                "timer_blocked": r["timer_blocked"], "timer_adaptive": r["timer_adaptive"],
                "measure": ours, "measure_spread": max(ours) / min(ours) - 1,
                "measure_vs_timer": statistics.median(ours) / r["timer_blocked"],
                "load": f"{r['load_before']:.2f}-{r['load_after']:.2f}" if r["load_before"] is not None else "n/a",
                "numba_layer": res.get("numba_threading_layer"),
            })
    return rows


def markdown(rows: list[dict], spec: dict) -> str:
    head = ("| setting | router | p10 ms | p50 ms | p90 ms | max ms | p90/p10-1 | Timer blocked | Timer adaptive | "
            "moebench measure (x%d) | spread | measure/Timer | load 1m |" % spec["repeats"])
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['setting']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        ours = ", ".join(f"{x:.2f}" for x in r["measure"])
        lines.append(
            f"| {r['setting']} | {r['router']} | {r['p10']:.2f} | {r['p50']:.2f} | {r['p90']:.2f} | {r['max']:.2f} | "
            f"{r['spread_p90_p10']:.0%} | {r['timer_blocked']:.2f} | {r['timer_adaptive']:.2f} | {ours} | "
            f"{r['measure_spread']:.1%} | {r['measure_vs_timer']:.2f} | {r['load']} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """p50 and p90/p10 of every setting relative to `default`, per router; and what moebench applies."""
    base = {r["router"]: r for r in rows if r["setting"] == "default" and "skipped" not in r}
    lines = ["", "p50 / default p50 (p90/p10 - 1):", ""]
    for r in rows:
        if "skipped" in r or r["setting"] == "default" or r["router"] not in base:
            continue
        b = base[r["router"]]
        lines.append(f"- {r['setting']:18s} {r['router']:14s} {r['p50'] / b['p50']:.2f}x "
                     f"(spread {r['spread_p90_p10']:.0%}, default {b['spread_p90_p10']:.0%})")
    lines += ["", "repeated moebench measures of one call within 5% of each other and of torch.utils.benchmark "
              "(blocked_autorange):", ""]
    for r in rows:
        if "skipped" not in r:
            ok = r["measure_spread"] <= 0.05 and abs(r["measure_vs_timer"] - 1) <= 0.05
            lines.append(f"- {r['setting']:18s} {r['router']:14s} {'yes' if ok else 'NO '} (spread "
                         f"{r['measure_spread']:.1%}, measure/Timer {r['measure_vs_timer']:.2f}, load {r['load']})")
    lines += ["", "moebench applies numba_omp_spin10k: the moebench command sets GOMP_SPINCOUNT=10000 and puts "
              "numba's omp layer first before torch and numba load (unless the user set them), and meta.json "
              "records both under environment.threads."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--min-time", type=float, default=0.2,
                   help="timing.min_time_s of each moebench measure (default 0.2, the suites' default)")
    p.add_argument("--routers", default=",".join(ROUTERS), help="comma list of: " + ", ".join(ROUTERS))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--calls", type=int, default=200, help="back-to-back calls of the numba topk")
    p.add_argument("--other-calls", type=int, default=60, help="back-to-back calls of the other routers")
    p.add_argument("--repeats", type=int, default=3, help="runs of moebench's measure per router")
    p.add_argument("--quick", action="store_true", help="T=4096, 30/10 calls: a smoke run")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--markdown", help="also write the table as Markdown here")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    settings = [s for s in args.settings.split(",") if s]
    routers = [r for r in args.routers.split(",") if r]
    bad = [s for s in settings if s not in SETTINGS] + [r for r in routers if r not in ROUTERS]
    if bad:
        p.error(f"unknown setting or router: {', '.join(bad)}")
    spec = {"tokens": 4096 if args.quick else args.tokens, "experts": args.experts, "top_k": 2,
            "calls": 30 if args.quick else args.calls, "other_calls": 10 if args.quick else args.other_calls,
            "repeats": args.repeats, "routers": routers, "timer_s": 0.2 if args.quick else 1.0,
            "min_time_s": 0.05 if args.quick else args.min_time}
    print(f"# T={spec['tokens']} E={spec['experts']} k=2 cf=1.25 position; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load before: {loadavg()}", flush=True)
    results = {}
    for i, name in enumerate(settings):  # a setting named twice runs twice (as "name#2")
        key = name if name not in results else f"{name}#{settings[:i + 1].count(name)}"
        results[key] = run_setting(name, spec)
        print(f"# {key}: done (load {loadavg()})", file=sys.stderr, flush=True)
    rows = rows_of(results)
    table = markdown(rows, spec) + summary(rows)
    print(table, end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"spec": spec, "rows": rows, "raw": results}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

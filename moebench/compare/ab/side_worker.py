"""The worker of one side of `moebench ab`: run as a script against that side's code, never
imported by the parent.

The parent starts ``python -c BOOT SIDE_PATHS THIS_FILE`` (moebench/compare/ab/protocol.py):
BOOT puts the side's tree first on sys.path (and drops the caller's working directory), then
runs this file, so every ``moebench`` import below resolves to the side's own moebench and
every plugin router to the side's own package (entry points are read from the ``.dist-info``
folders on sys.path, the first one of a distribution wins). That is also why this file
imports moebench only through `_api` by name: it must work against an older moebench, whose
modules may sit elsewhere (before commit "#19 step 1" they were flat: moebench.suite,
moebench.runner, moebench.timing, ...), and it uses only what `moebench run` uses: load_suite,
plan_cases, CaseRunner (its rows and inputs), the router registry, the capacity rule, the
workload generator, the runner's phase builders, the execution modes' ``prepare``, the clock
and thread pinning of moebench/run/timing.py and the thread settings of moebench/run/threads.py.

Protocol: JSON lines. The worker reads requests on stdin and answers each with one line on
the file descriptor the parent names (its stdout at start); the worker's own stdout is then
pointed at stderr, so a router that prints cannot corrupt the answers.

    -> {"op": "load", "suite", "quick", "device", "threads", "run_id", "suite_name"}
    <- {"ok": true, "meta": {...}, "rows": [row, ...], "cells": [{"key", "case_id", "router",
        "phase", "device", "status", "reason", "est_ms"}, ...]}
    -> {"op": "block", "cell": i, "calls": n, "warmup": w, "relayout": bool}     <- {"ok": true, "ms": [..]}
       (relayout: build the cell's phase again first, fresh buffers behind a heap spacer of random
       size, so this process's memory layout -- a bias of up to 10% on a tiny kernel, identical
       code on both sides -- varies from block to block instead of staying fixed for the run)
    -> {"op": "pin", "cores": [c, ...]}                       <- {"ok": true}
    -> {"op": "stop"}                                          (exits)
Any failure: {"ok": false, "error": "one line"}.
"""

import importlib
import json
import os
import random
import sys
import traceback
from dataclasses import replace

PHASES = ("route", "dispatch", "combine")
EST_CALLS = 3  # timed calls per phase when a cell is prepared: the parent sizes blocks from them

# name -> modules to try in order: this layout first, then the flat one before "#19 step 1"
_WHERE = {
    "load_suite": ("moebench.suite.load", "moebench.suite"),
    "plan_cases": ("moebench.run.session", "moebench.session"),
    "CaseRunner": ("moebench.run.runner", "moebench.runner"),
    "phase_builders": ("moebench.run.runner", "moebench.runner"),
    "ROUTER_STREAM": ("moebench.run.runner", "moebench.runner"),
    "expert_capacity": ("moebench.core.capacity", "moebench.capacity"),
    "generator": ("moebench.core.workloads", "moebench.workloads"),
    "ROUTERS": ("moebench.routers.registry",),
    "RouteContext": ("moebench.routers.base",),
    "prepare": ("moebench.run.exec_modes", "moebench.modes"),
    "clock_for": ("moebench.run.timing", "moebench.timing"),
    "pinned_threads": ("moebench.run.timing", "moebench.timing"),
    "settle": ("moebench.run.threads", "moebench.thread_env"),
    "capture_environment": ("moebench.run.machine", "moebench.environment"),
}


def _api(name, required=True):
    """The side's object called ``name`` (see _WHERE), or None when optional and absent."""
    failures = []
    for module in _WHERE[name]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module.startswith(exc.name):  # a module it imports is missing
                failures.append(f"{module}: {exc}")
            continue
        except ImportError as exc:
            failures.append(f"{module}: {exc}")
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    if required:
        why = f"; {'; '.join(failures)}" if failures else ""
        raise RuntimeError(f"this side's moebench has no {name} (looked in {', '.join(_WHERE[name])}){why}")
    return None


class Side:
    """What the worker holds between requests: the prepared phase calls of every cell."""

    def __init__(self):
        self.cells = []  # [(timed call, clock, rebuild)] in the order of the "cells" answer
        self.torch = None
        self.spacer = None  # relayout: a random-size allocation kept until the next one
        self.rng = random.Random()

    def load(self, req):
        settle = _api("settle", required=False)
        if settle is not None:
            settle()  # before torch loads: the side's own thread settings, as its `moebench run`
        torch = self.torch = importlib.import_module("torch")
        import moebench

        suite = _api("load_suite")(req["suite"])
        if getattr(suite, "train", None) is not None or getattr(suite, "parallel", None) is not None:
            raise RuntimeError("ab times plain cases only; this suite is a training or parallel suite")
        cases = _api("plan_cases")(suite, req.get("device"), bool(req.get("quick")))
        timing = suite.timing
        if req.get("quick"):
            quick_timing = getattr(importlib.import_module(_api("CaseRunner").__module__), "quick_timing", None)
            timing = quick_timing(timing) if quick_timing else timing
        if req.get("threads") is not None:
            timing = replace(timing, threads=int(req["threads"]))
        # entered for the worker's life: every block runs with the threads `moebench run` pins
        self._pin = _api("pinned_threads")(timing.threads if all(c.device == "cpu" for c in cases) else None)
        threads = self._pin.__enter__()
        base_row = {"run_id": req["run_id"], "suite": suite.name}
        rows, cells = [], []
        for case in cases:
            for result in self._case(case, timing, base_row, list(suite.routers)):
                rows.append(result[0])
                cells.extend(result[1])
        capture = _api("capture_environment", required=False)
        env = {}
        if capture is not None:
            try:
                env = capture(sorted({c.device for c in cases}))
            except Exception:  # noqa: BLE001 - the record is a courtesy, the timing is not
                env = {}
        meta = {
            "router_code": _router_code(suite.routers),
            "suite": suite.name, "suite_version": getattr(suite, "version", None),
            "suite_sha256": getattr(suite, "sha256", None), "description": getattr(suite, "description", ""),
            "moebench_version": getattr(moebench, "__version__", None), "moebench_path": os.path.dirname(moebench.__file__),
            "devices": sorted({c.device for c in cases}), "seeds": sorted({c.seed for c in cases}),
            "cases": len(cases), "routers": [r.display for r in suite.routers],
            "timing": {k: v for k, v in vars(timing).items()}, "threads": threads,
            "environment": env, "torch": torch.__version__, "pid": os.getpid(),
        }
        return {"ok": True, "meta": meta, "rows": rows, "cells": cells}

    def _case(self, case, timing, base_row, routers):
        """(row, cells) per router of one case: the row as `moebench run` makes it without timing
        (its deterministic metrics), and each timed phase prepared on batch 0 as the runner does."""
        torch = self.torch
        runner = _api("CaseRunner")(case, replace(timing, enabled=False), base_row)
        specs = {s.display: s for s in routers}
        for result in runner.rows(routers):
            row = dict(result.row)
            cells = []
            if row.get("status") != "ok":
                yield row, cells
                continue
            spec = specs[row["router"]]
            rebuilds = {}
            try:
                phases = self._phases(case, timing, runner, spec, rebuilds)
            except Exception as exc:  # noqa: BLE001 - a router the timing cannot build: its row says why
                phases = {p: (None, f"{type(exc).__name__}: {exc}") for p in PHASES}
            for phase, (call, reason) in phases.items():
                cell = {"key": f"{case.case_id}|{row['router']}|{phase}", "case_id": case.case_id,
                        "router": row["router"], "phase": phase, "device": case.device,
                        "status": "ok" if call else "skipped", "reason": reason, "est_ms": None, "index": None}
                if call is not None:
                    clock = _api("clock_for")(case.device)
                    cell["est_ms"] = sorted(clock.time_call(call) for _ in range(EST_CALLS))[EST_CALLS // 2]
                    cell["index"] = len(self.cells)
                    self.cells.append((call, clock, rebuilds[phase]))
                cells.append(cell)
            yield row, cells

    def _phases(self, case, timing, runner, spec, rebuilds):
        """{phase: (prepared call or None, reason)} on batch 0 with the runner's context: the
        route generator of the case seed's router stream, capacity by the case's rule.
        ``rebuilds[phase]``: a function that builds the phase's call again (fresh buffers)."""
        torch = self.torch
        router = _api("ROUTERS").create(spec.name, spec.params)
        inputs = runner.inputs()[0]
        capacity = _api("expert_capacity")(case.capacity, case.tokens, case.experts, case.top_k)
        state = router.init_state(case.experts, torch.device(case.device))
        gen, stream = _api("generator"), _api("ROUTER_STREAM")
        ctx = _api("RouteContext")(case.top_k, capacity, case.drop_policy, gen(case.device, case.seed, stream), state)
        routing = router.route(inputs, ctx)
        timed_ctx = replace(ctx, generator=gen(case.device, case.seed, stream))
        builders = _api("phase_builders")(router, inputs, timed_ctx, routing)
        out = {}
        for phase in PHASES:
            if phase not in builders:
                out[phase] = (None, "this side has no such phase")
                continue
            fn = builders[phase]()
            if type(fn).__name__ == "PhaseSkip":
                out[phase] = (None, getattr(fn, "reason", "skipped"))
                continue
            generators = (timed_ctx.generator,) if phase == "route" and timed_ctx.generator is not None else ()
            call = _api("prepare")(fn, timing.mode, case.device, generators)
            # eager only: a compiled or captured call built again would compile or capture again
            rebuilds[phase] = (lambda b=builders[phase], g=generators: _api("prepare")(b(), timing.mode, case.device, g)
                               ) if timing.mode == "eager" else None
            for _ in range(max(0, timing.warmup_rounds)):
                call()
            out[phase] = (call, None)
        return out

    def block(self, req):
        call, clock, rebuild = self.cells[req["cell"]]
        if req.get("relayout") and rebuild is not None:
            self.spacer = None
            self.spacer = self.torch.empty(self.rng.randrange(1, 1 << 16), dtype=self.torch.uint8)
            call = rebuild()
            self.cells[req["cell"]] = (call, clock, rebuild)
        for _ in range(int(req.get("warmup", 1))):
            call()
        return {"ok": True, "ms": [clock.time_call(call) for _ in range(int(req["calls"]))]}


def _router_code(routers):
    """{label: {"module", "file", "version"}}: where this side's code of each router came from."""
    registry = _api("ROUTERS")
    out = {}
    for spec in routers:
        try:
            cls = registry.get(spec.name)
        except Exception as exc:  # noqa: BLE001 - an unknown router already has its error row
            out[spec.display] = {"error": str(exc)}
            continue
        module = sys.modules.get(cls.__module__)
        out[spec.display] = {"module": cls.__module__, "file": getattr(module, "__file__", None),
                             "version": getattr(module, "__version__", None)}
    return out


def _only_this_moebench(here):
    """Drop an editable install's finder of another moebench (setuptools puts one on
    sys.meta_path): it answers for any ``moebench.x`` that the side's tree lacks, so probing
    this layout's module names in an older tree would import the installed moebench's modules
    beside the side's own (two Routing classes, "returned Routing, not a Routing")."""
    for finder in list(sys.meta_path):
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", "") or ""), "MAPPING", None)
        theirs = mapping.get("moebench") if isinstance(mapping, dict) else None
        if theirs and os.path.realpath(theirs) != os.path.realpath(here):
            sys.meta_path.remove(finder)


def _pin(cores):
    """Every thread of this process onto ``cores`` (threads made later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass
    return {"ok": True}


def _die_with_parent():
    """The kernel kills this worker when the parent dies (kill -9 included; Linux only); the
    parent alone handles Ctrl-C and SIGTERM (it stops both workers and removes the worktrees)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(out_fd):
    _die_with_parent()
    out = os.fdopen(out_fd, "w", buffering=1)
    side = Side()

    def answer(msg):
        out.write(json.dumps(msg, default=str, allow_nan=True) + "\n")
        out.flush()

    import moebench  # noqa: F401 - fails here, not mid-request, if the side is not importable

    _only_this_moebench(os.path.dirname(moebench.__file__))

    answer({"ok": True, "ready": os.getpid(), "moebench": os.path.dirname(moebench.__file__),
            "version": getattr(moebench, "__version__", None)})
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "stop":
                return
            if op == "load":
                msg = side.load(req)
            elif op == "block":
                msg = side.block(req)
            elif op == "pin":
                msg = _pin(set(req["cores"]))
            else:
                msg = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - one line to the parent, the traceback to stderr
            traceback.print_exc()
            text = " ".join(str(exc).split())[:400]
            msg = {"ok": False, "error": f"{type(exc).__name__}: {text}"}
        answer(msg)


if __name__ == "__moebench_ab_worker__":
    # the answers go to the descriptor stdout had at start; stdout itself now writes to stderr
    _out = os.dup(1)
    os.dup2(2, 1)
    main(_out)

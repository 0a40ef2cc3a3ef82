"""Measure one case: every router on one workload shape, metrics per batch, timed phases.

The runner returns data and never prints. A router that does not apply to a case, or a device
that is missing, gives a `skipped` row with its reason; a fault (out of memory, NaN logits, a
bug in a router) gives an `error` row with the message, and the run goes on.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from moebench.run.allocator import allocator_problem, cpu_allocator
from moebench.core.capacity import expert_capacity
from moebench.core.case import Case, NamedSpec, TimingSpec
from moebench.core.dispatch import combine, dispatch
from moebench.core.errors import WorkloadMismatchError
from moebench.run.memory_estimate import STREAM_CACHE_BYTES, memory_problem
from moebench.core.metrics import expert_loads, mean_over_batches, routing_metrics
from moebench.run.exec_modes import Phase, PhaseSkip, mode_problem, moebench_site, prepare, release_after_failure
from moebench.routers.base import RouteContext, RouteInputs, Router
from moebench.routers.registry import ROUTERS
from moebench.core.routing import Routing
from moebench.core.routing_check import check_routing
from moebench.core.stream_batches import Batches
from moebench.run.timing import clock_for, measure, peak_memory, pinned_threads, time_limit
from moebench.core.workloads import WORKLOADS, BatchShape, generator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Streams of the case seed (workloads use 0 and 1 + batch): router randomness starts here.
ROUTER_STREAM = 1_000_000

QUICK_TOKENS = 2048
QUICK_BATCHES = 4
QUICK_TIMING = TimingSpec(warmup_rounds=1, min_rounds=3, max_rounds=5, min_time_s=0.0)


class NonFiniteLogits(RuntimeError):
    """The workload produced NaN or infinite logits."""


@dataclass(frozen=True)
class RowResult:
    """One finished row, its per-batch metrics (streams only) and per-expert loads (batch 0)."""

    row: dict
    batches: list[dict]
    loads: dict | None = None


def quick_case(case: Case) -> Case:
    """A smaller case for smoke runs: tokens and stream length capped."""
    return replace(case, tokens=min(case.tokens, QUICK_TOKENS), batches=min(case.batches, QUICK_BATCHES))


def quick_timing(timing: TimingSpec) -> TimingSpec:
    """``timing`` with QUICK_TIMING's rounds (every other setting, new ones included, kept)."""
    rounds = ("warmup_rounds", "min_rounds", "max_rounds", "min_time_s")
    return replace(timing, **{f: getattr(QUICK_TIMING, f) for f in rounds})


def router_declarations(specs) -> dict:
    """meta.json ``router_declarations``: per router label, what its class declares for reports
    (``baseline``, ``case_notes``; moebench/report/declarations.py reads it, never the classes)."""
    out = {}
    for spec in specs:
        cls = ROUTERS.get(spec.name)
        out[spec.display] = {"name": spec.name, "baseline": bool(getattr(cls, "baseline", False)),
                             "case_notes": dict(getattr(cls, "case_notes", {}) or {})}
    return out


def cuda_available() -> bool:
    return torch.cuda.is_available()


def phase_builders(router: Router, inputs: RouteInputs, ctx: RouteContext, routing: Routing,
                   capture: bool = False) -> dict[str, Callable[[], Phase | PhaseSkip]]:
    """{phase: builder}: each builder returns that phase's zero-argument call (see `phase_calls`),
    so each phase is built on its own and one that fails to build leaves the others.

    capture: the capturable forms of `moebench.run.capture` (timing mode cuda_graph); a phase the
    router cannot capture builds a `PhaseSkip` with the reason.
    """
    if capture:
        from moebench.run.capture import capture_builders

        return capture_builders(router, inputs, ctx, routing)

    def combine_call() -> Phase:
        dispatched = dispatch(routing, inputs.hidden)
        return lambda: combine(routing, dispatched, dispatched.rows)

    return {
        "route": lambda: (lambda: router.route(inputs, ctx)),
        "dispatch": lambda: (lambda: dispatch(routing, inputs.hidden)),
        "combine": combine_call,
    }


def phase_calls(router: Router, inputs: RouteInputs, ctx: RouteContext, routing: Routing,
                capture: bool = False) -> dict:
    """The timed phases as zero-argument calls: route (logits -> Routing), dispatch (gather
    hidden rows into expert order) and combine (weighted scatter back; experts are identity).
    capture: their capturable forms, a `PhaseSkip` for a phase that has none (`phase_builders`)."""
    return {name: build() for name, build in phase_builders(router, inputs, ctx, routing, capture).items()}


# What each phase's memcopy bound copies: the route reads logits, dispatch and combine move
# hidden states. The phase's median over the bound's is its `<phase>.x_memcopy`.
BOUND_OF_PHASE = {"route": "memcopy_logits", "dispatch": "memcopy_hidden", "combine": "memcopy_hidden"}


def memcopy_bounds(inputs: RouteInputs, timing: TimingSpec, device: str) -> dict:
    """{"memcopy_logits_ms", "memcopy_hidden_ms"}: medians of ``clone()`` of logits <dtype>[T, E]
    and hidden <dtype>[T, d], timed like the phases (same clock, threads and rounds) but
    always eager: the floor any phase that reads its input and writes a fresh tensor pays."""
    clock = clock_for(device)
    out = {}
    for name, x in (("memcopy_logits", inputs.logits), ("memcopy_hidden", inputs.hidden)):
        out[f"{name}_ms"] = measure(x.clone, timing, clock).median if x is not None else None
    return out


def _time_phases(router: Router, inputs: RouteInputs, ctx: RouteContext, routing: Routing,
                 timing: TimingSpec, device: str, bounds: dict | None = None) -> dict:
    """Median/IQR/CI, tokens/s, peak memory and x memcopy (against ``bounds``, see
    `memcopy_bounds`) of route, dispatch and combine.

    Each phase is built, prepared (compiled, captured) and measured on its own, with
    `<phase>.status` ok, skipped (cuda_graph: a phase the router cannot capture) or error, and
    `<phase>.reason` (errors also `<phase>.error_at`): a failing phase leaves the others timed.
    """
    out = dict(bounds or {})
    capture = timing.mode == "cuda_graph"
    for name, build in phase_builders(router, inputs, ctx, routing, capture).items():
        generators = (ctx.generator,) if name == "route" and ctx.generator is not None else ()
        out.update(_time_phase(name, build, inputs.logits.shape[0], timing, device, out, generators))
    return out


def _time_phase(name: str, build: Callable[[], Phase | PhaseSkip], tokens: int, timing: TimingSpec,
                device: str, bounds: dict, generators: tuple) -> dict:
    """The `<phase>.*` columns of one phase (see `_time_phases`); never raises an Exception."""
    try:
        fn = build()
        if isinstance(fn, PhaseSkip):
            return {f"{name}.status": "skipped", f"{name}.reason": fn.reason}
        timed = prepare(fn, timing.mode, device, generators)
        stats = measure(timed, timing, clock_for(device))
        out = {f"{name}.status": "ok", f"{name}.reason": None, **stats.as_row(name)}
        out[f"{name}.tokens_per_s"] = tokens / (stats.median / 1e3) if stats.median > 0 else math.nan
        bound = bounds.get(f"{BOUND_OF_PHASE[name]}_ms")
        out[f"{name}.x_memcopy"] = stats.median / bound if bound else None
        measured = device != "cpu" or timing.cpu_memory
        # a graph's replay allocates nothing: its memory is the eager call's that it recorded
        peak_of = fn if timing.mode == "cuda_graph" else timed
        out[f"{name}.peak_mem_bytes"] = peak_memory(peak_of, device) if measured else None
        return out
    except Exception as exc:  # this phase's fault; the row's other phases and metrics stay
        release_after_failure(device)
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        return {f"{name}.status": "error", f"{name}.reason": reason,
                f"{name}.error_at": moebench_site(exc) or _where(exc)}


class CaseRunner:
    """Runs the routers of a suite on one case. Batches are made as the stream reads them
    (batch 0 and a bounded cache shared by the routers); a router whose memory estimate
    exceeds what the device has gets a skipped row."""

    def __init__(self, case: Case, timing: TimingSpec, base_row: dict):
        self.case = case
        self.timing = timing
        self.base_row = {**base_row, **case.axes()}
        self._inputs: Batches | None = None
        self._bounds: dict | None = None

    def bounds(self) -> dict:
        """This case's memcopy bounds (`memcopy_bounds` of batch 0), timed once on first use,
        inside the threads pinned for the routers."""
        if self._bounds is None:
            self._bounds = memcopy_bounds(self.inputs()[0], self.timing, self.case.device)
        return self._bounds

    def inputs(self) -> Batches:
        """The stream's batches, made as they are read (moebench/core/stream_batches.py): batch 0
        and up to STREAM_CACHE_BYTES of later batches are kept for the next router."""
        if self._inputs is None:
            c = self.case
            workload = WORKLOADS.create(c.workload.name, c.workload.params)
            shape = BatchShape(c.tokens, c.experts, c.hidden, c.device, DTYPES[c.dtype])
            self._inputs = Batches(workload, shape, c.seed, c.batches, STREAM_CACHE_BYTES)
        return self._inputs

    def memory_problem(self, spec: NamedSpec) -> str | None:
        """Why ``spec`` on this case cannot fit in memory (its estimate and what the device
        has, moebench/run/memory_estimate.py), else None; checked before anything is allocated."""
        return memory_problem(self.case, spec)

    def rows(self, routers: list[NamedSpec], skip: set[str] = frozenset()) -> Iterator[RowResult]:
        """One RowResult per router not in ``skip`` (labels already measured)."""
        device_problem = self._device_problem()
        on_cpu = self.case.device == "cpu"
        threads_wanted = self.timing.threads if on_cpu else None
        allocator = self.timing.cpu_allocator if on_cpu and not device_problem else "system"
        with pinned_threads(threads_wanted) as threads, cpu_allocator(allocator):
            for spec in routers:
                if spec.display in skip:
                    continue
                row = {
                    **self.base_row,
                    "router": spec.display,
                    "router_name": spec.name,
                    "router_params": spec.params_json(),
                    "threads": threads,
                    "mode": self.timing.mode,
                    "cpu_allocator": allocator if on_cpu else None,
                    "status": "ok",
                    "reason": None,
                }
                problem = device_problem or self.memory_problem(spec)
                if problem:
                    row.update(status="skipped", reason=problem)
                    yield RowResult(row, [])
                    continue
                yield self._run_router(spec, row)

    def _device_problem(self) -> str | None:
        if self.case.device.startswith("cuda") and not cuda_available():
            return "CUDA is not available on this machine"
        if not self.timing.enabled:
            return None
        problem = mode_problem(self.timing.mode, self.case.device)
        if problem is None and self.case.device == "cpu":
            problem = allocator_problem(self.timing.cpu_allocator)
        return problem

    def _run_router(self, spec: NamedSpec, row: dict) -> RowResult:
        c = self.case
        try:
            router = ROUTERS.create(spec.name, spec.params)
            reason = router.applicable(c.top_k, c.experts)
            if reason:
                row.update(status="skipped", reason=reason)
                return RowResult(row, [])
            # without isolation, timing.timeout_s is a SIGALRM here (#23); isolated, the parent kills
            with time_limit(None if self.timing.isolate else self.timing.timeout_s):
                batches, loads = self._stream(router, row)
        except WorkloadMismatchError as exc:
            row.update(status="skipped", reason=str(exc))
            return RowResult(row, [])
        except SystemExit as exc:  # a router must not end the run (Ctrl-C still does)
            row.update(status="error", reason=exit_reason(exc), error_at=_where(exc))
            return RowResult(row, [])
        except Exception as exc:  # any fault is recorded; the run goes on
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}".strip(), error_at=_where(exc))
            release_after_failure(c.device)  # its own cleanup failing must not end the run
            return RowResult(row, [])
        return RowResult(row, batches if c.batches > 1 else [], loads)

    def _stream(self, router: Router, row: dict) -> tuple[list[dict], dict]:
        """Route every batch of the stream, carrying state; time the phases on batch 0.

        Returns the per-batch metric records and batch 0's per-expert loads.
        """
        c = self.case
        capacity = expert_capacity(c.capacity, c.tokens, c.experts, c.top_k)
        state = router.init_state(c.experts, torch.device(c.device))
        per_batch = []
        for b, inputs in enumerate(self.inputs()):
            if not bool(torch.isfinite(inputs.logits).all()):
                raise NonFiniteLogits(f"batch {b}: the workload produced NaN or infinite logits")
            ctx = RouteContext(c.top_k, capacity, c.drop_policy, generator(c.device, c.seed, ROUTER_STREAM + b), state)
            # checked before metrics or any kernel reads it; the timed route calls below return
            # the same Routing for the same ctx and are discarded, so one check a batch suffices
            routing = check_routing(router.route(inputs, ctx), row["router"], finite=(inputs.logits,))
            metrics = routing_metrics(routing)
            per_batch.append(metrics)
            if b == 0:
                row["capacity"] = routing.capacity
                first_loads = [float(x) for x in expert_loads(routing).tolist()]
                if self.timing.enabled:
                    timed_ctx = replace(ctx, generator=generator(c.device, c.seed, ROUTER_STREAM))
                    row.update(_time_phases(router, inputs, timed_ctx, routing, self.timing, c.device, self.bounds()))
            router.update_state(state, routing)
        row.update(mean_over_batches(per_batch))
        key = {"run_id": row.get("run_id"), "case_id": row["case_id"], "router": row["router"]}
        return [{**key, "batch": b, **m} for b, m in enumerate(per_batch)], {**key, "batch": 0, "loads": first_loads}


def exit_reason(exc: SystemExit) -> str:
    """'exited: the router called sys.exit(3)' (the reason of an error row)."""
    return f"exited: the router called sys.exit({'' if exc.code is None else repr(exc.code)})"


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame, so an error row points at the code that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""

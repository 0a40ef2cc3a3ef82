"""The timed phases in capturable form, one builder per phase, for timing mode cuda_graph.

`capture_builders` mirrors `moebench.run.runner.phase_builders`: each value builds its phase's
zero-argument call (or a `PhaseSkip` with the reason the router cannot capture it), so a
phase that fails to build or capture never takes the others with it.
"""

from __future__ import annotations

from typing import Callable

from moebench.run.capture.dispatch import combine_static, dispatch_static
from moebench.run.capture.routes import capture_route, route_problem
from moebench.run.exec_modes import Phase, PhaseSkip
from moebench.routers.base import RouteContext, RouteInputs, Router
from moebench.core.routing import Routing


def phase_problem(router: Router, phase: str, ctx: RouteContext) -> str | None:
    """None if ``phase`` of ``router`` can be captured for ``ctx``, else why not."""
    if phase == "route":
        return route_problem(router, ctx)
    if phase not in router.capturable_phases:
        return f"{router.name}: {router.capture_reason}"
    return None


def capture_builders(router: Router, inputs: RouteInputs, ctx: RouteContext,
                     routing: Routing) -> dict[str, Callable[[], Phase | PhaseSkip]]:
    """{phase: builder}: route (`capture_route`), dispatch (`dispatch_static` of ``routing``)
    and combine (`combine_static` of that dispatch; experts are the identity)."""

    def route() -> Phase | PhaseSkip:
        problem = phase_problem(router, "route", ctx)
        if problem:
            return PhaseSkip(problem)
        fn = capture_route(router)
        return lambda: fn(inputs, ctx)

    def dispatch() -> Phase | PhaseSkip:
        problem = phase_problem(router, "dispatch", ctx)
        return PhaseSkip(problem) if problem else (lambda: dispatch_static(routing, inputs.hidden))

    def combine() -> Phase | PhaseSkip:
        problem = phase_problem(router, "combine", ctx)
        if problem:
            return PhaseSkip(problem)
        slots = dispatch_static(routing, inputs.hidden)
        return lambda: combine_static(routing, slots, slots.rows)

    return {"route": route, "dispatch": dispatch, "combine": combine}

"""pytest plugin (entry point ``pytest11: moebench``): time moebench phases with pytest-benchmark.

The fixture ``moebench_phase`` builds the zero-argument call of one phase of one case of a
suite, exactly as `moebench run` times it (same inputs, capacity, drop policy, seeded
generator and thread pinning)::

    def test_switch_route(benchmark, moebench_phase):
        benchmark(moebench_phase("suites/quickstart.yaml", case=0, router="switch", phase="route"))

``case`` picks one case of the suite: an index into its grid (in suite order), a case_id (or a
unique part of one), or a dict of axis values that matches exactly one case (e.g.
``{"workload": "zipf", "experts": 64, "top_k": 1, "capacity_factor": None}``). ``router`` is a
label of the suite's routers, else a router registry name (built with ``params``). ``phase``
is route, dispatch or combine, in the suite's timing mode (compiled, or captured into a CUDA
graph in the capturable form of `moebench.run.capture`; a phase the router cannot capture skips
the test); on CUDA the call synchronises before it returns, so wall-clock timing covers its
kernels. ``quick=True`` applies --quick sizes. When the test also uses the
``benchmark`` fixture, the case, the router and every routing metric of the case are put in
``benchmark.extra_info`` (and so in --benchmark-json files). A router that does not apply to
the case, or a CUDA case without CUDA, skips the test.

Thread environment: `moebench run` gives its process the thread variables of
`moebench.run.threads` (an OpenMP spin count, numba on an OpenMP pool) before torch loads; they
change route times several-fold on a small machine. The plugin does the same when pytest
configures it (``pytest_configure``: before test modules, and usually torch, are imported), with
the same rule: a variable the user set wins. Where torch or numba was imported before that (a
plugin loaded earlier, ``python -c "import torch, pytest; ..."``), the variables can no longer
take effect: the first ``moebench_phase`` call then warns once, naming each variable and the
value to export. ``--moebench-thread-env=off`` leaves the environment alone (and warns likewise).

Importing this module imports only pytest: torch and moebench load when the fixture is used,
so the plugin costs nothing to test runs that do not use it (beyond the two variables).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import pytest

from moebench.core.rows import PHASES  # torch-free: the plugin stays cheap to load

_THREAD_ENV_KEY = "moebench_thread_env"  # config.stash-like attribute: what pytest_configure decided


class ThreadEnvWarning(pytest.PytestWarning):
    """The test process's thread variables differ from `moebench run`'s: times may differ."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--moebench-thread-env", choices=("set", "off"), default="set",
                     help="moebench: give the test process `moebench run`'s thread variables before torch loads "
                          "(set, default) or leave the environment alone (off)")


def _settle(config: pytest.Config, choice: str | None) -> None:
    from moebench.run.threads import settle

    setattr(config, _THREAD_ENV_KEY, settle() if choice != "off" else None)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args) -> None:
    """Settle the thread variables as the `moebench` command does, before the first conftest.py
    (which may import torch) and the test modules load (pytest calls this for installed and
    ``-p`` plugins only)."""
    _settle(early_config, getattr(early_config.known_args_namespace, "moebench_thread_env", "set"))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, _THREAD_ENV_KEY):  # registered too late for the hook above
        _settle(config, config.getoption("moebench_thread_env", "set"))


def thread_env_problem(origins: dict | None) -> str | None:
    """Why this process's thread variables differ from `moebench run`'s, or None where they match
    (set by moebench, or by the user, whose choice `moebench run` keeps too). ``origins``: what
    `moebench.run.threads.settle` decided at start-up (None: it was not called)."""
    from moebench.run.threads import SETTINGS

    set_by = origins if origins is not None else {var: None for var in SETTINGS}
    missing = [var for var in SETTINGS if set_by.get(var) not in ("moebench", "user")]
    if not missing:
        return None
    why = ("--moebench-thread-env=off" if origins is None else
           "torch or numba was imported before moebench's pytest plugin was configured")
    values = " ".join(f"{var}='{SETTINGS[var][0]}'" for var in missing)
    return (f"moebench_phase: {', '.join(missing)} not set as `moebench run` sets them ({why}); times may differ "
            f"from `moebench run`'s (several-fold on a small machine). Export them before pytest starts: {values}")


def _select_case(suite, cases: list, case: int | str | dict):
    """The one case ``case`` names (see the module docstring); pytest.fail otherwise."""
    if isinstance(case, bool):
        pytest.fail(f"moebench_phase: case must be an index, a case_id or a dict, got {case!r}", pytrace=False)
    if isinstance(case, int):
        if not -len(cases) <= case < len(cases):
            pytest.fail(f"moebench_phase: case {case} out of range: {suite.path} has {len(cases)} cases", pytrace=False)
        return cases[case]
    if isinstance(case, str):
        found = [c for c in cases if c.case_id == case] or [c for c in cases if case in c.case_id]
    elif isinstance(case, dict):
        found = [c for c in cases if all(c.axes().get(k) == v for k, v in case.items())]
    else:
        found = []
    if len(found) != 1:
        pytest.fail(f"moebench_phase: case {case!r} matches {len(found)} cases of {suite.path}; "
                    "it must match exactly one", pytrace=False)
    return found[0]


class PhaseFactory:
    """What the ``moebench_phase`` fixture returns: call it to get a phase's callable."""

    def __init__(self, request: pytest.FixtureRequest, stack: contextlib.ExitStack, cache: dict):
        self._request = request
        self._stack = stack
        self._cache = cache

    def _suite(self, path: str | Path):
        from moebench.suite.load import load_suite

        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = Path(self._request.config.rootpath) / p
        key = ("suite", str(p.resolve()))
        if key not in self._cache:
            self._cache[key] = load_suite(p)
        return self._cache[key]

    def __call__(self, suite: str | Path, case: int | str | dict = 0, router: str = "switch",
                 phase: str = "route", quick: bool = False, params: dict | None = None) -> Callable[[], Any]:
        from dataclasses import replace

        from moebench.core.capacity import expert_capacity
        from moebench.core.errors import MoebenchError
        from moebench.core.metrics import routing_metrics
        from moebench.run.exec_modes import PhaseSkip, mode_problem, prepare
        from moebench.routers.base import RouteContext
        from moebench.routers.registry import ROUTERS
        from moebench.run.runner import ROUTER_STREAM, CaseRunner, cuda_available, phase_calls, quick_case, quick_timing
        from moebench.core.workloads import generator

        if phase not in PHASES:
            pytest.fail(f"moebench_phase: phase {phase!r}: expected one of {', '.join(PHASES)}", pytrace=False)
        try:
            s = self._suite(suite)
            cases = [quick_case(c) if quick else c for c in s.cases]
            c = _select_case(s, cases, case)
            spec = next((r for r in s.routers if r.display == router), None) or \
                next((r for r in s.routers if r.name == router), None)
            name = spec.name if spec else router
            options = params if params is not None else (spec.params if spec else {})
            r = ROUTERS.create(name, options)
        except MoebenchError as exc:
            pytest.fail(f"moebench_phase: {exc}", pytrace=False)
        if c.device.startswith("cuda") and not cuda_available():
            pytest.skip(f"{c.case_id}: CUDA is not available on this machine")
        reason = r.applicable(c.top_k, c.experts)
        if reason:
            pytest.skip(f"{c.case_id}: {reason}")
        timing = quick_timing(s.timing) if quick else s.timing
        problem = mode_problem(timing.mode, c.device)
        if problem:
            pytest.skip(f"{c.case_id}: {problem}")
        if c.device == "cpu" and not self._cache.get("thread_env_checked"):
            self._cache["thread_env_checked"] = True  # once per session
            problem = thread_env_problem(getattr(self._request.config, _THREAD_ENV_KEY, None))
            if problem:
                import warnings

                warnings.warn(ThreadEnvWarning(problem), stacklevel=2)
        if c.device == "cpu":
            from moebench.run.timing import pinned_threads

            self._stack.enter_context(pinned_threads(timing.threads))
        key = ("inputs", str(s.path), c.case_id)
        if key not in self._cache:  # batch 0, as the runner times it
            self._cache[key] = CaseRunner(replace(c, batches=1), timing, {}).inputs()[0]
        inputs = self._cache[key]
        capacity = expert_capacity(c.capacity, c.tokens, c.experts, c.top_k)
        state = r.init_state(c.experts, inputs.logits.device)
        ctx = RouteContext(c.top_k, capacity, c.drop_policy, generator(c.device, c.seed, ROUTER_STREAM), state)
        # checked before metrics or the dispatch/combine kernels read it, as the runner does (#23)
        from moebench.core.routing_check import check_routing

        routing = check_routing(r.route(inputs, ctx), spec.display if spec else router, finite=(inputs.logits,))
        metrics = routing_metrics(routing)
        fn = phase_calls(r, inputs, ctx, routing, capture=timing.mode == "cuda_graph")[phase]
        if isinstance(fn, PhaseSkip):
            pytest.skip(f"{c.case_id}: {phase} cannot be captured: {fn.reason}")
        fn = _synchronised(prepare(fn, timing.mode, c.device, (ctx.generator,) if phase == "route" else ()), c.device)
        if "benchmark" in self._request.fixturenames:
            bench = self._request.getfixturevalue("benchmark")
            bench.extra_info.update({"case_id": c.case_id, "router": spec.display if spec else router,
                                     "phase": phase, "tokens": c.tokens, **metrics})
        fn.case, fn.metrics = c, metrics
        return fn


def _synchronised(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """A new function calling ``fn`` that, on CUDA, waits for its kernels before returning
    (pytest-benchmark times each call by the wall clock, which would otherwise stop when the
    kernels are queued). A new function also where ``fn`` is a graph's bound ``replay``, which
    takes no attributes."""
    if not device.startswith("cuda"):
        return lambda: fn()
    import torch

    dev = torch.device(device)

    def call():
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return call


@pytest.fixture(scope="session")
def _moebench_cache() -> dict:
    """Loaded suites and generated inputs, shared by the tests of one session."""
    return {}


@pytest.fixture
def moebench_phase(request: pytest.FixtureRequest, _moebench_cache: dict):
    """A factory ``moebench_phase(suite, case=0, router="switch", phase="route", quick=False,
    params=None) -> fn``: the zero-argument call of that phase (see moebench.run.pytest_plugin)."""
    with contextlib.ExitStack() as stack:
        yield PhaseFactory(request, stack, _moebench_cache)

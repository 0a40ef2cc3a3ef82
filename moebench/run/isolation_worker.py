"""The worker side of crash and hang isolation (the protocol and the parent's side are in
:mod:`moebench.run.isolation`): a ``python -c`` process that measures the cases the parent
sends and streams each router's row back, dying with its parent.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from multiprocessing.connection import Connection

from moebench.core.errors import MoebenchError
from moebench.run.isolation import CaseJob, ClassRef
from moebench.run.machine import numba_layer_in_use
from moebench.run.runner import RowResult

def worker_main(fd: int, parent_pid: int) -> None:
    """The worker process: answer ``("case", CaseJob)`` messages on the pipe ``fd`` until it
    closes or says stop."""
    _die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent's to handle (module docstring)
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    from moebench.run.runner import CaseRunner

    class ReportingRunner(CaseRunner):
        """Tells the parent which router starts, so a crash or a hang is blamed on it."""

        broken: dict[str, str]  # router name -> why its class cannot be imported here

        def _run_router(self, spec, row):
            conn.send(("start", dict(row)))
            if spec.name in self.broken:
                row.update(status="error", reason=self.broken[spec.name])
                return RowResult(row, [])
            return super()._run_router(spec, row)

    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "case":
            return
        job: CaseJob = msg[1]
        try:
            broken = _sync_classes(job)
            if "workload" in broken:
                raise MoebenchError(next(iter(broken["workload"].values())))
            runner = ReportingRunner(job.case, job.timing, job.base_row)
            runner.broken = broken.get("router", {})
            for result in runner.rows(list(job.routers), set(job.skip)):
                conn.send(("row", result))
        except BaseException as exc:  # noqa: BLE001 (reported to the parent as the case's fault)
            conn.send(("fault", f"{type(exc).__name__}: {exc}".strip()))
        conn.send(("done", numba_layer_in_use()))


def _sync_classes(job: CaseJob) -> dict[str, dict[str, str]]:
    """Make the worker's registries hold the parent's classes: import each class's module
    (which registers it) or, for a class registered by hand, set it under its name.
    Returns {kind: {name: why it cannot be had}} for classes the worker cannot import."""
    from moebench.routers.registry import ROUTERS
    from moebench.core.workloads import WORKLOADS

    for entry in job.sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    registries = {"router": ROUTERS, "workload": WORKLOADS}
    broken: dict[str, dict[str, str]] = {}
    for ref in job.classes:
        registry = registries[ref.kind]
        try:
            if _has(registry, ref):
                continue
            module = importlib.import_module(ref.module)
            if _has(registry, ref):
                continue
            obj = module
            for part in ref.qualname.split("."):
                obj = getattr(obj, part)
            # the parent registered it by hand (register() refuses a second class under a name)
            registry.replace(ref.name, obj)
        except Exception as exc:  # noqa: BLE001
            broken.setdefault(ref.kind, {})[ref.name] = (
                f"isolated worker: cannot import {ref.kind} class {ref.module}.{ref.qualname} ({type(exc).__name__}: "
                f"{exc}); define it at the top level of an importable module, or set timing.isolate: false")
    return broken


def _has(registry, ref: ClassRef) -> bool:
    cls = registry.classes().get(ref.name)
    return cls is not None and (cls.__module__, cls.__qualname__) == (ref.module, ref.qualname)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the parent dies (Linux), so a kill -9 of a run
    leaves no orphan routing on."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(1)

"""Crash and hang isolation: a case's routers run in a worker process that streams rows back.

A router is arbitrary code. In the run's own process, a segfault (a plugin's out-of-range
index into a numba kernel), a hang or an ``os._exit`` would end or freeze the whole run. With
``timing.isolate`` (the default) the routers of a case run in one worker process, a fresh
``python -c`` (no forked torch/OpenMP/CUDA state, and unlike multiprocessing's 'spawn' no
re-import of the caller's __main__, so a script without a ``__main__`` guard works), reused
across cases and runs of this process; only a crash or a timeout costs a restart, as in asv
and pytest-xdist. The parent still writes every row (the session's RunDir); the worker only
measures. This module is the parent's side; :mod:`moebench.run.isolation_worker` is the worker's.

Protocol over one duplex pipe (parent -> worker: ``("case", CaseJob)`` or ``("stop",)``;
worker -> parent):
    ("ready", pid)      once, after the worker imported torch and the runner
    ("start", row)      a router begins; ``row`` is its row so far (case axes, router, threads)
    ("row", RowResult)  the router finished (ok, skipped or error)
    ("fault", reason)   the case failed outside any router
    ("done",)           the case is over
The parent times each router from its ``start``: past ``timing.timeout_s`` it kills the
worker (SIGKILL: a hung native call ignores anything gentler) and writes a `timeout` row; a
worker that dies gives a `crashed`/`exited` row. Then a fresh worker resumes the case after
that router. A ``sys.exit`` in a router is caught in the worker like any exception.

Ctrl-C (and a CI cancel's SIGTERM) goes to the whole process group; the worker ignores
SIGINT and SIGTERM so that the parent alone decides (and no router gets a bogus `crashed`
row while the run is being stopped): any exception in the parent while a case is in flight
(KeyboardInterrupt, the session's Terminated, GeneratorExit) kills the worker. A worker whose
parent dies (kill -9) is killed by the kernel (PR_SET_PDEATHSIG, Linux).

Cost (benchmarks/bench_isolation.py): one worker start per run, ~3 s of CPU (torch and
scipy imports); per case and per row, below what a busy 2-core machine lets us resolve.
A router class must be importable by the worker (top level of a module on sys.path); the
parent sends each class's module and name, so plugins and test routers registered by hand
work. Monkeypatches of the parent's modules do not reach the worker: use isolate: false.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Iterator

from moebench.core.case import Case, NamedSpec, TimingSpec
from moebench.core.errors import MoebenchError
from moebench.run.runner import RowResult
from moebench.run.threads import worker_environment

START_TIMEOUT_S = 300.0  # importing torch on a busy 2-core machine can take tens of seconds
KILL_WAIT_S = 10.0
POLL_S = 1.0  # how often a waiting parent checks that the worker still runs


@dataclass(frozen=True)
class ClassRef:
    """Where the worker finds a registered class: registry kind ('router' or 'workload'),
    registry name, and the module and qualified name of the class the parent has."""

    kind: str
    name: str
    module: str
    qualname: str


@dataclass(frozen=True)
class CaseJob:
    """One case for the worker: what `CaseRunner.rows` takes, plus what the worker must import
    (``classes``; plugins or test routers the parent registered) and the parent's sys.path."""

    case: Case
    timing: TimingSpec
    base_row: dict
    routers: tuple[NamedSpec, ...]
    skip: frozenset[str]
    classes: tuple[ClassRef, ...]
    sys_path: tuple[str, ...]


class WorkerGone(Exception):
    """The worker process ended (crash, exit or kill); ``reason`` says how."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Worker:
    """One worker process and the parent's end of its pipe (a socketpair)."""

    def __init__(self) -> None:
        self.conn, child = multiprocessing.Pipe(duplex=True)
        code = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]) + sys.path; "
                "from moebench.run.isolation_worker import worker_main; worker_main(int(sys.argv[2]), int(sys.argv[3]))")
        args = [sys.executable, "-c", code, json.dumps(sys.path), str(child.fileno()), str(os.getpid())]
        try:
            # the worker is moebench's own measuring process: it gets the settled thread environment
            # (moebench/run/threads.py, unless the user chose otherwise) even when execute() is called as a library
            self.process = subprocess.Popen(args, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                            env=worker_environment())
        finally:
            child.close()
        self.busy = False
        try:
            msg = self.receive(START_TIMEOUT_S)
        except WorkerGone as exc:
            self.kill()
            raise MoebenchError(f"isolation: the worker process did not start ({exc.reason}); "
                                "run with timing.isolate: false to see why") from None
        except BaseException:  # Ctrl-C while it starts: it must not outlive us
            self.kill()
            raise
        if msg is None or msg[0] != "ready":
            self.kill()
            raise MoebenchError(f"isolation: the worker process did not start within {START_TIMEOUT_S:g} s "
                                f"(got {msg!r}); run with timing.isolate: false")

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionError, EOFError, OSError) as exc:
            raise WorkerGone(self._gone_reason()) from exc

    def receive(self, timeout: float | None):
        """The next message, None after ``timeout`` seconds without one; WorkerGone when the
        worker ended (messages it sent before dying are still delivered first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # in slices: a child the router started may hold the pipe open after the worker died
        while not self.conn.poll(0):
            if self.process.poll() is not None:
                raise WorkerGone(self._gone_reason())
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                return None
            wait([self.conn], left)
        try:
            return self.conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise WorkerGone(self._gone_reason()) from exc

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and reap it (idempotent)."""
        if self.process.poll() is None:
            self.process.kill()
        self._reap()
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to exit; kill it if it does not."""
        try:
            self.conn.send(("stop",))
            self.process.wait(2.0)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def _reap(self) -> int | None:
        try:
            return self.process.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def _gone_reason(self) -> str:
        code = self._reap()
        if code is None:
            return "the worker stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory: the kernel's OOM killer? or a kill -9)" if name == "SIGKILL" else ""
            return f"crashed: the worker died with signal {name}{hint}"
        return f"exited: the worker exited with code {code} (os._exit or a fatal error)"


class WorkerPool:
    """The one worker of this process, started on first use and reused across cases and runs.

    Process-wide on purpose: `case_rows` is called once per case, and restarting torch in a
    fresh process costs seconds each time. Killed at interpreter exit.
    """

    def __init__(self) -> None:
        self._worker: Worker | None = None
        self.starts = 0  # workers started so far (the benchmark and tests read it)
        self.numba_layer: str | None = None  # the threading layer numba's kernels ran on in a worker

    def get(self) -> Worker:
        w = self._worker
        if w is None or w.busy or not w.alive():  # busy: a case was abandoned mid-way
            self.discard()
            self._worker = w = Worker()
            self.starts += 1
        return w

    def discard(self) -> None:
        """Kill the current worker (if any); the next `get` starts a fresh one."""
        w, self._worker = self._worker, None
        if w is not None:
            w.kill()

    def shutdown(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.stop()


WORKERS = WorkerPool()
atexit.register(WORKERS.shutdown)


def worker_numba_layer() -> str | None:
    """The threading layer numba's parallel kernels ran on in this process's isolated worker;
    None where no worker ran one (the run's meta.json records it)."""
    return WORKERS.numba_layer


def isolated_rows(case: Case, timing: TimingSpec, base_row: dict, routers: list[NamedSpec],
                  skip: set[str] = frozenset()) -> Iterator[RowResult]:
    """What ``CaseRunner(case, timing, base_row).rows(routers, skip)`` yields, measured in the
    worker; a router that crashes the worker, exits it or runs past ``timing.timeout_s`` gets
    an error row with the reason, and the case goes on with the next router."""
    done = set(skip)
    job_base = dict(classes=tuple(class_refs(routers, case)), sys_path=tuple(sys.path))
    resent = False
    while any(spec.display not in done for spec in routers):
        worker = WORKERS.get()
        job = CaseJob(case, timing, base_row, tuple(routers), frozenset(done), **job_base)
        current: dict | None = None
        started = time.monotonic()
        worker.busy = True
        try:
            try:
                worker.send(("case", job))
            except WorkerGone:
                if resent:
                    raise
                # it died idle (between cases, e.g. the OOM killer): not this case's fault, once
                WORKERS.discard()
                resent = True
                continue
            while True:
                limit = timing.timeout_s
                left = None if limit is None else max(0.0, started + limit - time.monotonic())
                msg = worker.receive(left)
                if msg is None:  # no message for timeout_s: a router (or the case set-up) hangs
                    WORKERS.discard()
                    reason = f"timeout: exceeded timing.timeout_s={limit:g} s"
                    yield from _lost(current, reason, case, base_row, routers, done)
                    break
                kind = msg[0]
                if kind == "start":
                    current, started = msg[1], time.monotonic()
                elif kind == "row":
                    done.add(msg[1].row["router"])
                    current, started = None, time.monotonic()
                    yield msg[1]
                elif kind == "fault":
                    for spec in routers:
                        if spec.display not in done:
                            done.add(spec.display)
                            yield RowResult(_bare_row(case, base_row, spec, f"isolated worker: {msg[1]}"), [])
                elif kind == "done":
                    worker.busy = False
                    if len(msg) > 1 and msg[1]:
                        WORKERS.numba_layer = msg[1]
                    return
        except WorkerGone as gone:
            WORKERS.discard()
            yield from _lost(current, f"{gone.reason} while routing", case, base_row, routers, done)
        except BaseException:  # Ctrl-C, SIGTERM, a consumer gone: the worker must not run on
            WORKERS.discard()
            raise


def _lost(current: dict | None, reason: str, case: Case, base_row: dict, routers: list[NamedSpec],
          done: set[str]) -> Iterator[RowResult]:
    """The error row of the router the worker was running when it was lost. Lost between
    routers (nothing was running), every router left gets the reason, so no case loops."""
    if current is not None:
        done.add(current["router"])
        yield RowResult({**current, "status": "error", "reason": reason}, [])
        return
    for spec in routers:
        if spec.display not in done:
            done.add(spec.display)
            yield RowResult(_bare_row(case, base_row, spec, f"{reason} (outside any router)"), [])


def _bare_row(case: Case, base_row: dict, spec: NamedSpec, reason: str) -> dict:
    return {**base_row, **case.axes(), "router": spec.display, "router_name": spec.name,
            "router_params": spec.params_json(), "status": "error", "reason": reason}


def class_refs(routers: list[NamedSpec], case: Case) -> list[ClassRef]:
    """Where the worker finds each router class and the workload class the parent has."""
    from moebench.routers.registry import ROUTERS
    from moebench.core.workloads import WORKLOADS

    wanted = [("router", ROUTERS, s.name) for s in routers] + [("workload", WORKLOADS, case.workload.name)]
    refs = []
    for kind, registry, name in wanted:
        cls = registry.get(name)
        refs.append(ClassRef(kind, name, cls.__module__, cls.__qualname__))
    return refs

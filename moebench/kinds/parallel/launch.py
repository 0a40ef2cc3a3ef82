"""Starting the ranks: torch.distributed's elastic launcher (what torchrun runs), or torchrun itself.

- Plain ``moebench run``: `launch` starts N local worker processes through
  ``torch.distributed.launcher.api.elastic_launch`` (standalone c10d rendezvous on localhost,
  no restarts) and returns rank 0's result. A rank that dies makes the launcher stop the
  others and raise; `launch` turns that into one `LaunchFailure` line naming the rank.
- ``torchrun --nproc-per-node N -m moebench run suite.yaml``: every process runs the CLI.
  Rank 0 runs the session as usual, and for each parallel case broadcasts the job
  (`lead`); the other ranks only `follow`: receive a job, run their share, until rank 0
  broadcasts the end.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import torch.distributed as dist

from moebench.core.errors import MoebenchError, Terminated
from moebench.kinds.parallel.engine import EngineJob, RankFailure, backend_for, ensure_group, run_job
from moebench.run.shards import torchrun_world, under_torchrun


class LaunchFailure(MoebenchError):
    """A launched rank failed (exited, was killed, or reported a failed collective)."""


def torchrun_rank() -> int | None:
    found = torchrun_world()  # torchrun's variables checked (one line per mistake)
    return None if found is None else found[0]


@contextmanager
def _quiet_launcher():
    """The elastic agent logs every start and stop; keep only its errors. Its module loggers
    carry levels of their own ("Received 15 death signal, shutting down workers" is a warning of
    `...elastic.agent.server.api`), so each existing one is set, not only the parents."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher")
    names = set(prefixes) | {n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)}
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends ``sig`` to this process when its parent ends (prctl
    PR_SET_PDEATHSIG), so a kill -9 of moebench takes the fork server and the ranks with it
    (and then the resource tracker, whose pipe they held, sees EOF and exits). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


def _gone(pid: int) -> bool:
    """The process ``pid`` has ended (a zombie counts: kill -9'd and not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def _watch_launcher(pid: int, every_s: float = 0.5) -> None:
    """A rank's watchdog thread: end the rank once the moebench process that launched it is
    gone (the rank's own parent is the fork server; this covers platforms without prctl and
    a fork server that outlived its parent)."""
    def loop():
        while not _gone(pid):
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=loop, name="moebench-launcher-watch", daemon=True).start()


def _entry(fn, arg, launcher: int | None = None):
    """What each launched process runs: mark it as launched (so it never acts as a torchrun
    follower), die with its parent and with the moebench process that launched it, run, and
    leave the process group cleanly."""
    os.environ["MOEBENCH_LAUNCHED"] = "1"
    die_with_parent()
    if launcher is not None:
        _watch_launcher(launcher)
    _numba_lock_off_the_tracker()
    try:
        return fn(arg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _numba_lock_off_the_tracker() -> None:
    """A rank's numba takes a multiprocessing RLock the first time it starts its threading layer
    (the first parallel kernel). Its test ``"fork" in get_start_method()`` also holds for
    "forkserver", so in a fork-server rank that lock comes from the forkserver context: a named
    semaphore registered with the resource tracker that moebench shares with its ranks, and
    unregistered only at the rank's normal exit. A SIGTERM'd run stops its ranks with SIGTERM
    (torch elastic), so each rank left one behind and the tracker printed "There appear to be 2
    leaked semaphore objects to clean up at shutdown" (#23). Give numba the lock of its fork
    branch first: unlinked as soon as it is made, never registered, gone with the process
    however it ends. Per rank, as before (a lock shared across ranks could be left held by a
    killed one)."""
    if os.name != "posix":
        return
    try:
        from numba.np.ufunc import parallel as numba_parallel
    except ImportError:
        return
    if getattr(numba_parallel, "_backend_init_process_lock", False) is None:  # not started yet
        try:
            numba_parallel._backend_init_process_lock = multiprocessing.get_context("fork").RLock()
        except (ValueError, OSError):  # no fork context, or no /dev/shm: numba decides, as before
            pass


def _noop() -> None:
    pass


_forkserver_ready = False


def _await_forkserver() -> None:
    """Start the fork server and wait until it has imported its preload (torch, numba: seconds),
    by running one empty process through it, before the launcher makes the semaphores that
    travel to the ranks. A SIGTERM in that wait used to land in the launcher's first
    ``Process.start``: moebench exited and unlinked the semaphores while the fork server, still
    importing, went on to fork the rank, which then failed to unpickle them (a
    ``FileNotFoundError`` traceback from multiprocessing/synchronize.py on stderr, #23). Here
    nothing is in flight yet: the empty process carries no semaphore, and it is a daemon, so
    an exit does not wait for it. Once per process (later launches find the server running)."""
    global _forkserver_ready
    if _forkserver_ready:
        return
    warm = multiprocessing.get_context("forkserver").Process(target=_noop, name="moebench-forkserver-ready",
                                                             daemon=True)
    warm.start()  # returns once the server has forked it, i.e. after its preload
    warm.join()
    _forkserver_ready = True


def spawn(fn, arg, nprocs: int, timeout_s: float) -> dict:
    """Run ``fn(arg)`` in ``nprocs`` local processes joined by torch.distributed's environment;
    {rank: return value}. Raises LaunchFailure when a rank fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    method = _start_method()
    if method == "forkserver":  # one clean server imports torch once; each launch forks from it
        multiprocessing.get_context("forkserver").set_forkserver_preload(["moebench.kinds.parallel._preload"])
        _await_forkserver()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"moebench-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"timeout": int(max(timeout_s, 30))},
        max_restarts=0, monitor_interval=0.1, start_method=method,
    )
    try:
        with _quiet_launcher(), _own_signals():
            return elastic_launch(config, _entry)(fn, arg, os.getpid())
    except ChildFailedError as exc:
        raise LaunchFailure(_failure_text(exc, timeout_s)) from None


START_METHODS = ("forkserver", "spawn", "fork")


def _start_method() -> str:
    """MOEBENCH_START_METHOD (default forkserver), checked: "fork" copies this process, and a
    process that has run a numba kernel on its OpenMP layer cannot be forked (the child aborts
    in its first kernel)."""
    from moebench.run.machine import numba_layer_in_use

    method = os.environ.get("MOEBENCH_START_METHOD", "forkserver")
    if method not in START_METHODS:
        raise LaunchFailure(f"MOEBENCH_START_METHOD={method!r}: expected one of {', '.join(START_METHODS)}")
    if method == "fork" and numba_layer_in_use() == "omp":
        raise LaunchFailure("MOEBENCH_START_METHOD=fork: this process has run numba kernels on OpenMP, which a "
                            "forked rank cannot; use forkserver (the default) or spawn")
    return method


@contextmanager
def _own_signals():
    """The launcher installs its own SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers (which stop the
    ranks and raise SignalException) and never restores ours: put them back afterwards, and
    raise a stop by signal as the session knows it (KeyboardInterrupt, or its Terminated)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    main = threading.current_thread() is threading.main_thread()
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names if hasattr(signal, n)} if main else {}
    try:
        yield
    except SignalException as exc:
        if exc.sigval == signal.SIGTERM:
            raise Terminated(f"signal {int(exc.sigval)}") from None
        raise KeyboardInterrupt(str(exc)) from None
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)


def _failure_text(exc, timeout_s: float) -> str:
    parts = []
    for rank, failure in sorted(exc.failures.items()):
        detail = failure.message if isinstance(failure.message, str) else ""
        if isinstance(failure.message, dict):
            detail = str(failure.message.get("message", ""))
        detail = " ".join(detail.split())[:300]
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        if "To enable traceback" in detail or "<N/A>" in detail:  # elastic's placeholder: no message
            detail = ""
        parts.append(f"rank {rank} {how}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts) or f"a rank failed (timeout {timeout_s:g} s)"


def launch(job: EngineJob) -> list[dict]:
    """Run the job on parallel.ep local ranks (spawned, or this torchrun world) and return rank
    0's records."""
    if under_torchrun():
        return lead(job)
    return spawn(run_job, job, job.spec.world_size, job.spec.timeout_s)[0]


# ----------------------------------------------------------------------------- torchrun

def lead(job: EngineJob) -> list[dict]:
    """Rank 0 under torchrun: hand the job to every rank, then run rank 0's share."""
    try:
        ensure_group(backend_for(job.spec, job.case.device), job.spec.timeout_s)
        dist.broadcast_object_list([job], src=0)
    except RuntimeError as exc:
        raise RankFailure(f"rank 0: could not reach the other ranks ({str(exc).splitlines()[0][:200]})") from None
    return run_job(job)


def release_followers() -> None:
    """Rank 0 under torchrun, at the end of the run: tell the followers to stop."""
    if under_torchrun() and dist.is_initialized():
        dist.broadcast_object_list([None], src=0)
        dist.destroy_process_group()


def follow_if_torchrun(suite) -> int | None:
    """The CLI's hook: on a torchrun rank other than 0, follow rank 0 and return the exit code;
    None on rank 0 or outside torchrun (the run goes on as usual)."""
    found = torchrun_world()
    if found is None:
        return None
    rank, world = found
    spec = suite.parallel
    if spec.mode == "engine" and world != spec.world_size:  # every rank says so, before any group
        raise MoebenchError(f"{suite.path}: parallel.ep is {spec.world_size} but torchrun started WORLD_SIZE={world} "
                            f"processes; use torchrun --nproc-per-node {spec.world_size}")
    if rank == 0:
        return None
    if suite.parallel.mode == "model":  # the cost model runs on rank 0 alone
        return 0
    device = suite.cases[0].device if suite.cases else "cpu"
    try:
        return follow(backend_for(suite.parallel, device), suite.parallel.timeout_s)
    except RuntimeError as exc:
        raise RankFailure(f"rank {rank}: lost rank 0 ({str(exc).splitlines()[0][:200]})") from None


def follow(backend: str = "gloo", timeout_s: float = 600.0) -> int:
    """A torchrun rank other than 0: run each job rank 0 broadcasts until it broadcasts None."""
    ensure_group(backend, timeout_s)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            dist.destroy_process_group()
            return 0
        run_job(box[0])

"""The parent's end of a side's worker: start it against the side's sys.path, send JSON-line
requests, read the answers (see side_worker.py for the protocol).

Why not moebench/run/isolation.py's worker: its jobs are pickled objects of the parent's own
moebench (Case, TimingSpec), which an older side cannot unpickle, and its worker is the
parent's code. Here the request is plain JSON and the worker's code runs against the side's
moebench; what it keeps from isolation is the process discipline: a fresh ``python -c`` (no
forked torch/OpenMP state), killed with the parent (PR_SET_PDEATHSIG), SIGKILL when it does
not answer, and the side's own thread settings applied before torch loads.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

from moebench.core.errors import MoebenchError

WORKER_FILE = Path(__file__).with_name("side_worker.py")
LOAD_TIMEOUT_S = 1800.0  # routing every case and compiling numba kernels in a fresh worktree
BLOCK_TIMEOUT_S = 300.0
# put the side's tree first, drop the caller's working directory, run the worker file
BOOT = ("import json, os, runpy, sys; paths = json.loads(sys.argv[1]); "
        "sys.path[:] = paths + [p for p in sys.path if p not in ('', os.getcwd()) and p not in paths]; "
        "runpy.run_path(sys.argv[2], run_name='__moebench_ab_worker__')")


class SideWorker:
    """One side's worker process. ``info``: its hello (pid, where its moebench comes from)."""

    def __init__(self, label: str, python: str, paths: list[str], cwd: Path | None, env: dict | None = None):
        self.label = label
        self.log = tempfile.TemporaryFile(mode="w+b")  # its stderr, shown when it fails
        args = [python, "-c", BOOT, json.dumps(paths), str(WORKER_FILE)]
        try:
            self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                            cwd=str(cwd) if cwd else None, env=env, text=True, bufsize=1)
        except OSError as exc:
            raise MoebenchError(f"ab: side {label}: cannot start {python}: {exc.strerror or exc}") from None
        try:
            self.info = self.receive(LOAD_TIMEOUT_S, "start")
        except BaseException:  # Ctrl-C or SIGTERM while it starts: it must not outlive us
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, msg: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(msg) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise MoebenchError(f"ab: side {self.label}: the worker is gone{self._tail()}") from None

    def receive(self, timeout: float, what: str) -> dict:
        """The next answer; MoebenchError if the worker dies, fails or is silent for ``timeout``."""
        out = self.process.stdout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise MoebenchError(f"ab: side {self.label}: no answer to {what} within {timeout:g} s{self._tail()}")
            ready, _, _ = select.select([out], [], [], min(left, 1.0))
            if ready:
                line = out.readline()
                break
            if self.process.poll() is not None:
                line = out.readline()
                break
        if not line:
            code = self.process.wait()
            raise MoebenchError(f"ab: side {self.label}: the worker ended (exit code {code}) during {what}{self._tail()}")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise MoebenchError(f"ab: side {self.label}: {what} failed: {msg.get('error')}{self._tail(3)}")
        return msg

    def request(self, msg: dict, timeout: float = BLOCK_TIMEOUT_S) -> dict:
        self.send(msg)
        return self.receive(timeout, str(msg.get("op")))

    def _tail(self, lines: int = 6) -> str:
        try:
            self.log.seek(0)
            text = self.log.read().decode("utf-8", "replace").strip().splitlines()[-lines:]
        except (OSError, ValueError):
            return ""
        return ("; its stderr ends: " + " | ".join(t.strip() for t in text if t.strip())) if text else ""

    def stop(self) -> None:
        """Ask it to exit, kill it if it does not (idempotent)."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(5.0)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(10.0)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        try:
            self.log.close()
        except OSError:
            pass


def send_both(workers: list[SideWorker], msg: dict, timeout: float, what: str) -> list[dict]:
    """The same request to every worker at once (they work in parallel), then every answer."""
    for w in workers:
        w.send(msg if not callable(msg) else msg(w))
    return [w.receive(timeout, what) for w in workers]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: this process's (the CLI settled moebench's thread variables
    in it; the side's worker settles its own again before torch loads) plus ``extra``."""
    env = dict(os.environ)
    env.update(extra or {})
    return env

"""One writer per run folder, and telling a dead run from a live one.

:class:`RunLock` holds ``fcntl.flock(LOCK_EX)`` on ``<run>/run.lock`` for the whole of a run or a
``--resume``; the kernel drops it when the process ends, however it ends (kill -9 included), so
a stale lock cannot outlive its writer. A second writer is refused at once (``LOCK_NB``) with
the holder's pid and host, which the holder writes into the lock file. Readers (`report`,
`compare`, `export`) never touch the lock.

:func:`process_identity` is what meta.json records about the writing process (pid, host, boot
id, the process's start time); :func:`process_state` says from that record whether the writer
is still alive: ``"alive"``, ``"gone"`` (same host, and no such process, or a different one
under a reused pid, or the host rebooted since) or ``"unknown"`` (another host).

flock works on local file systems and on NFS (Linux emulates it with POSIX locks there); on a
file system without locks the lock is refused loudly rather than ignored.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from moebench.core.errors import MoebenchError

LOCK = "run.lock"

try:  # POSIX only; elsewhere runs are unlocked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _boot_id() -> str | None:
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc/<pid>/stat (fields 3
    and 22); None where there is no /proc (not Linux) or no such process."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_identity() -> dict:
    """{pid, host, boot_id, start_ticks} of this process: enough to recognise it later."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": _start_ticks(pid)}


def process_state(ident: dict | None) -> str:
    """'alive', 'gone' or 'unknown' for a :func:`process_identity` record (None: 'unknown')."""
    if not isinstance(ident, dict) or not isinstance(ident.get("pid"), int):
        return "unknown"
    if ident.get("host") != socket.gethostname():
        return "unknown"
    boot = _boot_id()
    if ident.get("boot_id") and boot and ident["boot_id"] != boot:
        return "gone"  # the machine rebooted since
    pid = ident["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is not None:
        state, ticks = stat
        if state in ("Z", "X"):
            return "gone"  # ended, not yet reaped by its parent
        if isinstance(ident.get("start_ticks"), int) and ticks != ident["start_ticks"]:
            return "gone"  # the pid was reused by another process
    return "alive"


def describe(ident: dict | None) -> str:
    if not isinstance(ident, dict):
        return "an unknown process"
    return f"pid {ident.get('pid', '?')} on host {ident.get('host', '?')}"


class RunLock:
    """An exclusive, non-blocking lock on one run folder; use as a context manager or
    :meth:`acquire` / :meth:`release`. Raises MoebenchError when another process holds it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def acquire(self, started_at: str | None = None) -> "RunLock":
        if fcntl is None or self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MoebenchError(f"{self.folder}: cannot lock the run folder ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                since = f" since {holder['started_at']}" if isinstance(holder, dict) and holder.get("started_at") else ""
                raise MoebenchError(
                    f"{self.folder}: in use by {describe(holder)}{since}; one run or --resume per folder at a time"
                ) from None
            raise MoebenchError(f"{self.folder}: cannot lock the run folder ({exc.strerror})") from None
        self._fd = fd
        record = dict(process_identity(), started_at=started_at)
        try:  # who holds it, for the refusal message of the next writer; best effort
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:
            pass
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
        data = json.loads(text)
    except (OSError, ValueError, RecursionError):  # RecursionError: a lock file of [[[[...
        return None
    return data if isinstance(data, dict) else None

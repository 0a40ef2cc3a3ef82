"""Durable result files: JSON replaced atomically, JSON lines appended whole and mended after
a kill. The policy is described in :mod:`moebench.store.runs`; reading is
:mod:`moebench.store.reader`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path

from moebench.core.errors import MoebenchError


class WriteError(MoebenchError):
    """Writing a result file failed (disk full, read-only, no permission)."""


def clean_value(value):
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_error(path: Path, exc: OSError, doing: str = "cannot write") -> WriteError:
    reason = exc.strerror or str(exc)
    return WriteError(f"{path}: {doing}: {reason}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON: the old file stays whole until the new one is."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    payload = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise write_error(path, exc) from None
    _fsync_dir(path.parent)


def append_line(path: Path, record: dict) -> None:
    """Append one record as one line; on any failure the file keeps its old length."""
    line = (json.dumps({k: clean_value(v) for k, v in record.items()}, default=str) + "\n").encode("utf-8")
    try:  # O_NONBLOCK: a FIFO in the file's place must not block the run (refused below)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise MoebenchError(f"{path}: is a FIFO, not a regular file; refusing to write to it") from None
        raise write_error(path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MoebenchError(f"{path}: is not a regular file; refusing to write to it")
    try:
        size = os.fstat(fd).st_size
        try:
            write_all(fd, line)
            os.fsync(fd)
        except BaseException as exc:  # a full disk, or Ctrl-C/SIGTERM mid-write: no half line
            try:
                if os.fstat(fd).st_size != size + len(line):  # a whole line (the signal came later) stays
                    os.ftruncate(fd, size)
            except OSError:
                pass  # then the next writer's repair() cuts it
            if isinstance(exc, OSError):
                raise write_error(path, exc) from None
            raise
    finally:
        os.close(fd)


def repair_tail(path: Path) -> str | None:
    """Mend a file that does not end in a newline (a kill -9 mid-write); return what was done.

    A tail that is a whole JSON object gets its newline; any other tail is cut off (it was
    never a finished record). Call only while holding the run lock.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    size = info.st_size
    if size == 0 or not stat.S_ISREG(info.st_mode):  # a FIFO or device: the reader refuses it
        return None
    try:
        with open(path, "r+b") as fh:
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return None
            block = 1 << 16
            pos = size
            start = 0
            while pos > 0:  # find the last newline, reading backwards
                lo = max(0, pos - block)
                fh.seek(lo)
                chunk = fh.read(pos - lo)
                nl = chunk.rfind(b"\n")
                if nl != -1:
                    start = lo + nl + 1
                    break
                pos = lo
            fh.seek(start)
            tail = fh.read()
            try:
                whole = isinstance(json.loads(tail.decode("utf-8")), dict)
            except ValueError:
                whole = False
            if whole:
                fh.seek(size)
                fh.write(b"\n")
                done = f"terminated its last line ({len(tail)} bytes, a whole record without its newline)"
            else:
                fh.truncate(start)
                done = f"cut a torn last line ({len(tail)} bytes)"
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(path, exc, "cannot repair its torn last line") from None
    return f"{path}: {done}"

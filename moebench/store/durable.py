"""Durable result files: JSON replaced atomically, JSON lines appended whole, read tolerantly
and mended after a kill. The policy is described in :mod:`moebench.store.runs`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from moebench.core.errors import MoebenchError

MAX_LISTED = 5  # line numbers named in one warning

log = logging.getLogger("moebench.store.runs")


class WriteError(MoebenchError):
    """Writing a result file failed (disk full, read-only, no permission)."""


def _clean(value):
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


def _write_all(fd: int, data: bytes) -> None:
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
            _write_all(fd, payload)
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


def _append_line(path: Path, record: dict) -> None:
    """Append one record as one line; on any failure the file keeps its old length."""
    line = (json.dumps({k: _clean(v) for k, v in record.items()}, default=str) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, line)
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


# ----------------------------------------------------------------------------- reading

def _parse(text: str) -> tuple[object, bool]:
    """(value, salvaged): the line's JSON value, or the whole object after a torn record."""
    try:
        return json.loads(text), False
    except ValueError:
        value = _salvage(text)
        return value, value is not None


def _salvage(text: str):
    """The whole object at the end of a line that starts with a torn record, else None."""
    start, tries = text.find("{", 1), 0
    while start != -1 and tries < 256:  # bounded: a binary line may hold many '{'
        tries += 1
        try:
            value = json.loads(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def _lines(numbers: list[int]) -> str:
    head = ", ".join(map(str, numbers[:MAX_LISTED]))
    return head + (f" and {len(numbers) - MAX_LISTED} more" if len(numbers) > MAX_LISTED else "")


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every readable JSON object of ``path``, one per line (missing file: none).

    A torn last line, lines that are not JSON objects and objects lacking a ``required`` key
    are skipped; one warning (logger ``moebench.store.runs``) names the file and their lines.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MoebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out: list[dict] = []
    bad: list[int] = []
    salvaged: list[int] = []
    torn = None
    pieces = data.split(b"\n")
    for i, raw in enumerate(pieces):
        last = i == len(pieces) - 1  # the bytes after the final newline ('' when none)
        if not raw.strip():
            continue
        try:
            value, rescued = _parse(raw.decode("utf-8"))
        except UnicodeDecodeError:  # binary garbage
            value, rescued = None, False
        if not isinstance(value, dict) or any(not isinstance(value.get(k), str) for k in required):
            if last:
                torn = len(raw)
            else:
                bad.append(i + 1)
            continue
        if rescued:
            salvaged.append(i + 1)
        out.append(value)
    problems = []
    if torn is not None:
        problems.append(f"ignored a torn last line {len(pieces)} ({torn} bytes; killed mid-write?)")
    if bad:
        what = "not a JSON object" + (f" with {' and '.join(required)}" if required else "")
        problems.append(f"skipped {len(bad)} unreadable line(s) ({what}): {_lines(bad)}")
    if salvaged:
        problems.append(f"line(s) {_lines(salvaged)} began with a torn record; kept the whole record after it")
    if problems:
        log.warning("%s: %s", path, "; ".join(problems))
    return out


def _dedupe(records: list[dict], key: tuple[str, ...]) -> tuple[list[dict], int]:
    """The last record of each key, in the order of their last appearance; and how many went."""
    latest: dict[tuple, dict] = {}
    for rec in records:
        k = tuple(rec.get(name) for name in key)
        latest.pop(k, None)  # re-insert: order of last appearance
        latest[k] = rec
    return list(latest.values()), len(records) - len(latest)


def repair_tail(path: Path) -> str | None:
    """Mend a file that does not end in a newline (a kill -9 mid-write); return what was done.

    A tail that is a whole JSON object gets its newline; any other tail is cut off (it was
    never a finished record). Call only while holding the run lock.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
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

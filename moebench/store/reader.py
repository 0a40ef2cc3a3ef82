"""The one reader of run files: regular files only, bounded, tolerant of bad lines.

Every command that reads a run folder (report, compare, export, merge, ``--resume``) comes
through here, so a hostile or damaged folder is handled once (docs/architecture.md, Decisions):

- Only regular files are read. A FIFO, a device (``/dev/zero``), a socket or a folder in a
  file's place is refused in one line instead of blocking or streaming forever: the file is
  opened with ``O_NONBLOCK`` (an open FIFO does not wait for a writer) and checked with
  ``fstat`` before a byte is read. A symlink to a regular file is read like the file.
- Sizes are bounded: a file above its limit is refused; a JSON line above ``MAX_LINE_BYTES``
  is skipped like any other bad line (read in blocks, so such a line never sits in memory).
- A line that is not a JSON object (garbage, binary, nested too deep for the parser) is
  skipped, and each file's problems are ONE warning naming it and the line numbers.
- Rows are keyed by (case_id, router) (``core.rows.ROW_KEY``); a repeated key keeps the last
  row (a resumed run re-measured it), with one warning.

Shapes: a record is a ``dict`` of one JSON line; rows are lists of records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from moebench.core.errors import MoebenchError
from moebench.core.rows import ROW_KEY, ok_only

MAX_JSONL_BYTES = 1 << 30  # 1 GiB: ~500 000 rows; a bigger rows.jsonl is not ours
MAX_LINE_BYTES = 16 << 20  # 16 MiB: a loads record of 2^17 experts is ~1.5 MB
MAX_JSON_BYTES = 64 << 20  # meta.json and other whole-file JSON (a baseline has its own limit)
BLOCK = 1 << 20
MAX_LISTED = 5  # line numbers named in one warning
SALVAGE_TRIES = 256  # '{' positions tried in one torn line (a binary line may hold many)

log = logging.getLogger("moebench.store.runs")

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file (after symlinks); None if it
    does not exist; else one MoebenchError. Never blocks: O_NONBLOCK makes opening a FIFO
    return at once, and fstat then refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MoebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise MoebenchError(f"{path}: is {_kind(mode)}, not a regular file; refusing to read it")
    return fd


def _too_big(path: Path, size: int, limit: int) -> MoebenchError:
    return MoebenchError(f"{path}: {size} bytes; a run file may have at most {limit} (not written by moebench?)")


def read_regular(path: Path, limit: int = MAX_JSON_BYTES) -> bytes | None:
    """The bytes of the regular file ``path`` (None if missing); a file over ``limit`` bytes,
    or one that is not a regular file, is one MoebenchError."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_big(path, size, limit)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)  # bounded even if the file grows while we read
    except OSError as exc:
        raise MoebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_big(path, len(data), limit)
    return data


def _finite_or_none(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def loads_json(text: str | bytes):
    """``json.loads`` with every failure one ValueError: a nesting too deep for the parser
    (RecursionError: 1000+ ``[``) is bad JSON like any other. A number that is not finite
    (``1e999``, ``NaN``, ``Infinity``) reads as None, as moebench writes them (durable: JSON has
    no NaN/inf), so no report or comparison meets an inf it never wrote."""
    try:
        return json.loads(text, parse_float=_finite_or_none, parse_constant=lambda name: None)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


# ----------------------------------------------------------------------------- JSON lines

def _lines(path: Path, fd: int) -> Iterator[tuple[bytes | None, bool]]:
    """(line, last) per line of the open file, read in blocks: ``line`` None for a line over
    MAX_LINE_BYTES (its bytes are dropped as they come); ``last`` for the bytes after the final
    newline (a torn line, or b"" when the file ends in one)."""
    carry, oversize, total = bytearray(), False, 0
    with os.fdopen(fd, "rb", closefd=False) as fh:
        while True:
            block = fh.read(BLOCK)
            total += len(block)
            if total > MAX_JSONL_BYTES:  # grew past the limit after the size check
                raise _too_big(path, total, MAX_JSONL_BYTES)
            if not block:
                break
            start = 0
            while (nl := block.find(b"\n", start)) != -1:
                if not oversize:
                    carry += block[start:nl]
                yield (None if oversize or len(carry) > MAX_LINE_BYTES else bytes(carry)), False
                carry, oversize, start = bytearray(), False, nl + 1
            if not oversize:
                carry += block[start:]
                if len(carry) > MAX_LINE_BYTES:
                    carry, oversize = bytearray(), True
    yield (None if oversize else bytes(carry)), True


def _parse(text: str) -> tuple[object, bool]:
    """(value, salvaged): the line's JSON value, or the whole object after a torn record."""
    try:
        return loads_json(text), False
    except ValueError:
        value = _salvage(text)
        return value, value is not None


def _salvage(text: str):
    """The whole object at the end of a line that starts with a torn record, else None."""
    start, tries = text.find("{", 1), 0
    while start != -1 and tries < SALVAGE_TRIES:
        tries += 1
        try:
            value = loads_json(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def _listed(numbers: list[int]) -> str:
    head = ", ".join(map(str, numbers[:MAX_LISTED]))
    return head + (f" and {len(numbers) - MAX_LISTED} more" if len(numbers) > MAX_LISTED else "")


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every readable JSON object of ``path``, one per line (missing file: none).

    A torn last line, lines that are not JSON objects (or are over MAX_LINE_BYTES) and objects
    lacking a ``required`` string key are skipped; one warning (logger ``moebench.store.runs``)
    names the file and their lines. A file that is not regular or is over MAX_JSONL_BYTES is
    one MoebenchError.
    """
    fd = open_regular(path)
    if fd is None:
        return []
    out: list[dict] = []
    bad: list[int] = []
    long: list[int] = []
    salvaged: list[int] = []
    torn = None
    number = 0
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSONL_BYTES:
            raise _too_big(path, size, MAX_JSONL_BYTES)
        for raw, last in _lines(path, fd):
            number += 1
            if raw is None:  # over MAX_LINE_BYTES (torn or not): never a row of ours
                long.append(number)
                continue
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
                    bad.append(number)
                continue
            if rescued:
                salvaged.append(number)
            out.append(value)
    except OSError as exc:
        raise MoebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    problems = []
    if torn is not None:
        problems.append(f"ignored a torn last line {number} ({torn} bytes; killed mid-write?)")
    if bad:
        what = "not a JSON object" + (f" with {' and '.join(required)}" if required else "")
        problems.append(f"skipped {len(bad)} unreadable line(s) ({what}): {_listed(bad)}")
    if long:
        problems.append(f"skipped {len(long)} line(s) over {MAX_LINE_BYTES} bytes: {_listed(long)}")
    if salvaged:
        problems.append(f"line(s) {_listed(salvaged)} began with a torn record; kept the whole record after it")
    if problems:
        log.warning("%s: %s", path, "; ".join(problems))
    return out


# ----------------------------------------------------------------------------- rows

def last_per_key(records: Iterable[dict], key: tuple[str, ...]) -> tuple[list[dict], int]:
    """The last record of each ``key``, in the order of their last appearance; and how many
    earlier ones were dropped."""
    latest: dict[tuple, dict] = {}
    count = 0
    for rec in records:
        count += 1
        k = tuple(rec.get(name) for name in key)
        latest.pop(k, None)  # re-insert: order of last appearance
        latest[k] = rec
    return list(latest.values()), count - len(latest)


def latest_rows(rows: Iterable[dict], where: object) -> list[dict]:
    """One row per (case_id, router), the last of each (a resumed run re-measured it); one
    warning naming ``where`` (the file) when some were dropped."""
    kept, dropped = last_per_key(rows, ROW_KEY)
    if dropped:
        log.warning("%s: %d duplicate (case_id, router) row(s); kept the last of each", where, dropped)
    return kept


def read_rows(path: Path, ok: bool = False) -> list[dict]:
    """The rows of a rows.jsonl: readable lines with string ``case_id`` and ``router``, one
    per key (last kept); only the ok ones with ``ok``."""
    rows = latest_rows(read_jsonl(path, required=ROW_KEY), path)
    return ok_only(rows) if ok else rows


def sorted_ok(rows: Iterable[dict]) -> list[dict]:
    """The ok rows, one per key (last kept), sorted by (case_id, router): what an export holds."""
    kept, _ = last_per_key(rows, ROW_KEY)
    return sorted(ok_only(kept), key=lambda r: (str(r.get("case_id")), str(r.get("router"))))

"""The one reader of run files (moebench/store/reader.py): last row per key, the ok filter, and
hostile run folders (issue #23 items 6 and 8): FIFOs, /dev/zero, huge files and lines, and
lines nested too deep for the JSON parser, in report, compare, export and merge.

The commands run in a child process with a memory limit and a timeout, so that a reader that
blocks on a FIFO or streams /dev/zero fails the test instead of hanging or exhausting the
machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from moebench.core.errors import MoebenchError
from moebench.core.rows import is_ok, ok_only
from moebench.store import reader
from moebench.store.runs import RunDir, load_run, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
NESTED = b"[" * 5000 + b"\n"  # deeper than the parser's recursion limit
NESTED_IN_A_ROW = b'{"case_id": "c9", "router": "r", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"


def _row(case: str, router: str, status: str = "ok", **extra) -> dict:
    return {"case_id": case, "router": router, "status": status, **extra}


def _write(path: Path, records: list) -> None:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records))


# ----------------------------------------------------------------------------- rows and keys

def test_last_row_per_key_in_order_of_last_appearance(tmp_path, caplog):
    rows = [_row("a", "x", v=1), _row("b", "x", v=2), _row("a", "y", v=3), _row("a", "x", v=4),
            _row("b", "x", "error", v=5)]
    kept, dropped = reader.last_per_key(rows, ("case_id", "router"))
    assert [(r["case_id"], r["router"], r["v"]) for r in kept] == [("a", "y", 3), ("a", "x", 4), ("b", "x", 5)]
    assert dropped == 2
    path = tmp_path / "rows.jsonl"
    _write(path, rows)
    with caplog.at_level(logging.WARNING, "moebench"):
        assert [r["v"] for r in reader.read_rows(path)] == [3, 4, 5]
        assert [r["v"] for r in reader.read_rows(path, ok=True)] == [3, 4]
    assert f"{path}: 2 duplicate (case_id, router) row(s); kept the last of each" in caplog.text
    # an export: the ok rows, last of each key, sorted by (case_id, router)
    assert [r["v"] for r in reader.sorted_ok(rows)] == [4, 3]


def test_ok_filter_on_rows_and_frames():
    rows = [_row("a", "x"), _row("a", "y", "skipped"), {"case_id": "b", "router": "x"}, _row("c", "x", "error")]
    assert ok_only(rows) == [rows[0]]
    assert [is_ok(r) for r in rows] == [True, False, False, False] and not is_ok("ok")
    frame = pd.DataFrame(rows)
    assert list(ok_only(frame)["case_id"]) == ["a"]
    bare = frame.drop(columns="status")  # a table without statuses holds measurements only
    assert ok_only(bare) is bare


# ----------------------------------------------------------------------------- lines

def test_a_deeply_nested_line_is_skipped_like_garbage(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    _write(path, [_row("a", "x"), NESTED, _row("b", "x"), NESTED_IN_A_ROW, _row("c", "x")])
    with caplog.at_level(logging.WARNING, "moebench"):
        rows = read_jsonl(path, required=("case_id", "router"))
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    assert "skipped 2 unreadable line(s) (not a JSON object with case_id and router): 2, 4" in caplog.text
    with pytest.raises(ValueError):
        reader.loads_json(NESTED)


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 20])
def test_lines_read_in_blocks_equal_the_lines_of_the_file(tmp_path, monkeypatch, block):
    # a line split across any block boundary is read whole; a torn last line is not a row
    records = [_row(f"c{i}", "r" * (i % 5 + 1), v=i) for i in range(40)]
    path = tmp_path / "rows.jsonl"
    _write(path, records)
    with open(path, "ab") as fh:
        fh.write(b'{"case_id": "torn", "rou')
    monkeypatch.setattr(reader, "BLOCK", block)
    assert read_jsonl(path, required=("case_id", "router")) == records


def test_a_line_over_the_limit_is_skipped_and_never_held(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 200)
    monkeypatch.setattr(reader, "BLOCK", 64)
    long = _row("long", "x", pad="y" * 500)
    path = tmp_path / "rows.jsonl"
    _write(path, [_row("a", "x"), long, _row("b", "x"), long])  # the long one also last
    with caplog.at_level(logging.WARNING, "moebench"):
        rows = read_jsonl(path, required=("case_id", "router"))
    assert [r["case_id"] for r in rows] == ["a", "b"]
    assert "skipped 2 line(s) over 200 bytes: 2, 4" in caplog.text


def test_a_file_over_the_limit_is_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    _write(path, [_row(f"c{i}", "x") for i in range(10)])
    monkeypatch.setattr(reader, "MAX_JSONL_BYTES", 100)
    with pytest.raises(MoebenchError) as err:
        read_jsonl(path)
    assert str(err.value) == f"{path}: {path.stat().st_size} bytes; a run file may have at most 100 (not written by moebench?)"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"pad": "x" * 200}))
    assert reader.read_regular(meta, 1000) is not None
    with pytest.raises(MoebenchError, match="meta.json: 21[0-9] bytes; a run file may have at most 100"):
        reader.read_regular(meta, 100)


# ----------------------------------------------------------------------------- special files

def _in_thread(fn, timeout: float = 20.0):
    """fn() in a daemon thread: (finished, its result or exception). A reader that blocks on a
    FIFO does not finish; the test fails instead of hanging."""
    box: dict = {}

    def go():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["value"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("value")


def _unblock(fifo: Path) -> None:
    """Give a reader stuck in open() on ``fifo`` its end of file (old code only)."""
    for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
        try:
            os.close(os.open(fifo, flags))
        except OSError:
            pass


@pytest.mark.parametrize("name", ["rows.jsonl", "meta.json"])
def test_a_fifo_in_a_run_folder_is_refused_at_once(tmp_path, name):
    run = RunDir(tmp_path / "run")
    run.create({"run_id": "r", "suite": "s", "status": "complete"}, "name: s\n")
    (run.path / name).unlink(missing_ok=True)
    os.mkfifo(run.path / name)
    try:
        done, value = _in_thread(lambda: RunDir(run.path).meta() if name == "meta.json" else run.rows())
        assert done, f"reading a FIFO {name} blocked"
        assert isinstance(value, MoebenchError)
        assert str(value) == f"{run.path / name}: is a FIFO, not a regular file; refusing to read it"
    finally:
        _unblock(run.path / name)


def test_appending_to_a_fifo_is_refused_not_blocked(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create({"run_id": "r"}, "")
    os.mkfifo(run.rows_path)
    try:
        done, value = _in_thread(lambda: run.append_row(_row("a", "x")))
        assert done and isinstance(value, MoebenchError) and "FIFO" in str(value)
        assert run.repair() == []  # nothing to mend in a FIFO (the reader refuses it)
    finally:
        _unblock(run.rows_path)


@contextlib.contextmanager
def _memory_cap(extra: int = 1 << 30):
    """At most ``extra`` more bytes of heap for this process (RLIMIT_DATA's soft limit) while
    inside: a reader that streams /dev/zero gets a MemoryError, not the machine's memory."""
    status = Path("/proc/self/status").read_text()
    used = int(next(ln for ln in status.splitlines() if ln.startswith("VmData:")).split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + extra if hard == resource.RLIM_INFINITY else min(hard, used + extra)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@pytest.mark.skipif(not Path("/dev/zero").exists() or not Path("/proc/self/status").exists(),
                    reason="needs /dev/zero and /proc")
def test_a_device_or_folder_in_a_file_s_place_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create({"run_id": "r"}, "")
    run.rows_path.symlink_to("/dev/zero")
    run.batches_path.mkdir()
    # each checked before a byte is read: never streams /dev/zero
    with _memory_cap(), pytest.raises(MoebenchError, match=r"rows.jsonl: is a character device, not a regular file"):
        run.rows()
    with pytest.raises(MoebenchError, match=r"batches.jsonl: is a folder, not a regular file"):
        run.batches()


# ----------------------------------------------------------------------------- the commands

CHILD = r"""
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))  # /dev/zero read whole: MemoryError, not the machine
from moebench.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def _small_run(src: Path, dest: Path, rows: int = 6) -> Path:
    """A copy of a committed run with its first ``rows`` rows (and their batches and loads)."""
    dest.mkdir(parents=True)
    for name in ("meta.json", "suite.yaml"):
        shutil.copy(src / name, dest / name)
    kept = (src / "rows.jsonl").read_bytes().splitlines(keepends=True)[:rows]
    (dest / "rows.jsonl").write_bytes(b"".join(kept))
    keys = {(json.loads(r)["case_id"], json.loads(r)["router"]) for r in kept}
    for name in ("batches.jsonl", "loads.jsonl"):
        if (src / name).exists():
            lines = [ln for ln in (src / name).read_bytes().splitlines(keepends=True)
                     if (json.loads(ln)["case_id"], json.loads(ln)["router"]) in keys]
            (dest / name).write_bytes(b"".join(lines))
    return dest


def _commands(run: Path, other: Path, tmp: Path) -> list[list[str]]:
    return [["report", str(run), "--reports", str(tmp / "reports")],
            ["compare", str(other), str(run), "--metrics", "deterministic"],
            ["export", str(run), "--out", str(tmp / "out.json")],
            ["merge", str(run), "--results", str(tmp / "merged"), "--no-report"]]


def _run_commands(argvs: list[list[str]], timeout: float = 300) -> list[tuple[int, str]]:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("a command blocked on a hostile run folder (timed out)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def committed_run() -> Path:
    runs = sorted((ROOT / "results" / "quickstart").glob("*/meta.json"))
    if not runs:
        pytest.skip("no committed quickstart run")
    return runs[-1].parent


def test_commands_refuse_fifos_and_devices_in_one_line(committed_run, tmp_path):
    other = _small_run(committed_run, tmp_path / "other")
    cases = {"fifo-rows": ("rows.jsonl", "fifo"), "zero-rows": ("rows.jsonl", "/dev/zero"),
             "fifo-meta": ("meta.json", "fifo"), "zero-meta": ("meta.json", "/dev/zero")}
    argvs, where = [], []
    for label, (name, how) in cases.items():
        run = _small_run(committed_run, tmp_path / label)
        (run / name).unlink()
        if how == "fifo":
            os.mkfifo(run / name)
        else:
            (run / name).symlink_to(how)
        for argv in _commands(run, other, tmp_path / f"out-{label}"):
            argvs.append(argv)
            where.append((label, argv[0], run / name))
    for (label, command, path), (rc, err) in zip(where, _run_commands(argvs)):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, (label, command, err)
        assert len(lines) == 1 and lines[0].startswith(f"moebench: error: {path}: is a "), (label, command, err)
        assert "regular file" in lines[0], (label, command, err)  # merge: "is a symlink; ... only regular files"


def test_commands_skip_a_deeply_nested_line(committed_run, tmp_path):
    run = _small_run(committed_run, tmp_path / "run")
    other = _small_run(committed_run, tmp_path / "other")
    lines = (run / "rows.jsonl").read_bytes().splitlines(keepends=True)
    (run / "rows.jsonl").write_bytes(b"".join(lines[:2] + [NESTED] + lines[2:]))
    for name in ("batches.jsonl", "loads.jsonl"):
        if (run / name).exists():
            with open(run / name, "ab") as fh:
                fh.write(NESTED)
    results = _run_commands(_commands(run, other, tmp_path))
    for argv, (rc, err) in zip(_commands(run, other, tmp_path), results):
        assert rc == 0, (argv[0], err)
        assert "RecursionError" not in err and "Traceback" not in err, (argv[0], err)
        assert "rows.jsonl: skipped 1 unreadable line(s)" in err, (argv[0], err)
    assert len(load_run(run).rows()) == len(lines)


def test_non_finite_numbers_read_as_none(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"case_id": "c", "router": "r", "cv": 1e999, "a": -1e999, "b": NaN, "c": Infinity, "d": 0.5}\n')
    (row,) = read_jsonl(path)
    assert row == {"case_id": "c", "router": "r", "cv": None, "a": None, "b": None, "c": None, "d": 0.5}


def test_commands_on_rows_holding_1e999_say_nothing_of_it(committed_run, tmp_path):
    # moebench never writes inf (JSON has none); a hand-edited 1e999 must not reach numpy or math
    run = _small_run(committed_run, tmp_path / "run")
    other = _small_run(committed_run, tmp_path / "other")
    text = (run / "rows.jsonl").read_text()
    for key in ("imbalance", "cv", "route.median_ms", "drop_rate"):
        text = text.replace(f'"{key}": ', f'"{key}": 1e999, "{key}_was": ', 2)
    (run / "rows.jsonl").write_text(text)
    for argv, (rc, err) in zip(_commands(run, other, tmp_path), _run_commands(_commands(run, other, tmp_path))):
        assert rc in (0, 1), (argv[0], err)
        assert "Warning" not in err and "unexpected" not in err and "Traceback" not in err, (argv[0], err)

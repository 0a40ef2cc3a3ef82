"""Fault injection on run folders: kill -9 at random moments, SIGTERM, torn and garbage lines, a
full disk (a real tmpfs when we may mount one, an injected ENOSPC always), a read-only folder,
two writers on one folder. After each, `--resume` completes with every (case_id, router) row
exactly once, its deterministic metrics equal an uninterrupted run's, and `report`/`compare`
read the run.

Runs that must be killed go in child processes forked from a forkserver that has imported
moebench once (a `python -m moebench` start costs ~4 s of imports; a fork costs ~0.1 s), so
the ~10 kills stay cheap. One SIGTERM test starts the real `python -m moebench`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from moebench.store import durable

from moebench.store import runs as results
from moebench.cli import main
from moebench.core.metrics import METRICS
from moebench.report.build import build_data
from moebench.store.runs import RunDir, effective_status, load_run, read_jsonl
from moebench.store.lock import LOCK, RunLock, process_identity, process_state

ROOT = Path(__file__).resolve().parent.parent
tqdm.get_lock()  # made here (and so in the forkserver): killed children then leak no semaphore of their own
SUITE = """
name: faults
version: 1
description: 8 cases x 3 routers, two of the cases streams
grid:
  workload: [uniform, {name: zipf, params: {s: 1.5}}]
  tokens: [64, 128]
  experts: 4
  top_k: 1
  capacity_factor: 1.0
  batches: [1, 2]
  device: cpu
routers: [switch, topk, expert_choice]
timing: {warmup_rounds: 1, min_rounds: 2, max_rounds: 3, min_time_s: 0.0, threads: 1, isolate: false}
"""
# the routers in a worker process (the default): a worker start costs ~4 s of imports, so
# only the real `python -m moebench` SIGTERM test uses it
ISOLATED = SUITE.replace("isolate: false", "isolate: true")
PAIRS = 8 * 3
SEED = int(os.environ.get("MOEBENCH_FAULT_SEED", "20261202"))
KILLS = 8


# ----------------------------------------------------------------------------- helpers

def _cli(argv: list[str], log: str, slow_writes: bool = False) -> None:
    """Child process body: the CLI with its output in ``log``; exit code = the CLI's.
    ``slow_writes``: each line goes down in two halves 0.2 s apart (a window to kill it in)."""
    if slow_writes:
        real = durable.write_all

        def halves(fd, data):
            real(fd, data[: len(data) // 2])
            time.sleep(0.2)
            real(fd, data[len(data) // 2:])

        durable.write_all = halves
    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        code = main(argv)
    sys.exit(code)


@pytest.fixture(scope="module")
def ctx():
    from multiprocessing import forkserver

    context = mp.get_context("forkserver")
    before = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    context.set_forkserver_preload(["moebench.cli", "moebench.run.session", "moebench.report.build", __name__])
    warm = context.Process(target=time.sleep, args=(0,))  # start the server (imports) now, untimed
    warm.start()
    warm.join(120)
    yield context
    stop = getattr(forkserver._forkserver, "_stop", None)  # private; present since 3.8
    if stop is not None:
        stop()  # else it outlives pytest by a while
    context.set_forkserver_preload(before)


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "faults.yaml"
    path.write_text(SUITE)
    return path


def run_argv(suite: Path, root: Path, resume: Path | None = None) -> list[str]:
    argv = ["run", str(suite), "--quick", "--no-report", "--results", str(root)]
    return argv + (["--resume", str(resume)] if resume else [])


def start(ctx, argv, log: Path, slow_writes: bool = False):
    proc = ctx.Process(target=_cli, args=(argv, str(log), slow_writes))
    proc.start()
    return proc


def runs_in(root: Path) -> list[Path]:
    folder = root / "faults"
    return sorted(p for p in folder.iterdir() if (p / "meta.json").exists()) if folder.exists() else []


def pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted((r["case_id"], r["router"]) for r in rows)


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in METRICS and METRICS[k].deterministic}


@pytest.fixture(scope="module")
def reference(ctx, suite_file, tmp_path_factory):
    """An uninterrupted run (in a child, as the faulted ones): its folder and wall time."""
    root = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    proc = start(ctx, run_argv(suite_file, root), root / "log")
    proc.join(300)
    assert proc.exitcode == 0, (root / "log").read_text()[-2000:]
    (run,) = runs_in(root)
    return run, time.monotonic() - t0


def assert_complete(run_dir: Path, reference_dir: Path, caplog=None) -> None:
    """Every pair exactly once on disk (no de-duplication needed), status complete, the files
    readable without a warning, deterministic metrics, batches and loads as the reference's."""
    run, ref = load_run(run_dir), load_run(reference_dir)
    raw = run.raw_rows()
    assert pairs(raw) == pairs(ref.rows()) and len(set(pairs(raw))) == PAIRS
    assert run.meta()["status"] == "complete" and run.status() == "complete"
    for path in (run.rows_path, run.batches_path, run.loads_path):
        assert path.read_bytes().endswith(b"\n")
        assert len(read_jsonl(path)) == len(path.read_bytes().splitlines())  # every line whole
    mine = {(r["case_id"], r["router"]): deterministic(r) for r in raw}
    assert mine == {(r["case_id"], r["router"]): deterministic(r) for r in ref.rows()}

    def strip(records):
        return sorted(json.dumps({k: v for k, v in r.items() if k != "run_id" and not k.endswith("_ms")},
                                 sort_keys=True) for r in records)

    assert strip(run.batches()) == strip(ref.batches())
    assert strip(run.loads()) == strip(ref.loads())


def compare_ok(ref: Path, run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["compare", str(ref), str(run), "--metrics", "deterministic"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err


def one_line(err: str) -> str:
    """The one error line of a failed command (warnings, on lines of their own, aside)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("moebench:") and not ln.startswith("moebench: warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- kill -9

def row_lines(root: Path) -> int:
    found = runs_in(root)
    path = found[0] / "rows.jsonl" if found else None
    return path.read_bytes().count(b"\n") if path and path.exists() else 0


def wait_rows(proc, root: Path, rows: int, deadline: float) -> None:
    while proc.is_alive() and row_lines(root) < rows and time.monotonic() < deadline:
        time.sleep(0.002)


def test_kill9_at_random_moments_then_resume_equals_uninterrupted(ctx, suite_file, reference, tmp_path, capsys):
    ref_dir, wall = reference
    rng = random.Random(SEED)
    kills, finished, partial_at = 0, [], []
    root = tmp_path / "r"
    run_dir = None
    while kills < KILLS:
        log = tmp_path / f"log{kills}"
        have = row_lines(root)
        proc = start(ctx, run_argv(suite_file, root, run_dir), log)
        # a random moment: after a random number of the rows still to come, plus up to 30 ms
        wait_rows(proc, root, have + rng.randrange(0, PAIRS - have), deadline=time.monotonic() + 10 * wall)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join(60)
        assert proc.exitcode in (0, -signal.SIGKILL), log.read_text()[-2000:]
        found = runs_in(root)
        assert len(found) <= 1
        if not found:
            continue  # killed before the folder existed: nothing to resume, start again
        run_dir = found[0]
        run = load_run(run_dir)  # readable after any kill
        run.rows(), run.batches(), run.loads()
        if proc.exitcode == 0:  # finished before the kill: check it and start a fresh chain
            finished.append(run_dir)
            # a root of its own per chain: two runs in a row can finish before their kill
            root, run_dir = tmp_path / f"r{len(finished)}", None
            continue
        # meta says 'running' (nothing wrote the end), the pid is gone: a reader says interrupted
        # ('complete' if the kill landed after the last write)
        partial_at.append(len(run.raw_rows()))
        assert run.meta()["status"] in ("running", "complete")
        assert run.status() in ("interrupted", "complete")
        RunLock(run_dir).acquire().release()  # the kernel dropped the dead writer's lock
    if run_dir is not None:
        proc = start(ctx, run_argv(suite_file, root, run_dir), tmp_path / "final")
        proc.join(300)
        assert proc.exitcode == 0, (tmp_path / "final").read_text()[-2000:]
        finished.append(run_dir)
    repairs = [n for done in finished for n in load_run(done).meta().get("repairs") or []]
    if os.environ.get("MOEBENCH_FAULT_VERBOSE"):
        with capsys.disabled():
            print(f"\nkill -9: seed {SEED}, rows on disk at each kill {partial_at}, {len(finished)} run(s), "
                  f"{len(repairs)} torn tail(s) mended")
    assert sum(0 < n < PAIRS for n in partial_at) >= KILLS // 2  # the kills did land mid-run
    for done in finished:
        assert_complete(done, ref_dir)
    compare_ok(ref_dir, finished[-1], capsys)
    assert build_data([finished[-1]]).rows["router"].count() == PAIRS


def test_kill9_in_the_middle_of_a_line_then_resume_mends_it(ctx, suite_file, reference, tmp_path):
    root = tmp_path / "r"
    proc = start(ctx, run_argv(suite_file, root), tmp_path / "log", slow_writes=True)
    deadline = time.monotonic() + 120
    while proc.is_alive() and time.monotonic() < deadline:  # a half line of the 4th row is down
        found = runs_in(root)
        data = (found[0] / "rows.jsonl").read_bytes() if found and (found[0] / "rows.jsonl").exists() else b""
        if data.count(b"\n") >= 3 and not data.endswith(b"\n"):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    (run_dir,) = runs_in(root)
    run = load_run(run_dir)
    assert not run.rows_path.read_bytes().endswith(b"\n")  # torn, for real
    assert len(run.rows()) == 3 and run.status() == "interrupted"
    assert main(run_argv(suite_file, root, run_dir)) == 0
    assert any("rows.jsonl: cut a torn last line" in n for n in run.meta()["repairs"])
    assert_complete(run_dir, reference[0])


# ----------------------------------------------------------------------------- SIGTERM

def test_sigterm_of_python_m_moebench_is_an_interrupt(reference, tmp_path, capsys):
    root = tmp_path / "r"
    suite_file = tmp_path / "faults.yaml"
    suite_file.write_text(ISOLATED)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "moebench", *run_argv(suite_file, root)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = runs_in(root)
        if found and found[0].joinpath("rows.jsonl").exists() and b"\n" in found[0].joinpath("rows.jsonl").read_bytes():
            break  # a whole row is down
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    (run_dir,) = runs_in(root)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); every finished row is on disk" in one_line(err)
    meta = load_run(run_dir).meta()
    assert meta["status"] == "interrupted" and meta["stopped_by"] == "SIGTERM" and meta["ended_at"]
    assert 0 < len(load_run(run_dir).raw_rows()) < PAIRS
    assert main(run_argv(suite_file, root, run_dir)) == 0
    assert_complete(run_dir, reference[0])
    assert load_run(run_dir).meta()["previous_status"] == "interrupted"


def test_sigterm_in_process_marks_interrupted(suite_file, tmp_path, capsys):
    """The handler itself: SIGTERM in the middle of the case loop ends the run as Ctrl-C does."""
    from moebench.run import session

    real = session.case_rows
    calls = []

    def case_rows(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(session, "case_rows", case_rows)
        code = main(run_argv(suite_file, tmp_path / "r"))
    assert code == 143 and signal.getsignal(signal.SIGTERM) is previous  # handler restored
    (run_dir,) = runs_in(tmp_path / "r")
    assert load_run(run_dir).meta()["stopped_by"] == "SIGTERM"
    assert len(load_run(run_dir).rows()) == 2 * 3  # two whole cases
    assert "terminated (SIGTERM)" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- two writers

def test_second_writer_is_refused_and_readers_are_not(ctx, suite_file, reference, tmp_path, capsys):
    root = tmp_path / "r"
    with pytest.MonkeyPatch.context() as mp_:  # a partial run: stop after two cases
        from moebench.run import session

        real, calls = session.case_rows, []

        def case_rows(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        mp_.setattr(session, "case_rows", case_rows)
        assert main(run_argv(suite_file, root)) == 130
    (run_dir,) = runs_in(root)
    capsys.readouterr()
    with RunLock(run_dir):  # this process holds it, as a live writer does
        assert main(run_argv(suite_file, root, run_dir)) == 2
        line = one_line(capsys.readouterr().err)
        assert str(run_dir) in line and f"in use by pid {os.getpid()} on host" in line
        assert len(build_data([run_dir]).rows) == 6  # readers ignore the lock
        assert main(["compare", str(reference[0]), str(run_dir), "--metrics", "deterministic"]) in (0, 1)
    # two resumes at once, for real: B starts while A holds the lock
    a = start(ctx, run_argv(suite_file, root, run_dir), tmp_path / "a")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and a.is_alive():
        holder = (run_dir / LOCK).read_text() if (run_dir / LOCK).exists() else ""
        if f'"pid": {a.pid},' in holder:
            break
        time.sleep(0.005)
    b = start(ctx, run_argv(suite_file, root, run_dir), tmp_path / "b")
    b.join(60)
    a.join(300)
    assert a.exitcode == 0, (tmp_path / "a").read_text()[-2000:]
    if b.exitcode == 2:
        assert f"in use by pid {a.pid}" in (tmp_path / "b").read_text()
    else:  # A finished before B took its turn: B found nothing left to do
        assert b.exitcode == 0
    assert_complete(run_dir, reference[0])


# ----------------------------------------------------------------------------- torn / garbage lines

@pytest.fixture
def partial(suite_file, tmp_path):
    """A run interrupted after 4 of its 8 cases (12 rows), made in this process."""
    from moebench.run import session

    real, calls = session.case_rows, []

    def case_rows(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(session, "case_rows", case_rows)
        assert main(run_argv(suite_file, tmp_path / "r")) == 130
    (run_dir,) = runs_in(tmp_path / "r")
    assert len(load_run(run_dir).rows()) == 12
    return run_dir


def test_torn_last_line_is_reported_repaired_and_loses_nothing(partial, suite_file, reference, tmp_path, capsys, caplog):
    run = load_run(partial)
    before = run.rows_path.read_bytes()
    with open(run.rows_path, "ab") as fh:
        fh.write(b'{"run_id": "x", "case_id": "uniform-T64')  # killed mid-write
    with open(run.batches_path, "ab") as fh:
        fh.write(b'{"run_id": "x", "ca')
    capsys.readouterr()
    assert main(["report", str(partial), "--reports", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "torn last line" in ln]
    assert len(warned) >= 1 and all(ln.startswith("moebench: warning: ") for ln in warned)
    assert "rows.jsonl: ignored a torn last line 13" in err
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0
    assert run.rows_path.read_bytes().startswith(before)  # the 12 rows untouched, in place
    assert_complete(partial, reference[0])
    assert any("cut a torn last line" in r for r in run.meta()["repairs"])
    compare_ok(reference[0], partial, capsys)


def test_whole_record_without_newline_is_kept(partial, suite_file, reference, tmp_path):
    run = load_run(partial)
    data = run.rows_path.read_bytes()
    run.rows_path.write_bytes(data[:-1])  # the last row lost only its newline
    assert len(run.rows()) == 12
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0
    assert "terminated its last line" in run.meta()["repairs"][0]
    assert_complete(partial, reference[0])


def test_legacy_torn_line_followed_by_a_row_is_salvaged(partial, suite_file, reference, tmp_path, caplog):
    """What moebench wrote before the repair: a torn row with the next row appended to it."""
    run = load_run(partial)
    lines = run.rows_path.read_bytes().splitlines(keepends=True)
    glued = lines[-3][: len(lines[-3]) // 2] + lines[-2]  # row 10 torn, row 11 glued to it
    run.rows_path.write_bytes(b"".join(lines[:-3]) + glued + lines[-1])
    rows = run.rows()
    assert len(rows) == 11 and "began with a torn record" in caplog.text
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0  # row 10 is measured again
    assert_complete_except_order(partial, reference[0])


def assert_complete_except_order(run_dir: Path, ref_dir: Path) -> None:
    run = load_run(run_dir)
    assert pairs(run.raw_rows()) == pairs(load_run(ref_dir).rows())
    assert {(r["case_id"], r["router"]): deterministic(r) for r in run.rows()} == {
        (r["case_id"], r["router"]): deterministic(r) for r in load_run(ref_dir).rows()}
    assert run.meta()["status"] == "complete"


def test_garbage_lines_in_the_middle_are_skipped_with_one_line(partial, suite_file, reference, tmp_path, capsys,
                                                               caplog):
    run = load_run(partial)
    lines = run.rows_path.read_bytes().splitlines(keepends=True)
    lines[2] = b"\x00\xff\xfe binary \x80\n"  # rows 3 and 5 overwritten
    lines[4] = b"[1, 2, 3]\n"
    run.rows_path.write_bytes(b"".join(lines))
    blines = run.batches_path.read_bytes().splitlines(keepends=True)
    assert len(blines) > 2
    run.batches_path.write_bytes(b"".join(blines[:1] + [b'{"no": "keys"}\n', b"not json {\n"] + blines[1:]))
    capsys.readouterr()
    assert main(["compare", str(reference[0]), str(partial), "--metrics", "deterministic"]) in (0, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (warning,) = [ln for ln in err.splitlines() if "rows.jsonl" in ln]
    assert warning.startswith("moebench: warning: ") and "skipped 2 unreadable line(s)" in warning
    assert warning.endswith(": 3, 5")
    assert len(build_data([partial]).rows) == 10  # the report's reader: warns about batches.jsonl too
    assert "batches.jsonl: skipped 2 unreadable line(s) (not a JSON object with case_id and router): 2, 3" in caplog.text
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0  # rows 3 and 5 measured again
    assert_complete_except_order(partial, reference[0])
    compare_ok(reference[0], partial, capsys)


def test_a_deeply_nested_line_is_skipped_by_resume(partial, suite_file, reference, tmp_path, capsys):
    """#23 item 8: 5000 '[' (deeper than the JSON parser recurses) is a garbage line like any
    other: --resume measures that row again instead of failing with RecursionError."""
    run = load_run(partial)
    lines = run.rows_path.read_bytes().splitlines(keepends=True)
    lines[3] = b"[" * 5000 + b"\n"  # row 4 overwritten
    run.rows_path.write_bytes(b"".join(lines))
    with open(run.batches_path, "ab") as fh:
        fh.write(b"[" * 5000 + b"\n")
    capsys.readouterr()
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0
    err = capsys.readouterr().err
    assert "RecursionError" not in err and "rows.jsonl: skipped 1 unreadable line(s)" in err
    assert_complete_except_order(partial, reference[0])


def test_binary_rows_file_and_broken_meta(partial, suite_file, reference, tmp_path, capsys):
    run = load_run(partial)
    run.rows_path.write_bytes(os.urandom(5000))
    capsys.readouterr()
    assert main(["compare", str(reference[0]), str(partial)]) in (0, 1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rows.jsonl: " in err
    meta = run.meta_path.read_bytes()
    for broken in (meta[: len(meta) // 2], b"[1, 2]", b"\xff\xfe"):
        run.meta_path.write_bytes(broken)
        for argv in (["report", str(partial), "--reports", str(tmp_path / "p")],
                     ["compare", str(reference[0]), str(partial)],
                     run_argv(suite_file, tmp_path / "r", partial)):
            assert main(argv) == 2
            line = one_line(capsys.readouterr().err)
            assert "meta.json" in line
    run.meta_path.write_bytes(meta)
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0  # everything measured again
    assert_complete_except_order(partial, reference[0])


def test_duplicate_rows_are_deduplicated_with_one_line(partial, suite_file, reference, tmp_path, capsys):
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0
    run = load_run(partial)
    lines = run.rows_path.read_bytes().splitlines(keepends=True)
    changed = json.loads(lines[0])
    changed["imbalance"] = 99.0  # a later duplicate: it is the one kept
    run.rows_path.write_bytes(b"".join(lines + lines[:3] + [json.dumps(changed).encode() + b"\n"]))
    assert len(run.raw_rows()) == PAIRS + 4 and len(run.finished_keys()) == PAIRS
    capsys.readouterr()
    assert len(build_data([partial]).rows) == PAIRS
    assert main(["export", str(partial)]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "duplicate" in ln]
    assert line.endswith("rows.jsonl: 4 duplicate (case_id, router) row(s); kept the last of each")
    assert main(["compare", str(reference[0]), str(partial), "--metrics", "deterministic"]) == 1  # 99.0 won
    assert "duplicate" in capsys.readouterr().err
    kept = {(r["case_id"], r["router"]): r for r in run.rows()}
    assert kept[(changed["case_id"], changed["router"])]["imbalance"] == 99.0


# ----------------------------------------------------------------------------- full disk

def test_injected_enospc_mid_row_loses_nothing_and_resume_completes(partial, suite_file, reference, tmp_path, capsys):
    run = load_run(partial)
    before = {p.name: p.read_bytes() for p in (run.rows_path, run.batches_path, run.loads_path)}
    real = durable.write_all
    state = {"rows": 0}

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("rows.jsonl"):
            state["rows"] += 1
            if state["rows"] == 3:  # the third row: half of it goes down, then the disk is full
                os.write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(durable, "write_all", full_disk)
        assert main(run_argv(suite_file, tmp_path / "r", partial)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{run.rows_path}: cannot write: No space left on device" in line and "--resume" in line
    assert len(run.rows()) == 12 + 2
    for p in (run.rows_path, run.batches_path, run.loads_path):
        assert p.read_bytes().startswith(before[p.name]) and p.read_bytes().endswith(b"\n")  # no half line
    meta = run.meta()
    assert meta["status"] == "interrupted" and "No space left" in meta["stopped_by"]
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0
    assert_complete(partial, reference[0])


def test_injected_enospc_on_meta_keeps_the_old_meta(partial, tmp_path):
    run = load_run(partial)
    old = run.meta_path.read_bytes()

    def full(fd, data):
        os.write(fd, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(durable, "write_all", full)
        with pytest.raises(results.WriteError, match="meta.json: cannot write: No space left on device"):
            run.update_meta(status="x")
    assert run.meta_path.read_bytes() == old and not list(partial.glob("*.tmp"))


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover this")
    try:
        yield lambda opts: subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_full_disk_on_a_small_tmpfs(suite_file, reference, tmp_path, capsys):
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "48k") as remount:
        capsys.readouterr()
        code = main(run_argv(suite_file, disk))
        err = capsys.readouterr().err
        assert code == 2, err
        line = one_line(err)
        assert "No space left on device" in line
        found = runs_in(disk)
        if not found:  # too small even for the folder: the error names it; make room and retry
            assert "cannot create the run folder" in line or "suite.yaml" in line or "meta.json" in line
            pytest.skip("the tmpfs filled before the first row")
        (run_dir,) = found
        run = load_run(run_dir)
        written = run.rows_path.read_bytes() if run.rows_path.exists() else b""
        assert written.endswith(b"\n") or not written
        remount("size=4m")  # space is back
        assert main(run_argv(suite_file, disk, run_dir)) == 0
        assert run.rows_path.read_bytes().startswith(written)
        assert_complete(run_dir, reference[0])


# ----------------------------------------------------------------------------- read-only

@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only for this process: chmod for a normal user (root ignores modes), a
    read-only bind mount for root (chattr +i where mounting is not allowed)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if bind and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode == 0:
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    if bind:
        subprocess.run(["umount", str(path)], check=False)
    targets = [str(p) for p in [path, *path.rglob("*")]]
    if subprocess.run(["chattr", "+i", *targets], capture_output=True).returncode:
        pytest.skip("cannot make a folder read-only as root here (no mount, no chattr)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *targets], check=True)


def test_read_only_results_root_and_run_folder(partial, suite_file, reference, tmp_path, capsys):
    empty = tmp_path / "ro"
    empty.mkdir()
    capsys.readouterr()
    with read_only(empty):
        assert main(run_argv(suite_file, empty)) == 2
        line = one_line(capsys.readouterr().err)
        assert str(empty) in line and "cannot create the run folder" in line
    assert not list(empty.iterdir())
    before = load_run(partial).rows_path.read_bytes()
    with read_only(partial):
        assert main(run_argv(suite_file, tmp_path / "r", partial)) == 2
        line = one_line(capsys.readouterr().err)
        assert str(partial) in line and ("Read-only" in line or "ermission" in line)
        assert len(build_data([partial]).rows) == 12  # still readable
    assert load_run(partial).rows_path.read_bytes() == before
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0  # writable again: completes
    assert_complete(partial, reference[0])


def test_injected_erofs_mid_run(partial, suite_file, reference, tmp_path, capsys):
    real = durable.write_all
    count = {"n": 0}

    def ro(fd, data):
        count["n"] += 1
        if count["n"] == 4:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(fd, data)

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(durable, "write_all", ro)
        assert main(run_argv(suite_file, tmp_path / "r", partial)) == 2
    assert "Read-only file system" in one_line(capsys.readouterr().err)
    assert main(run_argv(suite_file, tmp_path / "r", partial)) == 0
    assert_complete(partial, reference[0])


# ----------------------------------------------------------------------------- liveness (literal)

def test_process_state_literal_cases():
    me = process_identity()
    assert process_state(me) == "alive"
    assert process_state(dict(me, start_ticks=(me["start_ticks"] or 0) + 1)) == "gone"  # pid reused
    assert process_state(dict(me, host="another-host")) == "unknown"
    assert process_state(dict(me, boot_id="not-this-boot")) == "gone"
    assert process_state(None) == "unknown"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_state(dict(me, pid=child.pid, start_ticks=None)) == "gone"
    meta = {"status": "running", "process": dict(me, pid=child.pid)}
    assert effective_status(meta) == "interrupted"
    assert effective_status(dict(meta, process=dict(me, host="elsewhere"))) == "unknown"
    assert effective_status({"status": "running"}) == "running"  # no record: cannot tell
    assert effective_status(dict(meta, status="complete")) == "complete"


def test_report_calls_a_dead_running_run_interrupted(partial, tmp_path):
    run = load_run(partial)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    run.update_meta(status="running", process=dict(process_identity(), pid=child.pid))
    from moebench.report.build import write_report

    text = write_report([partial], tmp_path / "p").read_text()
    assert "**INTERRUPTED**" in text


# ------------------------------------------------------------ #23 item 4: sys.exit in a train suite

TRAIN_EXIT_SUITE = """
name: train_exit
version: 1
routers: [switch, exits_in_training, expert_choice]
grid: {experts: 4, top_k: 1, hidden: 8}
train: {steps: 3, tokens_per_step: 32, task: [local_experts, teacher]}
"""


def test_sys_exit_of_a_router_in_a_train_suite_is_an_error_row(tmp_path, monkeypatch, capsys):
    from dataclasses import dataclass

    from moebench.cli import main
    from moebench.routers import TokenChoiceRouter
    from moebench.routers.registry import ROUTERS

    @dataclass(frozen=True)
    class ExitsInTraining(TokenChoiceRouter):
        paper = "test"

        def route(self, inputs, ctx):
            sys.exit(3)

    ExitsInTraining.name = "exits_in_training"
    monkeypatch.setitem(ROUTERS._classes, "exits_in_training", ExitsInTraining)
    suite = tmp_path / "train_exit.yaml"
    suite.write_text(TRAIN_EXIT_SUITE)
    assert main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-report"]) == 0
    (run,) = (tmp_path / "r" / "train_exit").iterdir()
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 2 tasks x 3 routers: the run went on past each exit
    bad = [r for r in rows if r["router"] == "exits_in_training"]
    assert [r["status"] for r in bad] == ["error", "error"]
    assert all(r["reason"] == "exited: the router called sys.exit(3)" for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["router"] != "exits_in_training")


TRAIN_BAD_SUITE = """
name: train_bad
version: 1
routers: [switch, out_of_range_in_training, nan_weights_in_training]
grid: {experts: 4, top_k: 1, hidden: 8}
train: {steps: 3, tokens_per_step: 32, task: [local_experts]}
"""


def test_a_bad_routing_in_a_train_suite_is_an_invalid_routing_row(tmp_path, monkeypatch):
    # the routing is checked before combine reads it, as in `moebench run`: the row names the
    # router's fault, and the healthy router beside it trains
    from dataclasses import dataclass, replace

    from moebench.cli import main
    from moebench.routers.registry import ROUTERS
    from moebench.routers.token_choice import Switch

    @dataclass(frozen=True)
    class OutOfRangeInTraining(Switch):
        def route(self, inputs, ctx):
            r = super().route(inputs, ctx)
            return replace(r, expert_index=r.expert_index + 1000)

    @dataclass(frozen=True)
    class NanWeightsInTraining(Switch):
        def route(self, inputs, ctx):
            r = super().route(inputs, ctx)
            return replace(r, weight=r.weight * float("nan"))

    monkeypatch.setitem(ROUTERS._classes, "out_of_range_in_training", OutOfRangeInTraining)
    monkeypatch.setitem(ROUTERS._classes, "nan_weights_in_training", NanWeightsInTraining)
    suite = tmp_path / "train_bad.yaml"
    suite.write_text(TRAIN_BAD_SUITE)
    assert main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-report"]) == 0
    (run,) = (tmp_path / "r" / "train_bad").iterdir()
    rows = {r["router"]: r for r in map(json.loads, (run / "rows.jsonl").read_text().splitlines())}
    assert rows["switch"]["status"] == "ok"
    bad = rows["out_of_range_in_training"]
    assert bad["status"] == "error" and bad["reason"].startswith(
        "InvalidRouting: router 'out_of_range_in_training': expert_index out of range [0, 4)"), bad["reason"]
    nan = rows["nan_weights_in_training"]
    assert nan["status"] == "error" and nan["reason"].startswith("InvalidRouting: ") and "weight" in nan["reason"]


# ---------------------------------------- #23 item 16: timing.timeout_s without isolation

def test_timeout_s_holds_without_isolation(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from moebench.cli import main
    from moebench.routers import TokenChoiceRouter
    from moebench.routers.registry import ROUTERS

    @dataclass(frozen=True)
    class Sleeper(TokenChoiceRouter):
        paper = "test"

        def route(self, inputs, ctx):
            while True:
                time.sleep(0.05)  # Python code: the alarm stops it at its next line

    Sleeper.name = "sleeper_unisolated"
    monkeypatch.setitem(ROUTERS._classes, "sleeper_unisolated", Sleeper)
    suite = tmp_path / "slow.yaml"
    suite.write_text("name: slow\nversion: 1\ngrid: {workload: uniform, tokens: 64, experts: 4, top_k: 1}\n"
                     "routers: [sleeper_unisolated, topk]\ntiming: {enabled: false, isolate: false, timeout_s: 1}\n")
    start = time.monotonic()
    assert main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-report"]) == 0
    assert time.monotonic() - start < 30
    (run,) = (tmp_path / "r" / "slow").iterdir()
    rows = {r["router"]: r for r in map(json.loads, (run / "rows.jsonl").read_text().splitlines())}
    assert rows["sleeper_unisolated"]["status"] == "error"
    assert rows["sleeper_unisolated"]["reason"].startswith("RouterTimeout: exceeded timing.timeout_s=1 s")
    assert rows["topk"]["status"] == "ok"


def test_the_moebench_phase_fixture_checks_the_routing(tmp_path, monkeypatch, moebench_phase):
    from dataclasses import dataclass, replace

    import torch

    from moebench.core.routing_check import InvalidRouting
    from moebench.routers import TokenChoiceRouter
    from moebench.routers.registry import ROUTERS

    @dataclass(frozen=True)
    class FarIds(TokenChoiceRouter):
        paper = "test"

        def route(self, inputs, ctx):
            top = torch.topk(inputs.logits.float(), ctx.top_k, dim=-1)
            routing = self.finish(top.indices, top.values, inputs.logits.float(), inputs.logits.float(), ctx)
            return replace(routing, expert_index=routing.expert_index + 10**6)

    FarIds.name = "far_ids_fixture"
    monkeypatch.setitem(ROUTERS._classes, "far_ids_fixture", FarIds)
    suite = tmp_path / "fx.yaml"
    suite.write_text("name: fx\nversion: 1\ngrid: {workload: uniform, tokens: 64, experts: 4, top_k: 1}\n"
                     "routers: [far_ids_fixture]\ntiming: {isolate: false}\n")
    with pytest.raises(InvalidRouting, match="expert_index out of range"):
        moebench_phase(str(suite), router="far_ids_fixture", phase="dispatch")

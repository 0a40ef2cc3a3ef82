"""Crash and hang isolation: plugin routers that segfault, hang, exit, raise or return a broken
Routing give one error row each; the other routers' rows complete and the run is `complete`.

Worker start-up costs seconds, so one isolated run carries most assertions (module fixture).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fault_routers
from moebench.run.isolation import WORKERS
from moebench.store.runs import load_run
from moebench.routers.registry import ROUTERS
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite

SUITE = """
name: faults
version: 1
grid: {{workload: [uniform, zipf], tokens: 64, experts: 4, top_k: 2, capacity_factor: 1.0}}
routers: [{routers}]
timing: {{warmup_rounds: 0, min_rounds: 1, max_rounds: 1, min_time_s: 0.0, threads: 1, {extra}}}
"""

FAULTS = ["fault_segfault", "fault_exit", "fault_os_exit", "fault_raise", "fault_shape", "fault_range", "fault_nan"]
GOOD = ["topk", {"name": "topk", "label": "topk_torch", "params": {"impl": "torch"}}]

EXPECTED_REASON = {
    "fault_segfault": "crashed: the worker died with signal SIGSEGV while routing",
    "fault_exit": "exited: the router called sys.exit(3)",
    "fault_os_exit": "exited: the worker exited with code 7",
    "fault_raise": "RuntimeError: plugin bug",
    "fault_shape": "InvalidRouting: router 'fault_shape': logits has shape [64, 4], expected [T, E] = [64, 3]",
    "fault_range": "InvalidRouting: router 'fault_range': expert_index out of range [0, 4): min 0, max 4",
    "fault_nan": "InvalidRouting: router 'fault_nan': weight has 64 NaN or infinite values of 128",
}


def suite_file(tmp_path: Path, routers: list, extra: str) -> Path:
    import json

    path = tmp_path / "faults.yaml"
    path.write_text(SUITE.format(routers=", ".join(json.dumps(r) for r in routers), extra=extra))
    return path


@pytest.fixture(scope="module")
def registered():
    """The fault routers, registered for this module only (the registry is process-wide)."""
    ROUTERS.classes()
    for name, cls in fault_routers.FAULT_ROUTERS.items():
        ROUTERS.register(name)(cls)
    yield
    for name in fault_routers.FAULT_ROUTERS:
        del ROUTERS._classes[name]


@pytest.fixture(scope="module")
def faulty_run(registered, tmp_path_factory):
    """One isolated run: the good routers around every fault, in two cases."""
    tmp = tmp_path_factory.mktemp("faults")
    routers = [GOOD[0], *FAULTS[:4], GOOD[1], *FAULTS[4:]]
    suite = load_suite(suite_file(tmp, routers, "timeout_s: 120"))
    starts = WORKERS.starts
    run = execute(suite, RunOptions(results_root=tmp / "r"))
    return run, WORKERS.starts - starts


def test_each_fault_is_one_error_row_and_the_run_completes(faulty_run):
    run, _ = faulty_run
    rows = run.rows()
    assert run.meta()["status"] == "complete"
    by_key = {}
    for r in rows:
        by_key.setdefault((r["case_id"], r["router"]), []).append(r)
    assert all(len(v) == 1 for v in by_key.values())  # exactly once each
    assert len(by_key) == 2 * 9
    for r in rows:
        if r["router"] in ("topk", "topk_torch"):
            assert r["status"] == "ok", r["reason"]
            assert r["imbalance"] is not None and r["route.median_ms"] > 0 and r["dispatch.median_ms"] > 0
        else:
            assert r["status"] == "error"
            assert r["reason"].startswith(EXPECTED_REASON[r["router"]]), r["reason"]
            assert r["tokens"] == 64 and r["router_name"] == r["router"]


def test_a_crash_restarts_the_worker_once_per_crash(faulty_run):
    # segfault and os._exit kill the worker in each of the 2 cases; everything else is caught
    # inside it, and a case without a crash reuses the worker (+1: the first start, unless an
    # earlier test module left a worker running)
    _, starts = faulty_run
    assert 2 * 2 <= starts <= 2 * 2 + 1


def test_a_hang_is_killed_at_timeout_s(registered, tmp_path):
    path = suite_file(tmp_path, ["fault_hang", GOOD[1]], "timeout_s: 3, enabled: false")
    path.write_text(path.read_text().replace("[uniform, zipf]", "uniform"))  # one restart is enough
    begin = time.monotonic()
    run = execute(load_suite(path), RunOptions(results_root=tmp_path / "r"))
    took = time.monotonic() - begin
    rows = {r["router"]: r for r in run.rows()}
    assert len(rows) == 2 and run.meta()["status"] == "complete"
    assert rows["fault_hang"]["status"] == "error"
    assert rows["fault_hang"]["reason"] == "timeout: exceeded timing.timeout_s=3 s"
    assert rows["topk_torch"]["status"] == "ok"  # after the hang, in a fresh worker
    assert took < 3 + 60  # the timeout plus a worker restart, not a hang


def test_in_process_the_check_turns_a_bad_index_into_an_error_row(registered, tmp_path):
    # without the check the numba dispatch kernel would write out of bounds (exit 139)
    suite = load_suite(suite_file(tmp_path, ["fault_range", "fault_nan", "fault_exit", GOOD[0]], "isolate: false"))
    rows = {(r["workload"], r["router"]): r for r in execute(suite, RunOptions(results_root=tmp_path / "r")).rows()}
    assert rows["uniform", "topk"]["status"] == "ok"
    for name in ("fault_range", "fault_nan", "fault_exit"):
        assert rows["uniform", name]["reason"].startswith(EXPECTED_REASON[name])


def test_sigterm_of_the_parent_ends_the_worker(tmp_path):
    """A run killed while a router hangs leaves no worker behind."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]
        import fault_routers
        from moebench.run.isolation import WORKERS
        from moebench.routers.registry import ROUTERS
        from moebench.run.session import RunOptions, execute
        from moebench.suite.load import load_suite
        ROUTERS.classes()
        ROUTERS.register("fault_hang")(fault_routers.Hangs)
        import signal
        def on_term(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        suite = load_suite(sys.argv[1])
        def progress(cases, total):
            for case in cases:
                print("worker", WORKERS.get().process.pid, flush=True)
                yield case
        execute(suite, RunOptions(results_root=sys.argv[2]), progress=progress)
    """))
    suite = suite_file(tmp_path, ["fault_hang"], "timeout_s: 600, enabled: false")
    proc = subprocess.Popen([sys.executable, str(script), str(suite), str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("worker "), line
        worker = int(line.split()[1])
        time.sleep(1.0)  # the router is hanging in the worker now
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        for _ in range(100):  # reaped by the parent before it exits; allow the kernel a moment
            if not _alive(worker):
                break
            time.sleep(0.1)
        assert not _alive(worker)
        (run,) = (tmp_path / "r" / "faults").iterdir()
        assert load_run(run).meta()["status"] == "interrupted"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie has finished; it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("field, value, expected", [
    ("timeout_s", 0, "timing.timeout_s: expected a number > 0 or null (no limit), got 0"),
    ("timeout_s", "1m", "timing.timeout_s: expected a number > 0 or null (no limit), got '1m'"),
    ("isolate", "no", "timing.isolate: expected a boolean, got 'no'"),
])
def test_timing_fields_are_validated(field, value, expected):
    from moebench.core.errors import SuiteError
    from moebench.suite.load import validate_document

    doc = {"name": "s", "version": 1, "grid": {"workload": "uniform", "tokens": 8, "experts": 2, "top_k": 1},
           "routers": ["topk"], "timing": {field: value}}
    with pytest.raises(SuiteError) as info:
        validate_document(doc, "s.yaml")
    assert str(info.value) == f"s.yaml: {expected}"
    doc["timing"] = {"timeout_s": None, "isolate": False}
    timing = validate_document(doc, "s.yaml").timing
    assert (timing.timeout_s, timing.isolate) == (None, False)


def test_no_isolate_runs_in_process_and_is_recorded(tmp_path, monkeypatch, capsys):
    """`moebench run --no-isolate` on a suite with timing.isolate true: no worker starts (nor
    is the isolated path entered, which would also count nothing with a worker left running
    by an earlier test), the rows are measured, and meta.json records the override. The same
    suite without the flag takes the isolated path (stubbed here: no worker start needed)."""
    import moebench.run.isolation as isolation
    from moebench.cli import main

    path = suite_file(tmp_path, [GOOD[0]], "isolate: true")
    path.write_text(path.read_text().replace("[uniform, zipf]", "uniform"))
    entered = []
    monkeypatch.setattr(isolation, "isolated_rows", lambda *args, **kwargs: entered.append(args) or iter(()))
    starts = WORKERS.starts
    assert main(["run", str(path), "--no-isolate", "--no-report", "--results", str(tmp_path / "r")]) == 0
    assert WORKERS.starts == starts and entered == []
    (run_dir,) = (tmp_path / "r" / "faults").iterdir()
    run = load_run(run_dir)
    (row,) = run.rows()
    assert row["status"] == "ok" and row["route.median_ms"] > 0
    meta = run.meta()
    assert meta["timing"]["isolate"] is False and meta["overrides"] == {"timing.isolate": False}
    capsys.readouterr()
    assert main(["run", str(path), "--no-report", "--results", str(tmp_path / "r2")]) == 0
    assert len(entered) == 1  # the suite's own isolate: true
    (run_dir,) = (tmp_path / "r2" / "faults").iterdir()
    assert load_run(run_dir).meta()["timing"]["isolate"] is True and "overrides" not in load_run(run_dir).meta()

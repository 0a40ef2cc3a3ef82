"""`moebench export` (baseline, pytest-benchmark JSON) and the pytest plugin (`moebench_phase`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.compare.verdicts import load_side
from moebench.compare.export import export_run, pytest_benchmark_stats

RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"
STATS_FIELDS = {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", "iqr_outliers",
                "stddev_outliers", "outliers", "ld15iqr", "hd15iqr", "ops", "total", "iterations"}


@pytest.fixture
def run_with_skip(tmp_path) -> Path:
    """The `base` fixture run plus a skipped row, rows shuffled."""
    run = tmp_path / "run"
    shutil.copytree(RUNS / "base", run)
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    skipped = dict(rows[0], router="expert_choice", status="skipped", reason="not applicable")
    rows = [rows[3], skipped, rows[1], rows[0], rows[2]]
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_baseline_is_ok_rows_sorted_and_stable(run_with_skip, tmp_path, capsys):
    out = tmp_path / "baseline" / "base.json"
    assert main(["export", str(run_with_skip), "--format", "baseline", "--out", str(out)]) == 0
    assert "4 rows" in capsys.readouterr().out
    first = out.read_bytes()
    export_run(run_with_skip, "baseline", out)
    assert out.read_bytes() == first  # stable: re-exporting gives the same bytes
    doc = json.loads(first)
    keys = [(r["case_id"], r["router"]) for r in doc["rows"]]
    assert keys == sorted(keys) and len(keys) == 4 and all(r["status"] == "ok" for r in doc["rows"])
    assert doc["format"] == "moebench-baseline" and doc["meta"]["timings_included"] is False
    meta, rows = load_side(out)
    assert meta == doc["meta"] and rows == doc["rows"]


def test_baseline_keeps_no_timings_or_run_ids_unless_asked(tmp_path, capsys):
    # `base` and `same` are two runs of the same code: other times, other run ids
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["export", str(RUNS / "base"), "--out", str(a)]) == 0
    assert main(["export", str(RUNS / "same"), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()  # a refresh with unchanged code rewrites nothing
    doc = json.loads(a.read_text())
    columns = set().union(*doc["rows"])
    assert not [c for c in columns if c.endswith("_ms") or c.endswith("_bytes") or c.endswith(".tokens_per_s")]
    assert "run_id" not in columns and {"imbalance", "drop_rate", "case_id", "router", "threads"} <= columns
    assert not {"run_id", "started_at", "reference", "command"} & set(doc["meta"])
    assert set(doc["meta"]["environment"]) <= {"moebench", "torch", "numpy", "python"}
    # --with-timings keeps everything
    full = tmp_path / "full.json"
    assert main(["export", str(RUNS / "base"), "--with-timings", "--out", str(full)]) == 0
    kept = json.loads(full.read_text())
    assert kept["meta"]["run_id"] == "base" and kept["meta"]["timings_included"] is True
    assert kept["rows"][0]["route.median_ms"] > 0 and kept["rows"][0]["run_id"] == "base"
    # compare reads a timing-less baseline: deterministic metrics only, said in a note
    capsys.readouterr()
    assert main(["compare", str(a), str(RUNS / "slow_apart")]) == 0
    assert "A carries no timings" in capsys.readouterr().out
    assert main(["compare", str(a), str(RUNS / "det_worse")]) == 1
    assert main(["compare", str(full), str(RUNS / "slow_apart")]) == 1


def test_export_to_stdout_and_bad_format(capsys):
    assert main(["export", str(RUNS / "base")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"]
    with pytest.raises(SystemExit):
        main(["export", str(RUNS / "base"), "--format", "csv"])
    assert main(["export", str(RUNS / "missing")]) == 2


def test_pytest_benchmark_document(run_with_skip):
    text, count = export_run(run_with_skip, "pytest-benchmark")
    doc = json.loads(text)
    assert set(doc) == {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    assert count == len(doc["benchmarks"]) == 4 * 3  # ok rows x phases
    assert doc["machine_info"]["node"] == "host-a" and doc["machine_info"]["cpu"]["brand_raw"] == "Test CPU A"
    assert doc["commit_info"]["id"] == "0" * 40 and doc["datetime"] == "2026-01-01T00:00:00+00:00"
    bench = next(b for b in doc["benchmarks"] if b["name"].startswith("route[uniform") and b["param"].endswith("switch"))
    assert set(bench) == {"group", "name", "fullname", "params", "param", "extra_info", "options", "stats"}
    assert bench["name"] == "route[uniform-T1024-E8-k1-cf1.25-position-float32-cpu-s0-0a1b2c3d-switch]"
    assert bench["fullname"] == "moebench/fixture::" + bench["name"]
    assert bench["group"] == "route uniform-T1024-E8-k1-cf1.25-position-float32-cpu-s0-0a1b2c3d"
    assert bench["params"] == {"case_id": bench["extra_info"]["case_id"], "router": "switch"}
    stats = bench["stats"]
    assert set(stats) == STATS_FIELDS
    assert stats["median"] == pytest.approx(1.0e-3) and stats["rounds"] == 40 and stats["iterations"] == 1
    assert stats["q1"] == pytest.approx(0.98e-3) and stats["q3"] == pytest.approx(1.03e-3)
    assert stats["iqr"] == pytest.approx(0.05e-3) and stats["stddev"] == pytest.approx(0.04e-3)
    assert stats["min"] <= stats["ld15iqr"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["hd15iqr"]
    assert stats["ops"] == pytest.approx(1 / stats["mean"]) and stats["total"] == pytest.approx(stats["mean"] * 40)
    extra = bench["extra_info"]
    assert extra["imbalance"] == 1.10 and extra["drop_rate"] == 0.0 and extra["phase"] == "route"
    assert extra["ci_low_ms"] == pytest.approx(0.97)


def test_stats_fallbacks_for_rows_without_quartiles():
    row = {"route.median_ms": 2.0, "route.mean_ms": 2.0, "route.min_ms": 1.0, "route.max_ms": 4.0,
           "route.iqr_ms": 0.4, "route.rounds": 5}
    stats = pytest_benchmark_stats(row, "route")
    assert stats["q1"] == pytest.approx(1.8e-3) and stats["q3"] == pytest.approx(2.2e-3)
    assert stats["stddev"] == pytest.approx(0.4e-3 / 1.349)
    assert pytest_benchmark_stats({"route.rounds": 0}, "route") is None


def test_pytest_benchmark_compare_reads_two_exports(tmp_path):
    a, b = tmp_path / "0001_base.json", tmp_path / "0002_slow.json"
    export_run(RUNS / "base", "pytest-benchmark", a)
    export_run(RUNS / "slow_apart", "pytest-benchmark", b)
    done = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(a), str(b), "--group-by", "name"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Failed to load" not in output
    assert "route[uniform-T1024-E8-k1-cf1.25-position-float32-cpu-s0-0a1b2c3d-switch]" in output
    assert "0001_base" in output and "0002_slow" in output

    from pytest_benchmark.storage.file import FileStorage
    from pytest_benchmark.logger import Logger

    storage = FileStorage(str(tmp_path), default_machine_id=None, logger=Logger(Logger.QUIET))
    loaded = list(storage.load_benchmarks(str(a), str(b)))
    assert len(loaded) == 2 * 12 and all(x["median"] > 0 for x in loaded)


# ------------------------------------------------------------------------------ pytest plugin

TINY_SUITE = """
name: plugin_tiny
version: 1
grid:
  workload: [uniform, {name: zipf, params: {s: 1.2}}]
  tokens: 128
  experts: 4
  top_k: [1, 2]
  capacity_factor: 1.0
routers: [switch, {name: topk, params: {renormalize: true}, label: topk_renorm}]
timing: {threads: 1}
"""

PLUGIN_TESTS = '''
import pytest

SUITE = "tiny.yaml"


def test_route(benchmark, moebench_phase):
    fn = moebench_phase(SUITE, case=0, router="switch", phase="route")
    benchmark(fn)
    assert benchmark.extra_info["router"] == "switch" and "imbalance" in benchmark.extra_info


@pytest.mark.parametrize("phase", ["dispatch", "combine"])
def test_phases_by_axes(benchmark, moebench_phase, phase):
    fn = moebench_phase(SUITE, case={"workload": "zipf", "top_k": 2}, router="topk_renorm", phase=phase)
    benchmark(fn)
    assert fn.case.top_k == 2 and 0 <= fn.metrics["drop_rate"] <= 1


def test_registry_router_and_case_id(moebench_phase):
    fn = moebench_phase(SUITE, case="zipf-T128-E4-k1", router="topk", params={"score": "sigmoid"}, quick=True)
    fn()


def test_switch_on_top2_skips(moebench_phase):
    moebench_phase(SUITE, case={"workload": "uniform", "top_k": 2}, router="switch")


def test_bad_case_fails(moebench_phase):
    moebench_phase(SUITE, case={"workload": "nope"}, router="switch")
'''


def _entry_point_visible(cwd: Path) -> bool:
    """Whether a pytest started in ``cwd`` loads the plugin by itself (pip-installed entry point)."""
    code = "from importlib.metadata import entry_points as e; print(any(p.name == 'moebench' for p in e(group='pytest11')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=60)
    return done.stdout.strip() == "True"


THREAD_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY",
               "MOEBENCH_THREAD_ENV")


def _pytest(tmp_path: Path, *args: str, torch_first: bool = False) -> subprocess.CompletedProcess:
    # Installed: the entry point loads it. Not installed (a bare checkout): load the module.
    # The environment has no thread variables (as a user's shell), whatever this process set.
    plugin = [] if _entry_point_visible(tmp_path) else ["-p", "no:moebench", "-p", "moebench.run.pytest_plugin"]
    argv = ["-q", "-p", "no:cacheprovider", "-rs", *plugin, *args]
    cmd = [sys.executable, "-m", "pytest", *argv] if not torch_first else \
        [sys.executable, "-c", f"import sys, torch, pytest; sys.exit(pytest.main({argv!r}))"]
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)


def test_plugin_entry_point_is_declared():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"moebench": "moebench.run.pytest_plugin"}


@pytest.fixture
def plugin_project(tmp_path) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY_SUITE)
    (tmp_path / "test_bench.py").write_text(PLUGIN_TESTS)
    return tmp_path


def test_plugin_fixture_under_pytest_benchmark(plugin_project):
    done = _pytest(plugin_project, "--benchmark-json=out.json", "--benchmark-min-rounds=1",
                   "--benchmark-max-time=0.000001", "--benchmark-warmup=off")
    output = done.stdout + done.stderr
    assert "4 passed, 1 skipped" in output and "1 failed" in output, output
    assert "switch routes each token to exactly 1 expert" in output
    assert "matches 0 cases" in output
    benchmarks = json.loads((plugin_project / "out.json").read_text())["benchmarks"]
    assert len(benchmarks) == 3
    for bench in benchmarks:
        assert {"case_id", "router", "phase", "imbalance", "drop_rate"} <= set(bench["extra_info"])
        assert bench["stats"]["median"] > 0


def test_plugin_fixture_with_benchmark_disabled(plugin_project):
    done = _pytest(plugin_project, "--benchmark-disable", "-k", "test_route or test_phases")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_plugin_import_is_light():
    code = "import sys, moebench.run.pytest_plugin; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


THREAD_TESTS = """
import os

SEEN_BY_CONFTEST = __import__("conftest").SEEN


def test_route_a(moebench_phase):
    moebench_phase("tiny.yaml", case=0, router="switch", phase="route")()
    print("ENV", os.environ.get("GOMP_SPINCOUNT"), os.environ.get("NUMBA_THREADING_LAYER_PRIORITY"), SEEN_BY_CONFTEST)


def test_route_b(moebench_phase):
    moebench_phase("tiny.yaml", case=1, router="switch", phase="route")()
"""

TORCH_CONFTEST = """
import os
import torch  # a conftest that loads torch: the plugin must have settled before it

SEEN = os.environ.get("GOMP_SPINCOUNT")
"""


@pytest.fixture
def thread_project(tmp_path) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY_SUITE)
    (tmp_path / "conftest.py").write_text(TORCH_CONFTEST)
    (tmp_path / "test_threads.py").write_text(THREAD_TESTS)
    return tmp_path


def test_plugin_sets_the_cli_thread_env_before_torch(thread_project):
    done = _pytest(thread_project, "-s")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # set before the conftest imported torch, as `moebench` sets them before torch loads
    assert "ENV 10000 omp tbb workqueue 10000" in output
    assert "ThreadEnvWarning" not in output


def test_plugin_warns_once_where_torch_came_first(thread_project):
    (thread_project / "conftest.py").write_text("SEEN = None\n")
    done = _pytest(thread_project, "-s", torch_first=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.count("not set as `moebench run` sets them") == 1, output  # two tests, one warning
    assert "GOMP_SPINCOUNT='10000'" in output and "torch or numba was imported before" in output


def test_plugin_thread_env_off_leaves_the_environment_and_warns(thread_project):
    done = _pytest(thread_project, "-s", "--moebench-thread-env=off")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ENV None None None" in output
    assert output.count("--moebench-thread-env=off") == 1, output

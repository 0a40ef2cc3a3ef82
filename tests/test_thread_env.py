"""moebench's thread settings (moebench/run/threads.py) where moebench owns the process (the CLI, its
workers), never in a library user's; a user's choice wins; meta records what applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from moebench.run import threads as thread_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY",
               thread_env.MARKER_VAR)
OURS = {"GOMP_SPINCOUNT": "10000", "NUMBA_THREADING_LAYER_PRIORITY": "omp tbb workqueue",
        thread_env.MARKER_VAR: "GOMP_SPINCOUNT,NUMBA_THREADING_LAYER_PRIORITY"}


def _python(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _fresh(monkeypatch):
    """As at the start of the moebench command: neither torch nor numba loaded yet."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    monkeypatch.setattr(thread_env, "_origins", {})


def test_settle_sets_both_before_torch_and_numba(monkeypatch):
    _fresh(monkeypatch)
    env: dict[str, str] = {}
    assert thread_env.settle(env) == {"GOMP_SPINCOUNT": "moebench", "NUMBA_THREADING_LAYER_PRIORITY": "moebench"}
    assert env == OURS
    settings = thread_env.thread_settings(env)
    assert settings["gomp_spincount"] == "10000" and settings["numba_threading_layer_priority"] == "omp tbb workqueue"
    assert settings["set_by"] == {"GOMP_SPINCOUNT": "moebench", "NUMBA_THREADING_LAYER_PRIORITY": "moebench"}


def test_a_users_choice_wins_each_setting_on_its_own(monkeypatch):
    _fresh(monkeypatch)
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # the user's policy: no spin count from moebench
    assert thread_env.settle(env) == {"GOMP_SPINCOUNT": "user", "NUMBA_THREADING_LAYER_PRIORITY": "moebench"}
    assert "GOMP_SPINCOUNT" not in env and env["NUMBA_THREADING_LAYER_PRIORITY"] == "omp tbb workqueue"
    env = {"NUMBA_THREADING_LAYER": "workqueue", "GOMP_SPINCOUNT": "0"}
    assert thread_env.settle(env) == {"GOMP_SPINCOUNT": "user", "NUMBA_THREADING_LAYER_PRIORITY": "user"}
    assert env == {"NUMBA_THREADING_LAYER": "workqueue", "GOMP_SPINCOUNT": "0"}


def test_too_late_once_torch_or_numba_has_loaded(monkeypatch):
    _fresh(monkeypatch)
    monkeypatch.setitem(sys.modules, "numba", object())  # numba read its config on import
    env: dict[str, str] = {}
    assert thread_env.settle(env) == {"GOMP_SPINCOUNT": "moebench", "NUMBA_THREADING_LAYER_PRIORITY": "too late"}
    assert "NUMBA_THREADING_LAYER_PRIORITY" not in env
    # torch loaded: its OpenMP runtime has read the environment already (a stand-in: importing
    # torch a second time in one process would leave two copies of it for the later tests)
    monkeypatch.setitem(sys.modules, "torch", object())

    env = {}
    assert thread_env.settle(env) == {"GOMP_SPINCOUNT": "too late", "NUMBA_THREADING_LAYER_PRIORITY": "too late"}
    assert env == {}
    monkeypatch.setattr(os, "environ", env)  # what settle() decided describes this process
    assert thread_env.thread_settings()["set_by"] == {"GOMP_SPINCOUNT": "too late",
                                                      "NUMBA_THREADING_LAYER_PRIORITY": "too late"}
    # ...and not an environment handed in for a worker
    assert thread_env.thread_settings(dict(OURS))["set_by"]["GOMP_SPINCOUNT"] == "moebench"


def test_worker_environment_fills_in_what_the_user_left():
    assert thread_env.worker_environment({"PATH": "/bin"}) == {"PATH": "/bin", **OURS}
    user = {"OMP_WAIT_POLICY": "ACTIVE", "NUMBA_THREADING_LAYER": "tbb"}
    assert thread_env.worker_environment(user) == user
    # a parent moebench settled: the worker inherits the same, still marked as moebench's
    inherited = thread_env.worker_environment(dict(OURS))
    assert inherited == OURS
    assert thread_env.thread_settings(inherited)["set_by"]["GOMP_SPINCOUNT"] == "moebench"


def test_cli_sets_them_and_meta_records_them():
    code = ("import os, json; from moebench.cli import main; main(['list']); "
            "from moebench.run.machine import capture_environment; e = capture_environment(['cpu']); "
            "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), e['threads'], e['env']]))")
    spin, threads, recorded = json.loads(_python(code))
    assert spin == "10000" and recorded["GOMP_SPINCOUNT"] == "10000"
    assert recorded["NUMBA_THREADING_LAYER_PRIORITY"] == "omp tbb workqueue"
    assert threads["set_by"] == {"GOMP_SPINCOUNT": "moebench", "NUMBA_THREADING_LAYER_PRIORITY": "moebench"}


def test_library_import_leaves_the_users_process_alone():
    # the entry modules load neither torch nor numba (settle() must run before either reads its
    # variables), and importing the library sets nothing
    code = ("import os, sys, moebench.cli, moebench.run.threads; "
            "first = 'torch' in sys.modules or 'numba' in sys.modules; "
            "import moebench.run.session, moebench.run.runner, moebench.run.machine, moebench.routers; "
            "print(first, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('NUMBA_THREADING_LAYER_PRIORITY'))")
    assert _python(code) == "False None None"


SUITE = textwrap.dedent("""\
    version: 1
    name: threads_probe
    defaults: {tokens: 4096, experts: 16, hidden: 8, top_k: 2, capacity_factor: 1.25, device: cpu, seed: 0,
               workload: uniform, drop_policy: position}
    routers: [{name: topk, params: {impl: numba}}]
    timing: {warmup_rounds: 1, min_rounds: 2, max_rounds: 2, min_time_s: 0}
""")


def test_a_run_records_the_layer_numba_ran_on(tmp_path):
    """Isolated (the worker reports it) and in-process: numba's kernels run on its OpenMP layer."""
    from moebench.core import kernels

    if not kernels.available():
        import pytest

        pytest.skip("numba is not installed")
    suite = tmp_path / "threads_probe.yaml"
    suite.write_text(SUITE)
    for flags in ([], ["--no-isolate"]):
        out = tmp_path / ("in" if flags else "iso")
        code = (f"from moebench.cli import main; print(main(['run', {str(suite)!r}, '--results', "
                f"{str(out / 'r')!r}, '--reports', {str(out / 'p')!r}, '--no-report'] + {flags!r}))")
        assert _python(code) == "0"
        (meta_path,) = (out / "r" / "threads_probe").glob("*/meta.json")
        meta = json.loads(meta_path.read_text())
        assert meta["status"] == "complete"
        assert meta["numba_threading_layer"] == "omp", flags
        assert meta["environment"]["threads"]["set_by"]["NUMBA_THREADING_LAYER_PRIORITY"] == "moebench"

"""OMP_WAIT_POLICY where moebench owns the process (the CLI, its workers), never in a library user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from moebench import thread_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", thread_env.MARKER_VAR)}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_settle_sets_passive_before_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as at the start of the moebench command
    monkeypatch.setattr(thread_env, "_origin", None)
    env: dict[str, str] = {}
    assert thread_env.settle(env) == "moebench"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert thread_env.thread_settings(env)["omp_wait_policy_set_by"] == "moebench"


def test_settle_keeps_the_users_value_and_knows_when_it_is_too_late(monkeypatch):
    monkeypatch.setattr(thread_env, "_origin", None)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert thread_env.settle(env) == "user" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    import torch  # noqa: F401  (loaded: its OpenMP runtime has read the environment already)

    env = {}
    assert thread_env.settle(env) == "too late" and env == {}
    assert thread_env.thread_settings(env) == {"omp_wait_policy": None, "omp_wait_policy_set_by": "too late",
                                               "gomp_spincount": None, "numba_threading_layer": None,
                                               "numba_num_threads": None}


def test_worker_environment():
    env = thread_env.worker_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", thread_env.MARKER_VAR: "moebench"}
    assert thread_env.worker_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_cli_sets_it_and_meta_records_it():
    code = ("import os, json; from moebench.cli import main; main(['list']); "
            "from moebench.environment import capture_environment; e = capture_environment(['cpu']); "
            "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), e['threads'], e['env'].get('OMP_WAIT_POLICY')]))")
    policy, threads, recorded = json.loads(_python(code))
    assert policy == "PASSIVE" and recorded == "PASSIVE"
    assert threads["omp_wait_policy"] == "PASSIVE" and threads["omp_wait_policy_set_by"] == "moebench"


def test_library_import_leaves_the_users_process_alone():
    # the entry modules load no torch (settle() must run before libgomp reads the variable),
    # and importing the library sets nothing
    code = ("import os, sys, moebench.cli, moebench.thread_env; first = 'torch' in sys.modules; "
            "import moebench.session, moebench.runner, moebench.environment, moebench.routers; "
            "print(first, os.environ.get('OMP_WAIT_POLICY'))")
    assert _python(code) == "False None"

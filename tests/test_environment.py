"""The environment record: keys, JSON round trip, no git needed."""

import json

from moebench.run.machine import capture_environment
from moebench.store.environment import machine_summary

KEYS = {
    "python", "platform", "hostname", "cpu_model", "logical_cores", "cpu_affinity",
    "torch", "torch_num_threads", "torch_parallel_info", "numpy", "pandas", "moebench",
    "devices", "cuda", "git", "env",
}


def test_keys_and_json(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    env = capture_environment(["cpu"])
    assert KEYS <= env.keys()
    assert json.loads(json.dumps(env)) == env
    assert env["env"]["OMP_NUM_THREADS"] == "3"
    assert "MKL_NUM_THREADS" not in env["env"]
    assert env["logical_cores"] >= 1
    assert env["torch_num_threads"] >= 1
    assert set(env["cuda"]) >= {"available", "version", "devices"}
    assert set(env["git"]) == {"commit", "dirty"}


def test_outside_git_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    env = capture_environment(["cpu"])
    assert env["git"] == {"commit": None, "dirty": None}
    json.dumps(env)


def test_without_git_binary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert capture_environment([])["git"] == {"commit": None, "dirty": None}


def test_machine_summary_literal():
    env = {"cpu_model": "Intel Xeon X", "logical_cores": 4, "cpu_affinity": [0, 1],
           "torch": "2.13.0", "cuda": {"available": False, "version": None, "devices": []}}
    assert machine_summary(env) == "Intel Xeon X (2 cores), torch 2.13.0, no CUDA"
    env["cuda"] = {"available": True, "version": "12.4",
                   "devices": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0"}]}
    assert machine_summary(env) == "Intel Xeon X (2 cores), torch 2.13.0, NVIDIA H200 (CUDA 12.4)"


def test_machine_summary_of_real_env():
    line = machine_summary(capture_environment(["cpu"]))
    assert "torch" in line and "\n" not in line


def test_only_code_changes_make_a_checkout_dirty():
    from moebench.run.machine import _counts_as_a_change

    assert _counts_as_a_change(" M moebench/cli.py") and _counts_as_a_change("A  new.py")
    assert _counts_as_a_change("?? my_router.py")  # an untracked plugin changes what ran
    assert not _counts_as_a_change("?? results/quickstart/20261203T093612Z-3ef2/")  # an earlier run's output
    assert not _counts_as_a_change("?? reports/quickstart/")
    assert _counts_as_a_change(" M results/baseline/rows.jsonl")  # a tracked result edited by hand

"""`moebench run --shard I/N` and `moebench merge`: the merged run equals the unsharded one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.core.errors import MoebenchError
from moebench.core.metrics import METRICS
from moebench.run.shards import merge_runs, parse_shard
from moebench.store.runs import load_run

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
name: shardy
version: 1
grid:
  workload: [uniform, {name: zipf, params: {s: 1.2}}, {name: hot_experts, params: {hot: 2}}]
  tokens: 128
  experts: 8
  top_k: 2
routers: [topk, expert_choice]
timing: {enabled: false, isolate: false}
"""


def runs_of(root: Path) -> list[Path]:
    return sorted((root / "shardy").iterdir())


def deterministic(rows: list[dict]) -> dict:
    keep = [m for m, spec in METRICS.items() if spec.deterministic]
    return {(r["case_id"], r["router"]): {k: r.get(k) for k in keep} for r in rows}


def test_two_shards_merged_equal_the_whole_run(tmp_path, capsys):
    suite = tmp_path / "shardy.yaml"
    suite.write_text(SUITE)
    assert main(["run", str(suite), "--results", str(tmp_path / "whole"), "--no-report"]) == 0
    for i in (0, 1):
        assert main(["run", str(suite), "--results", str(tmp_path / "parts"), "--no-report", "--shard", f"{i}/2"]) == 0
    parts = runs_of(tmp_path / "parts")
    assert sorted(load_run(p).meta()["shard"] for p in parts) == ["0/2", "1/2"]
    assert sorted(len(load_run(p).rows()) for p in parts) == [2, 4]  # cases 0, 2 and case 1
    same_code(parts)
    assert main(["merge", *map(str, parts), "--results", str(tmp_path / "merged"), "--no-report"]) == 0
    (whole,), (merged,) = runs_of(tmp_path / "whole"), runs_of(tmp_path / "merged")
    a, b = load_run(whole).rows(), load_run(merged).rows()
    assert len(a) == len(b) == 6
    assert deterministic(a) == deterministic(b)
    assert {json.dumps(r["loads"]) for r in load_run(whole).loads()} == {json.dumps(r["loads"]) for r in load_run(merged).loads()}
    assert load_run(merged).meta()["status"] == "complete"
    # the same shard twice is refused
    with pytest.raises(MoebenchError, match="distinct shards"):
        merge_runs([parts[0], parts[0]], tmp_path / "again")


def test_torchrun_splits_the_cases_and_rank_0_writes_one_run(tmp_path):
    suite = tmp_path / "shardy.yaml"
    suite.write_text(SUITE)
    assert main(["run", str(suite), "--results", str(tmp_path / "whole"), "--no-report"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MOEBENCH"))}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moebench",
         "run", str(suite), "--results", str(tmp_path / "tr"), "--no-report"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    (merged,) = runs_of(tmp_path / "tr")
    assert not (tmp_path / "tr" / ".shards").exists()
    assert sorted(load_run(merged).meta()["merged_shards"]) == ["0/2", "1/2"]
    assert deterministic(load_run(runs_of(tmp_path / "whole")[0]).rows()) == deterministic(load_run(merged).rows())


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "0/0"])
def test_bad_shard_text(text):
    with pytest.raises(MoebenchError, match="--shard"):
        parse_shard(text)


# ---------------------------------------------------------------------- #23: merge and shards

def _two_shards(tmp_path) -> tuple[Path, list[Path]]:
    suite = tmp_path / "shardy.yaml"
    suite.write_text(SUITE)
    for i in (0, 1):
        assert main(["run", str(suite), "--results", str(tmp_path / "parts"), "--no-report", "--shard", f"{i}/2"]) == 0
    parts = runs_of(tmp_path / "parts")
    same_code(parts)
    return suite, parts


def same_code(parts: list[Path]) -> None:
    """Record one git commit in every shard: other work committed between two shard runs of a
    test must not make them 'different code'."""
    env = json.loads((parts[0] / "meta.json").read_text()).get("environment")
    for p in parts[1:]:
        _set_meta(p, environment=env)


def _set_meta(run: Path, **fields) -> None:
    meta = json.loads((run / "meta.json").read_text())
    meta.update(fields)
    (run / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("suite_name", ["../../escaped", "..", "/tmp/abs", "a/b", ".hidden", 7])
def test_merge_stays_inside_results(tmp_path, suite_name):
    _, parts = _two_shards(tmp_path)
    for p in parts:
        _set_meta(p, suite=suite_name)
    root = tmp_path / "deep" / "er" / "results"
    root.mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(MoebenchError, match="suite name"):
        merge_runs(parts, root)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing created anywhere


def test_merge_refuses_a_suite_folder_symlinked_out_of_results(tmp_path):
    _, parts = _two_shards(tmp_path)
    root = tmp_path / "results"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "shardy").symlink_to(outside)
    with pytest.raises(MoebenchError, match="leads outside"):
        merge_runs(parts, root)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("name", ["suite.yaml", "rows.jsonl", "meta.json"])
def test_merge_does_not_follow_symlinked_files(tmp_path, name):
    _, parts = _two_shards(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("name: shardy\nsecret: 42\n")
    target = parts[0] / name
    if name == "meta.json":  # a symlinked meta pointing at a real meta elsewhere
        real = tmp_path / "elsewhere.json"
        real.write_text(target.read_text())
        secret = real
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(MoebenchError, match="is a symlink"):
        merge_runs(parts, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("shard", ["abc", "3/2", "1/0", 5, ["0/2"], "0/2/3"])
def test_merge_refuses_a_malformed_shard_in_meta(tmp_path, shard):
    _, parts = _two_shards(tmp_path)
    _set_meta(parts[0], shard=shard)
    with pytest.raises(MoebenchError, match="meta.json: shard is"):
        merge_runs(parts, tmp_path / "merged")


def test_merge_refuses_shards_of_different_code_unless_allowed(tmp_path, caplog):
    _, parts = _two_shards(tmp_path)
    _set_meta(parts[1], moebench_version="0.0.1-other")
    with pytest.raises(MoebenchError, match="--allow-mixed"):
        merge_runs(parts, tmp_path / "merged")
    meta = json.loads((parts[1] / "meta.json").read_text())
    meta["moebench_version"] = json.loads((parts[0] / "meta.json").read_text())["moebench_version"]
    meta.setdefault("environment", {})["git"] = {"commit": "f" * 40, "dirty": False}
    (parts[1] / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MoebenchError, match="commit ffffffffffff"):
        merge_runs(parts, tmp_path / "merged")
    with caplog.at_level("WARNING", logger="moebench.run.shards"):
        merged = merge_runs(parts, tmp_path / "merged", allow_mixed=True)
    assert "--allow-mixed" in caplog.text
    assert len(merged.rows()) == 6 and len(merged.meta()["merged_code"]) == 2
    # and through the CLI
    assert main(["merge", *map(str, parts), "--results", str(tmp_path / "m2"), "--no-report"]) == 2
    assert main(["merge", *map(str, parts), "--results", str(tmp_path / "m2"), "--no-report", "--allow-mixed"]) == 0


@pytest.mark.parametrize("flag", [["--shard", "1/2"], ["--shard", "0/3"], []])
def test_resume_as_another_shard_is_refused(tmp_path, capsys, flag):
    suite, parts = _two_shards(tmp_path)
    shard0 = next(p for p in parts if load_run(p).meta()["shard"] == "0/2")
    rows_before = (shard0 / "rows.jsonl").read_text()
    capsys.readouterr()
    assert main(["run", str(suite), "--no-report", "--resume", str(shard0), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert "that run is shard 0/2" in err and len(err.splitlines()) == 1, err
    assert (shard0 / "rows.jsonl").read_text() == rows_before
    assert load_run(shard0).meta()["shard"] == "0/2"
    # the same shard resumes
    assert main(["run", str(suite), "--no-report", "--resume", str(shard0), "--shard", "0/2"]) == 0


# ------------------------------------------------------------- #23 item 7: torchrun mistakes

EP4 = """
name: ep4
version: 1
grid: {workload: uniform, tokens: 64, experts: 4, top_k: 1, hidden: 8}
routers: [topk]
parallel: {ep: 4, experts: identity, timeout_s: 30}
timing: {enabled: false}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(**env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TORCHELASTIC", "MOEBENCH")) and k not in
            ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    good = {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    good.update(env)
    return {**base, **{k: v for k, v in good.items() if v is not None}}


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "3", "RANK": "5"}, "WORLD_SIZE=3 RANK=5: expected 0 <= RANK <= 2"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected an integer"),
    ({"RANK": None}, "TORCHELASTIC_RUN_ID is set but RANK is not"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999: expected 1 <= MASTER_PORT <= 65535"),
    ({"MASTER_ADDR": None}, "MASTER_ADDR is not set"),
    ({"LOCAL_RANK": "7"}, "LOCAL_RANK=7"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: expected 1 <= WORLD_SIZE"),
])
def test_torchrun_environment_mistakes_are_one_line(tmp_path, env, expected):
    (tmp_path / "shardy.yaml").write_text(SUITE)
    done = subprocess.run([sys.executable, "-m", "moebench", "run", "shardy.yaml", "--no-report"], cwd=tmp_path,
                          env=torchrun_env(**env), capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert expected in err and "unexpected" not in err, err
    assert not (tmp_path / "results").exists()


def test_a_rank_without_peers_gives_up_in_seconds(tmp_path):
    (tmp_path / "shardy.yaml").write_text(SUITE)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "moebench", "run", "shardy.yaml", "--no-report"], cwd=tmp_path,
                          env=torchrun_env(MOEBENCH_RENDEZVOUS_S="3"), capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert "could not join the others" in err and "within 3 s" in err, err
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("rank", ["0", "1"])
def test_suite_rank_count_is_checked_on_every_rank(tmp_path, rank):
    (tmp_path / "ep4.yaml").write_text(EP4)
    done = subprocess.run([sys.executable, "-m", "moebench", "run", "ep4.yaml", "--no-report"], cwd=tmp_path,
                          env=torchrun_env(RANK=rank, LOCAL_RANK=rank), capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert "parallel.ep is 4 but torchrun started WORLD_SIZE=2 processes" in err, err


def test_real_torchrun_with_too_few_ranks_says_so_without_a_traceback(tmp_path):
    # every rank checks (test above); under real torchrun the first rank to exit makes the agent
    # SIGTERM the others, so a slower rank may be stopped before it speaks: at least one must
    (tmp_path / "ep4.yaml").write_text(EP4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MOEBENCH"))}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--tee", "3",
         "-m", "moebench", "run", "ep4.yaml", "--no-report"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    told = [line for line in said.splitlines() if "parallel.ep is 4 but torchrun started WORLD_SIZE=2 processes" in line]
    assert 1 <= len(told) <= 2, said[-3000:]
    assert all(re.search(r"\[(rank|default)[01]\]:moebench: error: ep4.yaml: ", line) for line in told), told
    assert "unexpected" not in said and "RuntimeError" not in said, said[-3000:]

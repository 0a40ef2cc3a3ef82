"""`moebench run --shard I/N` and `moebench merge`: the merged run equals the unsharded one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

"""`moebench export --format asv`: runs of three commits become asv results, and `asv publish`
draws their history (docs/ci.md, "History over commits")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.compare.asv_results import run_results

pytest.importorskip("asv", reason="the history extra: pip install -e '.[history]'")

SUITE = """
name: history_tiny
version: 1
grid:
  workload: [uniform, {name: zipf, params: {s: 1.2}}]
  tokens: 128
  experts: 4
  top_k: 1
  capacity_factor: 1.0
routers: [switch, topk]
timing: {warmup_rounds: 1, min_rounds: 6, max_rounds: 6, min_time_s: 0.0, threads: 1, isolate: false}
"""


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=60, check=True)
    return done.stdout.strip()


@pytest.fixture
def three_commits(tmp_path) -> tuple[Path, list[str]]:
    """A scratch repository with three commits on main."""
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    commits = []
    for i in range(3):
        (repo / "router.py").write_text(f"SLOWDOWN = {i}\n")
        _git(repo, "add", "router.py")
        _git(repo, "commit", "-q", "-m", f"commit {i}", "--date", f"2026-01-0{i + 1}T00:00:00")
        commits.append(_git(repo, "rev-parse", "HEAD"))
    return repo, commits


def _runs(tmp_path: Path, commits: list[str]) -> list[Path]:
    """One tiny run per commit, its meta.json saying it was made at that commit."""
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    path = tmp_path / "history_tiny.yaml"
    path.write_text(SUITE)
    runs = []
    for commit in commits:
        run = execute(load_suite(path), RunOptions(results_root=tmp_path / "results")).path
        meta_path = Path(run) / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["environment"]["git"] = {"commit": commit, "dirty": False}
        meta_path.write_text(json.dumps(meta))
        runs.append(Path(run))
    return runs


def test_asv_publish_draws_three_commits(tmp_path, three_commits, capsys):
    repo, commits = three_commits
    runs = _runs(tmp_path, commits)
    out = tmp_path / "asv" / "results"
    assert main(["export", *map(str, runs[:2]), "--format", "asv", "--out", str(out), "--machine", "ci-runner"]) == 0
    assert main(["export", str(runs[2]), "--format", "asv", "--out", str(out), "--machine", "ci-runner"]) == 0
    results = sorted(p.name for p in (out / "ci-runner").glob("*.json") if p.name != "machine.json")
    assert [name[:8] for name in results] == sorted(c[:8] for c in commits)
    assert json.loads((out / "ci-runner" / "machine.json").read_text())["machine"] == "ci-runner"
    benchmarks = json.loads((out / "benchmarks.json").read_text())
    assert benchmarks["version"] == 2
    route = benchmarks["history_tiny.time_route"]
    assert route["type"] == "time" and route["unit"] == "seconds" and route["param_names"] == ["case", "router"]
    assert route["params"][1] == ["'switch'", "'topk'"] and len(route["params"][0]) == 2
    assert benchmarks["history_tiny.track_imbalance"]["type"] == "track"

    conf = tmp_path / "asv" / "asv.conf.json"
    conf.write_text(json.dumps({"version": 1, "project": "history_tiny", "repo": str(repo), "branches": ["main"],
                                "dvcs": "git", "results_dir": "results", "html_dir": "html"}))
    done = subprocess.run([sys.executable, "-m", "asv", "publish", "--config", str(conf), "--no-pull"],
                          cwd=conf.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    html = conf.parent / "html"
    assert (html / "index.html").exists()
    index = json.loads((html / "index.json").read_text())
    assert set(index["revision_to_hash"].values()) == set(commits)
    assert "history_tiny.time_route" in index["benchmarks"]
    graph = next(p for p in html.glob("graphs/**/history_tiny.time_route.json") if "machine-ci-runner" in str(p))
    points = json.loads(graph.read_text())
    assert len(points) == 3  # one point per commit, each with a value per (case, router)
    assert all(len(values) == 4 and all(v > 0 for v in values) for _, values in points)


def test_run_results_layout_and_errors(tmp_path):
    meta = {"suite": "s", "started_at": "2026-01-01T00:00:00+00:00",
            "environment": {"git": {"commit": "a" * 40}, "hostname": "host one", "python": "3.11.7",
                            "torch": "2.13.0", "platform": "Linux-6-x86_64-with-glibc2.36"}}
    rows = [{"case_id": "c1", "router": "r", "imbalance": 1.5, "route.median_ms": 2.0, "route.q1_ms": 1.9,
             "route.q3_ms": 2.2, "route.rounds": 10, "route.iqr_ms": 0.3, "model.ep8.layer_ms": 4.0},
            {"case_id": "c2", "router": "r", "imbalance": 1.25}]
    benchmarks, machine, doc, rel = run_results(meta, rows)
    assert rel == f"host-one/aaaaaaaa-{doc['env_name']}.json" and machine["arch"] == "x86_64"
    assert set(benchmarks) == {"s.time_route", "s.track_imbalance", "s.track_model_ep8_layer_ms"}
    columns = doc["result_columns"]
    route = dict(zip(columns, doc["results"]["s.time_route"]))
    assert route["result"] == [0.002, None] and route["stats_q_25"] == [0.0019, None]
    assert route["stats_repeat"] == [10, None] and route["stats_ci_99_a"] is None  # ours is a 95% CI
    assert dict(zip(columns, doc["results"]["s.track_imbalance"]))["result"] == [1.5, 1.25]
    assert benchmarks["s.track_model_ep8_layer_ms"]["unit"] == "ms"
    from moebench.core.errors import MoebenchError

    with pytest.raises(MoebenchError, match="environment.git.commit"):
        run_results({**meta, "environment": {}}, rows)
    with pytest.raises(MoebenchError, match="--out DIR is required"):
        main_args = ["export", "x", "--format", "asv"]
        from moebench.cli import _cmd_export, build_parser

        _cmd_export(build_parser().parse_args(main_args))

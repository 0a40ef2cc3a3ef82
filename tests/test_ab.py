"""`moebench ab`: the statistics on known samples, and the pull-request recipe end to end in a
scratch git repository holding a suite and a plugin router package (tests/fixtures/ab_plugin)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from moebench.compare.ab import stats
from moebench.compare.ab.driver import Cell, Group, calls_for, make_cells, make_groups
from moebench.compare.ab.stats import Interval, shift_interval, verdict

FIXTURE = Path(__file__).parent / "fixtures" / "ab_plugin"
ROOT = Path(__file__).resolve().parents[1]


# --- statistics --------------------------------------------------------------------------------


def test_hodges_lehmann_by_hand():
    # Walsh averages of (1, 2, 9): 1, 1.5, 5, 2, 5.5, 9 -> sorted 1, 1.5, 2, 5, 5.5, 9; median 3.5
    assert stats.hodges_lehmann([1, 2, 9]) == pytest.approx(3.5)
    assert list(stats.walsh_averages([1, 2, 9])) == [1, 1.5, 2, 5, 5.5, 9]
    # an outlier moves the mean far, the HL estimate a little: (0, 0.1, 0.2, 0.3, 10)
    assert stats.hodges_lehmann([0, 0.1, 0.2, 0.3, 10]) == pytest.approx(0.2)


def test_signed_rank_null_by_hand():
    # n = 3: T+ takes 0..6 with counts 1,1,1,2,1,1,1 over 8 subsets
    cdf = stats._signed_rank_cdf(3)
    assert np.allclose(cdf * 8, [1, 2, 3, 5, 6, 7, 8])
    # n = 6 at 5% two-sided: P(T+ <= 0) = 1/64 <= 0.025 < P(T+ <= 1) = 2/64 -> depth 1
    assert stats.signed_rank_depth(6, 0.05) == 1
    assert stats.signed_rank_depth(5, 0.05) == 0  # 1/32 > 0.025: no 95% interval from 5 pairs
    assert stats.min_pairs(0.05) == 6
    assert stats.signed_rank_coverage(6, 1) == pytest.approx(1 - 2 / 64)


@pytest.mark.parametrize("n", [6, 9, 15, 30])
def test_interval_is_the_inverted_wilcoxon_test(n):
    """Just inside the interval scipy's exact signed-rank test does not reject; just outside it does."""
    rng = np.random.default_rng(n)
    d = rng.normal(0.1, 1.0, n)
    alpha = 0.05
    iv = shift_interval(d, alpha)
    eps = 1e-9
    for theta, rejects in ((iv.low - eps, True), (iv.low + eps, False), (iv.high - eps, False), (iv.high + eps, True)):
        p = sps.wilcoxon(d - theta, method="exact").pvalue
        assert (p <= alpha) == rejects, (theta, p)


def test_interval_covers_the_centre():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 2000
    for _ in range(trials):
        d = rng.standard_t(3, 12) * 0.05 + 0.1  # heavy-tailed, symmetric about 0.1
        iv = shift_interval(d, 0.05)
        hits += iv.low <= 0.1 <= iv.high
    assert 0.94 <= hits / trials <= 0.99  # exact coverage at n = 12 is 95.8%


def test_normal_approximation_agrees_with_exact_depth():
    n = stats.EXACT_MAX_N
    exact = stats.signed_rank_depth(n, 0.01)
    m = n * (n + 1) / 2
    sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    approx = math.floor(m / 2 - 2.5758293 * sd + 0.5)
    assert abs(exact - approx) <= 0.002 * m
    assert stats.signed_rank_depth(n + 1, 0.01) > 0


def _iv(lo: float, hi: float) -> Interval:
    return Interval(10, (math.log(lo) + math.log(hi)) / 2, math.log(lo), math.log(hi), 0.05)


@pytest.mark.parametrize("lo,hi,expected", [
    (1.03, 1.10, "slower"), (1.02, 1.10, "undecided"), (0.90, 0.97, "faster"), (0.90, 0.98, "undecided"),
    (0.985, 1.015, "same"), (0.98, 1.02, "same"), (0.97, 1.01, "undecided"), (0.99, 1.05, "undecided"),
])
def test_verdict_rules(lo, hi, expected):
    assert verdict(_iv(lo, hi), 0.02) == expected


def test_too_few_pairs_is_undecided():
    iv = shift_interval([0.5, 0.6, 0.7], 0.05)  # 3 pairs cannot reach 95%
    assert math.isinf(iv.low) and verdict(iv, 0.02) == "undecided"


def test_look_alpha_spends_at_most_alpha():
    interim = sum(stats.look_alpha(0.05, k, 7) * 7 for k in range(1, 10_000))
    final = stats.look_alpha(0.05, 3, 7, final=True) * 7
    assert interim + final <= 0.05 and interim + final == pytest.approx(0.05, rel=1e-3)
    assert final == pytest.approx(0.05 * stats.FINAL_SHARE)  # the end is not judged at a shrunk level
    assert stats.look_alpha(0.05, 1, 7) == pytest.approx(0.05 * (1 - stats.FINAL_SHARE) / 7 / 2)
    assert stats.look_schedule(10, 1.5)[:4] == [10, 15, 22, 33]


def test_group_round_values_average_the_cases():
    cells = [Cell("k1", "c1", "r", "route", "cpu", (0, 0), (1, 1), 1, 0, pairs=[(1.0, 2.0, 0), (1.0, 1.0, 1)]),
             Cell("k2", "c2", "r", "route", "cpu", (1, 1), (1, 1), 1, 0, pairs=[(2.0, 2.0, 0), (1.0, 4.0, 1)])]
    g = Group("r", "route", "cpu", cells)
    assert g.round_values() == pytest.approx([math.log(2) / 2, math.log(4) / 2])


def test_cells_match_and_size_blocks():
    import random

    a = [{"key": "x", "case_id": "c", "router": "r", "phase": "route", "device": "cpu", "status": "ok",
          "est_ms": 0.5, "index": 0},
         {"key": "y", "case_id": "c", "router": "r", "phase": "combine", "device": "cpu", "status": "skipped",
          "est_ms": None, "index": None}]
    b = [dict(a[0], est_ms=0.25, index=3), dict(a[1])]
    cells = make_cells(a, b, 5.0, random.Random(0))
    assert [(c.key, c.index, c.calls) for c in cells] == [("x", (0, 3), 20)]
    assert calls_for(5.0, (100.0, 200.0)) == 1
    assert len(make_groups(cells)) == 1


class _NullWorker:
    """A side whose every block is ``calls`` lognormal calls around 1 ms: A and B alike."""

    def __init__(self, rng: np.random.Generator, sd: float):
        self.rng, self.sd = rng, sd

    def request(self, req: dict) -> dict:
        return {"ms": list(np.exp(self.rng.normal(0.0, self.sd, req["calls"])))}


def _null_family_alarms(sims: int, alpha: float, groups: int, rounds: int, seed: int = 0,
                        rotate: bool = False) -> float:
    """Share of simulated `ab` runs of identical sides (min_effect 0) in which any group got a
    verdict other than undecided: interim looks on the driver's schedule, then the final look."""
    from moebench.compare.ab.driver import Driver, Settings

    rng = np.random.default_rng(seed)
    alarms = 0
    for sim in range(sims):
        cells = [Cell(f"k{g}.{c}", f"c{c}", f"r{g}", "route", "cpu", (0, 0), (1.0, 1.0), 3, c % 2)
                 for g in range(groups) for c in range(2)]
        driver = Driver((_NullWorker(rng, 0.3), _NullWorker(rng, 0.3)), make_groups(cells),
                        Settings(alpha=alpha, min_effect=0.0, seed=sim), progress=lambda text: None)
        for g in driver.groups:
            g.rotating = rotate
        for _ in range(rounds):
            driver._round()
            if driver.rounds in driver.schedule:
                driver.look()
        driver.look(final=True)
        alarms += any(g.verdict in ("slower", "faster") for g in driver.groups)
    return alarms / sims


@pytest.mark.parametrize("rotate", [False, True])
def test_sequential_looks_keep_the_family_false_alarm_rate_under_alpha(rotate):
    # 4 router-phases, interim looks on the schedule and a final one at 40 pairs: the family's
    # alarms (any wrong verdict at any look) stay within alpha, with 3 sigma of slack; rotating
    # (one case per group and round) as well as averaging both cases each round
    rate = _null_family_alarms(sims=300, alpha=0.2, groups=4, rounds=40, rotate=rotate)
    assert rate <= 0.2 + 3 * math.sqrt(0.2 * 0.8 / 300), rate


def test_rotation_cycles_the_cases_and_alternates_the_first_side():
    from moebench.compare.ab.driver import Driver, Settings

    cells = [Cell(f"k{c}", f"c{c}", "r", "route", "cpu", (c, c), (1.0, 1.0), 2, 0) for c in range(3)]
    driver = Driver((_NullWorker(np.random.default_rng(0), 0.1), _NullWorker(np.random.default_rng(1), 0.1)),
                    make_groups(cells), Settings(seed=0), progress=lambda text: None)
    (g,) = driver.groups
    g.rotating = True
    for _ in range(6):
        driver._round()
    assert [len(c.pairs) for c in cells] == [2, 2, 2]  # one case a round, each in turn
    assert all([p[2] for p in c.pairs] == [0, 1] for c in cells)  # A first, then B first, per case
    assert len(g.round_values()) == 6 == driver.rounds


# --- the pull-request recipe, end to end --------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _ab(repo: Path, results: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moebench", "ab", "suite.yaml", "--results", str(results), "--seed", "7", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)


def _slow_down(repo: Path, fraction: float, version: str) -> None:
    (repo / "abplug" / "slowdown.json").write_text(json.dumps({"default": fraction}))
    (repo / "abplug" / "VERSION").write_text(version + "\n")
    _git(repo, "commit", "-qam", f"plugin {fraction:.0%} slower")


@pytest.fixture
def scratch_repo(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "suite and plugin router")
    return repo


# the 10% (MOEBENCH_AB_SLOWDOWN to try others); --fail-fast stops at the first `slower`, so
# the 150 s budget is a ceiling, not the cost. --alpha 0.01: this test runs in every CI job
SLOWDOWN = float(os.environ.get("MOEBENCH_AB_SLOWDOWN", "0.1"))
BUDGET_S = os.environ.get("MOEBENCH_AB_BUDGET_S", "60")  # the unchanged pair spends it all (nothing settles "same" fast)


def test_pr_recipe_end_to_end(scratch_repo, tmp_path):
    repo, results = scratch_repo, tmp_path / "results"
    _git(repo, "commit", "-q", "--allow-empty", "-m", "an unrelated change")

    same = _ab(repo, results, "--base", "HEAD~1", "--budget-s", BUDGET_S, "--alpha", "0.01")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "result: PASS" in same.stdout
    abjson = json.loads(next(results.glob("ab/abtest/*/ab.json")).read_text())
    assert not [r for r in abjson["summary"] if r["verdict"] == "slower"]
    # the worktree was removed afterwards
    assert "moebench-ab-" not in _git(repo, "worktree", "list")

    _slow_down(repo, SLOWDOWN, "2")
    slow = _ab(repo, results, "--base", "HEAD~1", "--budget-s", "150", "--fail-fast", "--alpha", "0.01",
               "--json", str(tmp_path / "ab.json"))
    assert slow.returncode == 1, slow.stdout + slow.stderr
    latest = sorted(results.glob("ab/abtest/*/ab.json"))[-1]
    doc = json.loads(latest.read_text())
    assert json.loads((tmp_path / "ab.json").read_text()) == doc
    flagged = {(r["router"], r["phase"]) for r in doc["summary"] if r["verdict"] == "slower"}
    assert flagged == {("plugin", "route")}, slow.stdout
    assert "FAIL: 1 slower (plugin route" in slow.stdout
    assert doc["deterministic"]["regressions"] == 0  # the routing did not change, only its speed
    # each side ran its own version of the plugin, from its own tree
    metas = {s: json.loads((latest.parent / s / "meta.json").read_text()) for s in ("A", "B")}
    code_a, code_b = metas["A"]["router_code"]["plugin"], metas["B"]["router_code"]["plugin"]
    assert (code_a["version"], code_b["version"]) == ("1", "2")
    assert code_b["file"] == str(repo / "abplug" / "__init__.py")
    assert code_a["file"].startswith(metas["A"]["ab"]["tree"]) and metas["A"]["ab"]["worktree"]
    # the per-side run folders are ordinary runs: compare reads them
    from moebench.compare.verdicts import compare_runs

    assert compare_runs(latest.parent / "A", latest.parent / "B", metrics="deterministic").exit_code == 0
    assert "moebench-ab-" not in _git(repo, "worktree", "list")


@pytest.mark.parametrize("phases", ["rout", "", "route,,x"])
def test_bad_phases_are_one_line_error(scratch_repo, tmp_path, phases):
    done = _ab(scratch_repo, tmp_path / "r", "--base", "HEAD", "--phases", phases)
    assert done.returncode == 2 and done.stderr.strip().startswith("moebench: error: ab: --phases"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_revision_is_one_line_error(scratch_repo, tmp_path):
    done = _ab(scratch_repo, tmp_path / "r", "--base", "no-such-ref", "--budget-s", "30")
    assert done.returncode == 2
    assert "--base no-such-ref: no such revision" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_duet_stops_once_every_verdict_is_settled(scratch_repo, tmp_path):
    """Duet mode (both sides at once, one core each); with a wide margin every router-phase
    settles `same` at the first look and the command stops before its budget."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("duet needs two cores")
    results = tmp_path / "results"
    done = _ab(scratch_repo, results, "--base", "HEAD", "--head", "HEAD", "--mode", "duet",
               "--min-effect", "0.5", "--budget-s", "240", "--phases", "combine,route")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(next(results.glob("ab/abtest/*/ab.json")).read_text())
    assert doc["mode"] == "duet" and doc["stopped_by"] == "settled", doc["looks"]
    assert {r["verdict"] for r in doc["summary"]} == {"same"}
    assert doc["phases"] == ["route", "combine"] and {c["phase"] for c in doc["cells"]} == {"route", "combine"}
    assert {(r["router"], r["phase"]) for r in doc["summary"]} == {(r, p) for r in ("topk", "plugin")
                                                                   for p in ("route", "combine")}
    assert doc["pairs"] == doc["looks"][-1]["pairs"] < 40
    assert {p["first"] for c in doc["cells"] for p in c["pairs"]} == {"A", "B"}  # cores swapped


def test_sigterm_removes_worktrees_and_workers(scratch_repo, tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "moebench", "ab", "suite.yaml", "--base", "HEAD",
                             "--results", str(tmp_path / "r"), "--budget-s", "300"],
                            cwd=scratch_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    folder = None
    while time.monotonic() < deadline and folder is None:
        listed = _git(scratch_repo, "worktree", "list")
        folder = next((line.split()[0] for line in listed.splitlines() if "moebench-ab-" in line), None)
        time.sleep(0.2)
    assert folder is not None, "no worktree appeared"
    time.sleep(2)  # the workers are starting
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert "moebench-ab-" not in _git(scratch_repo, "worktree", "list")
    assert not Path(folder).exists()

"""`moebench compare`: verdicts and exit codes on hand-made runs, and injected regressions caught
end to end on real (quick) runs."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.compare.verdicts import Comparison, Gate, NoiseRule, compare_runs, load_side, parse_gate
from moebench.core.errors import MoebenchError
from moebench.routers.registry import register
from moebench.routers.token_choice import TopK

RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"
UNIFORM = "uniform-T1024-E8-k1-cf1.25-position-float32-cpu-s0-0a1b2c3d"
ZIPF = "zipf-T1024-E8-k1-cf1.25-position-float32-cpu-s0-4e5f6a7b"


def cli(capsys, *args) -> tuple[int, str, str]:
    """`moebench compare --details ARGS`: the summary, then one line per changed cell."""
    code = main(["compare", "--details", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def run(name: str) -> Path:
    return RUNS / name


def lines(out: str, tag: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(tag + " ")]


# ----------------------------------------------------------------------------- fixture runs


def test_identical_runs_pass(capsys):
    code, out, _ = cli(capsys, run("base"), run("same"))
    assert code == 0
    assert out.splitlines()[0].startswith("4 rows compared, 0 regressions, 0 improvements")
    assert not lines(out, "REGRESSION") and not lines(out, "IMPROVEMENT")


def test_deterministic_metric_worse_fails_and_is_listed(capsys):
    code, out, _ = cli(capsys, run("base"), run("det_worse"))
    assert code == 1
    assert "2 regressions" in out.splitlines()[0]
    assert f"REGRESSION {ZIPF} topk drop_rate: 0.1 -> 0.15 (+50.0%)" in out
    assert f"REGRESSION {ZIPF} topk imbalance: 1.5 -> 1.6 (+6.7%)" in out


def test_improvements_pass_and_are_listed(capsys):
    code, out, _ = cli(capsys, run("base"), run("improved"))
    assert code == 0
    improved = lines(out, "IMPROVEMENT")
    assert f"IMPROVEMENT {UNIFORM} switch imbalance: 1.1 -> 1.05 (-4.5%)" in improved
    assert sum("switch route.median_ms" in line for line in improved) == 2
    assert "0 regressions, 3 improvements" in out.splitlines()[0]


def test_time_slower_with_separate_cis_fails(capsys):
    code, out, _ = cli(capsys, run("base"), run("slow_apart"))
    assert code == 1
    regressed = lines(out, "REGRESSION")
    assert len(regressed) == 4 and all("route.median_ms" in line and "(+30.0%)" in line for line in regressed)
    assert f"REGRESSION {UNIFORM} switch route.median_ms: 1 -> 1.3 (+30.0%)" in regressed


def test_time_slower_with_overlapping_cis_passes(capsys):
    code, out, _ = cli(capsys, run("base"), run("slow_overlap"))
    assert code == 0 and not lines(out, "REGRESSION")
    c = compare_runs(run("base"), run("slow_overlap"))
    details = {v.detail for r in c.rows for v in r.verdicts if v.metric == "route.median_ms"}
    assert details == {"95% CIs overlap"}


def test_one_slow_case_of_two_is_noise_unless_consistency_is_off(capsys):
    code, out, _ = cli(capsys, run("base"), run("one_slow"))
    assert code == 0
    code, out, _ = cli(capsys, run("base"), run("one_slow"), "--consistency", "0")
    assert code == 1 and lines(out, "REGRESSION") == [
        f"REGRESSION {ZIPF} topk route.median_ms: 1.1 -> 1.43 (+30.0%)"
    ]


def test_noise_rule_threshold_and_min_difference(capsys):
    assert cli(capsys, run("base"), run("slow_apart"), "--threshold", "40")[0] == 0
    assert cli(capsys, run("base"), run("slow_apart"), "--threshold", "20%")[0] == 1
    assert cli(capsys, run("base"), run("slow_apart"), "--min-diff-ms", "0.5")[0] == 0


def test_no_matched_rows_is_exit_2(capsys):
    code, out, _ = cli(capsys, run("base"), run("disjoint"))
    assert code == 2
    assert out.splitlines()[0].startswith("0 rows compared") and "4 rows only in A, 4 only in B" in out
    assert "nothing compared" in out


@pytest.mark.parametrize(
    "gate, expected",
    [
        ("drop_rate:0", 1),  # worse by more than 0 absolute
        ("drop_rate:0.04", 1),  # worse by 0.05
        ("drop_rate:0.06", 0),
        ("drop_rate:49%", 1),  # worse by 50%
        ("drop_rate:60%", 0),
        ("imbalance:1%", 1),  # worse by 6.7%
        ("imbalance:10%", 0),
        ("cv:0", 0),  # only the gated metric can fail
    ],
)
def test_fail_on_thresholds_on_deterministic_metrics(capsys, gate, expected):
    code, out, _ = cli(capsys, run("base"), run("det_worse"), "--fail-on", gate)
    assert code == expected
    if expected == 0:  # the ungated worsening is still reported
        assert lines(out, "WORSE (not gating)")


@pytest.mark.parametrize(
    "gate, expected",
    [("route.median_ms:20%", 1), ("route.median_ms:35%", 0), ("route.median_ms:0.2", 1), ("route.median_ms:0.5", 0)],
)
def test_fail_on_thresholds_on_times(capsys, gate, expected):
    assert cli(capsys, run("base"), run("slow_apart"), "--fail-on", gate)[0] == expected


def test_fail_on_several_gates_and_time_gate_keeps_ci_rule(capsys):
    code, out, _ = cli(capsys, run("base"), run("det_worse"), "--fail-on", "imbalance:10%", "--fail-on", "drop_rate:0")
    assert code == 1 and len(lines(out, "REGRESSION")) == 1
    assert cli(capsys, run("base"), run("slow_overlap"), "--fail-on", "route.median_ms:1%")[0] == 0


def test_unknown_fail_on_metric_is_exit_2_with_did_you_mean(capsys):
    code, _, err = cli(capsys, run("base"), run("same"), "--fail-on", "drop_rat:0")
    assert code == 2 and "did you mean 'drop_rate'" in err
    code, _, err = cli(capsys, run("base"), run("same"), "--fail-on", "route.median:10%")
    assert code == 2 and "did you mean 'route.median_ms'" in err
    assert cli(capsys, run("base"), run("same"), "--fail-on", "drop_rate:lots")[0] == 2
    assert cli(capsys, run("base"), run("same"), "--fail-on", "drop_rate")[0] == 2


def test_metrics_selection(capsys):
    assert cli(capsys, run("base"), run("slow_apart"), "--metrics", "deterministic")[0] == 0
    assert cli(capsys, run("base"), run("det_worse"), "--metrics", "time")[0] == 0
    code, _, err = cli(capsys, run("base"), run("same"), "--metrics", "deterministic", "--fail-on", "route.median_ms:5%")
    assert code == 2 and "not among the compared metrics" in err
    c = compare_runs(run("base"), run("same"), metrics="deterministic")
    assert all(not v.metric.endswith("_ms") for r in c.rows for v in r.verdicts)


def test_cross_machine_times_are_relative_to_the_reference_kernel(capsys):
    code, out, _ = cli(capsys, run("base"), run("machine_b"))  # 2x slower machine, 2x slower routes
    assert code == 0 and "times: relative" in out and "relative to the reference kernel 'fixture-kernel'" in out
    code, out, _ = cli(capsys, run("base"), run("machine_b"), "--absolute", "--consistency", "0")
    assert code == 1 and "times: absolute" in out
    code, out, _ = cli(capsys, run("base"), run("machine_b"), "--absolute")  # all 2x: nothing stands out
    assert code == 0 and "12 of 12 medians are slower in B" in out
    code, out, _ = cli(capsys, run("base"), run("machine_b_slow"))  # routes 1.5x beyond the machine
    assert code == 1 and len(lines(out, "REGRESSION")) == 4
    assert all("route.median_ms" in line and "(+50.0%)" in line for line in lines(out, "REGRESSION"))


def test_a_busier_machine_is_not_a_regression(capsys):
    code, out, _ = cli(capsys, run("base"), run("busy"))  # every time 1.4x: nothing stands out
    assert code == 0 and "cpu: 12 of 12 medians are slower in B" in out
    assert cli(capsys, run("base"), run("busy"), "--consistency", "0")[0] == 1


def _busy_sides(slow: dict[str, float], machine: float = 1.4, cases: int = 6):
    """Two sides of routers r0..r3 on ``cases`` cases with tight CIs: B's every median is
    ``machine`` times A's, and the routers in ``slow`` are that many times slower again."""
    def side(factor_of):
        rows = [{"case_id": f"c{i}", "router": r, "status": "ok", "device": "cpu", "imbalance": 1.0,
                 "route.median_ms": 1.0 * factor_of(r), "route.rounds": 20,
                 "route.ci_low_ms": 0.99 * factor_of(r), "route.ci_high_ms": 1.01 * factor_of(r)}
                for i in range(cases) for r in ("r0", "r1", "r2", "r3")]
        return {"environment": {"cpu_model": "x", "hostname": "h"}}, rows
    return side(lambda r: 1.0), side(lambda r: machine * slow.get(r, 1.0))


@pytest.mark.parametrize("extra, verdict", [(3.0, "worse"), (1.2, "worse"), (1.05, "unchanged")])
def test_a_router_that_stands_out_from_a_busier_machine_is_judged(extra, verdict):
    # every median is 1.4x slower (all CIs apart: the share rule alone sees nothing stand out);
    # r0 is ``extra`` times slower again: judged by its ratio over the others' median ratio
    a, b = _busy_sides({"r0": extra})
    c = compare_runs(a, b)
    groups = {g.router: g for g in c.time_groups if g.metric == "route.median_ms"}
    assert groups["r0"].verdict == ("REGRESSION" if verdict == "worse" else "unchanged"), groups["r0"].reason
    assert all(groups[r].verdict == "unchanged" for r in ("r1", "r2", "r3"))
    assert c.exit_code == (1 if verdict == "worse" else 0)
    assert any("24 of 24 medians are slower in B" in n for n in c.notes)


def test_relative_needs_reference_times():
    meta, rows = load_side(run("base"))
    bare = ({k: v for k, v in meta.items() if k != "reference"}, rows)
    assert compare_runs(run("base"), run("same"), mode="relative").mode == "relative"
    with pytest.raises(MoebenchError, match="reference"):
        compare_runs(bare, (meta, rows), mode="relative")
    other = dict(meta, environment=dict(meta["environment"], hostname="elsewhere"))
    c = compare_runs(bare, (other, rows))  # machines differ, no reference: raw, with a note
    assert c.mode == "absolute" and any("different machines" in n for n in c.notes)


def test_row_that_now_errors_is_a_regression():
    meta, rows = load_side(run("base"))
    broken = [dict(r, status="error", reason="RuntimeError: boom") if r["router"] == "topk" else r for r in rows]
    c = compare_runs((meta, rows), (meta, broken))
    assert c.exit_code == 1 and c.matched == 2 and len(c.failing) == 2
    assert {(v.metric, v.a, v.b) for v in c.regressions} == {("status", "ok", "error")}


def test_json_output_has_every_row_and_metric(capsys, tmp_path):
    out_file = tmp_path / "cmp.json"
    code, out, _ = cli(capsys, run("base"), run("det_worse"), "--json", out_file)
    data = json.loads(out_file.read_text())
    assert code == data["exit_code"] == 1 and data["matched"] == 4 and data["regressions"] == 2
    row = next(r for r in data["rows"] if r["case_id"] == ZIPF and r["router"] == "topk")
    assert row["metrics"]["drop_rate"]["verdict"] == "worse" and row["metrics"]["drop_rate"]["regression"]
    assert row["metrics"]["route.median_ms"]["verdict"] == "unchanged"
    assert row["metrics"]["route.iqr_ms"]["verdict"] == "info"
    assert data["noise_rule"] == {"threshold": 0.1, "min_diff_ms": 0.01, "consistency": 2 / 3, "margin": 0.5, "min_cases": 2}
    assert data["summary"][0]["verdict"] == "REGRESSION" and data["summary"][0]["metric"] == "imbalance"


def test_baseline_file_and_suite_folder_as_sides(capsys, tmp_path):
    baseline = tmp_path / "baseline" / "fixture.json"
    assert main(["export", str(run("base")), "--format", "baseline", "--out", str(baseline)]) == 0
    capsys.readouterr()
    assert cli(capsys, baseline, run("same"))[0] == 0
    assert cli(capsys, baseline, run("det_worse"), "--metrics", "deterministic")[0] == 1
    suite_dir = tmp_path / "results" / "fixture"
    shutil.copytree(run("base"), suite_dir / "20260101T000000Z-0000")
    shutil.copytree(run("det_worse"), suite_dir / "20260102T000000Z-0000")  # the latest
    assert load_side(suite_dir) == load_side(run("det_worse"))


def test_load_side_errors(tmp_path):
    with pytest.raises(MoebenchError, match="no such run folder"):
        load_side(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MoebenchError, match="not a baseline file"):
        load_side(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(MoebenchError, match="not a baseline file"):
        load_side(bad)
    with pytest.raises(MoebenchError, match="holds no runs"):
        load_side(tmp_path)


def test_public_api():
    c = compare_runs(run("base"), run("det_worse"), fail_on=["drop_rate:0", Gate("imbalance", 0.5, True)])
    assert isinstance(c, Comparison) and c.exit_code == 1 and c.matched == 4
    assert [v.metric for v in c.regressions] == ["drop_rate"]
    assert c.unmatched == {"only_in_a": 0, "only_in_b": 0}
    assert parse_gate("route.median_ms:10%") == Gate("route.median_ms", 0.10, True)
    assert parse_gate("drop_rate:0") == Gate("drop_rate", 0.0, False)
    assert NoiseRule().threshold == 0.10


# ------------------------------------------------------------------ injected regressions, end to end

SLOW_MS = 50.0  # far above what a busy 2-core machine adds to a 0.1 ms top-k


@register("slow_topk_for_tests")
@dataclass(frozen=True)
class SlowTopK(TopK):
    """top-k that sleeps before routing: an injected speed regression with identical routing."""

    def route(self, inputs, ctx):
        time.sleep(SLOW_MS / 1e3)
        return super().route(inputs, ctx)


SUITE = """
name: {name}
version: 1
grid:
  workload: {workload}
  tokens: {tokens}
  experts: {experts}
  top_k: {top_k}
  capacity_factor: 1.0
routers: [{{name: {router}, label: r}}]
timing: {{warmup_rounds: 1, min_rounds: {rounds}, max_rounds: {rounds}, min_time_s: 0.0, threads: 1, enabled: {timed}, isolate: false}}
"""


def execute_suite(tmp_path: Path, name: str, quick: bool = True, rounds: int = 5, **fields) -> Path:
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    path = tmp_path / f"{name}.yaml"
    path.write_text(SUITE.format(name=name, rounds=rounds, **fields))
    return execute(load_suite(path), RunOptions(results_root=tmp_path / "results", quick=quick)).path


def test_injected_slow_router_is_caught(tmp_path, capsys):
    fields = dict(workload="[uniform, {name: zipf, params: {s: 1.2}}, hot_experts]", tokens=256, experts="[4, 8]",
                  top_k=1, timed="true")
    # 6 rounds: the fewest with a 95% CI of the median (min-max covers 1 - 2/64 = 96.9%)
    a = execute_suite(tmp_path, "speed", quick=False, rounds=6, router="topk", **fields)
    b = execute_suite(tmp_path, "speed", quick=False, rounds=6, router="slow_topk_for_tests", **fields)
    code, out, _ = cli(capsys, a, b)
    assert code == 1, out
    regressed = lines(out, "REGRESSION")
    assert sum(" r route.median_ms" in line for line in regressed) >= 4  # of 6 cases (consistency: 2/3)
    assert all(".median_ms" in line for line in regressed)  # routing itself is the same
    assert cli(capsys, a, b, "--metrics", "deterministic")[0] == 0  # same routing


def test_quick_runs_give_not_enough_rounds_not_a_regression(tmp_path, capsys):
    # --quick times 3-5 rounds: no 95% CI of the median exists, so even a 50 ms slower router
    # is not judged; the verdict says why and the comparison passes
    fields = dict(workload="uniform", tokens=256, experts=4, top_k=1, timed="true")
    a = execute_suite(tmp_path, "quick", router="topk", **fields)
    b = execute_suite(tmp_path, "quick", router="slow_topk_for_tests", **fields)
    code, out, _ = cli(capsys, a, b)
    assert code == 0, out
    assert "medians not judged: too few rounds" in out and not lines(out, "REGRESSION")
    c = compare_runs(a, b)
    verdicts = {v.metric: v for r in c.rows for v in r.verdicts}
    assert verdicts["route.median_ms"].verdict == "not enough rounds"


def test_injected_drop_policy_change_is_caught(tmp_path, monkeypatch, capsys):
    import moebench.core.drop_policies as drop_policies

    # on this workload ranking drops by score leaves more tokens with no expert at all
    fields = dict(workload="{name: hot_experts, params: {hot: 2, fraction: 0.5}}", tokens=512, experts=8, top_k=2,
                  router="topk", timed="false")
    a = execute_suite(tmp_path, "drops", **fields)
    # 'position' now ranks like 'probs' (its numba kernel no longer applies: `fast_keep`)
    monkeypatch.setitem(drop_policies.DROP_POLICIES, "position", drop_policies.probs_priority)
    b = execute_suite(tmp_path, "drops", **fields)
    code, out, _ = cli(capsys, a, b, "--metrics", "deterministic")
    assert code == 1, out
    assert any(" r token_drop_rate:" in line for line in lines(out, "REGRESSION"))
    assert any(" r router_confidence:" in line for line in lines(out, "CHANGED"))


# ------------------------------------------------------------------ too few rounds for the CI


def _side(rounds: int, median: float, half_ci: float | None) -> tuple[dict, list[dict]]:
    row = {"case_id": "c", "router": "r", "status": "ok", "device": "cpu", "imbalance": 1.0,
           "route.median_ms": median, "route.rounds": rounds,
           "route.ci_low_ms": None if half_ci is None else median - half_ci,
           "route.ci_high_ms": None if half_ci is None else median + half_ci}
    return {"environment": {"cpu_model": "x", "hostname": "h"}}, [row]


@pytest.mark.parametrize("rounds_a, rounds_b", [(3, 40), (40, 5), (5, 5), (1, 1)])
def test_too_few_rounds_on_either_side_is_not_judged(rounds_a, rounds_b):
    # B is 3x slower with CIs far apart where they exist: with 40 rounds on both this fails
    a = _side(rounds_a, 1.0, 0.01 if rounds_a >= 6 else None)
    b = _side(rounds_b, 3.0, 0.01 if rounds_b >= 6 else None)
    c = compare_runs(a, b, noise=NoiseRule(consistency=0))
    v = next(v for v in c.rows[0].verdicts if v.metric == "route.median_ms")
    assert v.verdict == "not enough rounds" and not v.regression and c.exit_code == 0
    few = [f"{side} has {n} rounds" for side, n in (("A", rounds_a), ("B", rounds_b)) if n < 6]
    assert all(part in v.detail for part in few) and "needs >= 6" in v.detail
    assert any("1 medians not judged" in n for n in c.notes)
    # a gate on the median does not fail it either
    assert compare_runs(a, b, fail_on=["route.median_ms:1%"], noise=NoiseRule(consistency=0)).exit_code == 0


def test_old_rows_with_min_max_ci_and_few_rounds_are_not_judged():
    # rows written before CIs could be undefined carried min..max for n <= 5: rounds decide
    a, b = _side(5, 1.0, 0.05), _side(5, 2.0, 0.05)
    v = next(v for v in compare_runs(a, b, noise=NoiseRule(consistency=0)).rows[0].verdicts
             if v.metric == "route.median_ms")
    assert v.verdict == "not enough rounds" and "covers 93.8% at best" in v.detail


def test_six_rounds_are_enough():
    a, b = _side(6, 1.0, 0.01), _side(6, 3.0, 0.01)
    c = compare_runs(a, b, noise=NoiseRule(consistency=0))
    v = next(v for v in c.rows[0].verdicts if v.metric == "route.median_ms")
    assert v.verdict == "worse" and v.regression and c.exit_code == 1


# ------------------------------------------------------------------ every metric, the summary first

PARALLEL_SUITE = """
name: par
version: 1
defaults: {{hidden: 8, dtype: float32, device: cpu, seed: 0, capacity_factor: null}}
grid:
  workload: {{name: zipf, params: {{s: 1.2}}}}
  tokens: 512
  experts: 16
  top_k: 2
routers: [topk]
parallel: {{mode: model, ep: [4, 8], placement: {placement}, profile: h800_deepep}}
timing: {{enabled: false, isolate: false}}
"""


def test_parallel_run_whose_rank_imbalance_grew_fails(tmp_path, capsys):
    # the cost model (no processes): the same routing placed by EPLB (A) and contiguously (B),
    # so the rows each rank processes are less even in B; routing metrics are unchanged
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    runs = {}
    for placement in ("eplb", "contiguous"):
        path = tmp_path / f"{placement}.yaml"
        path.write_text(PARALLEL_SUITE.format(placement=placement))
        runs[placement] = execute(load_suite(path), RunOptions(results_root=tmp_path / placement)).path
    a, b = (load_side(runs[p])[1][0] for p in ("eplb", "contiguous"))
    assert b["rank_imbalance"] > a["rank_imbalance"] and b["imbalance"] == a["imbalance"]
    code, out, _ = cli(capsys, runs["eplb"], runs["contiguous"])
    assert code == 1, out
    assert any(" topk rank_imbalance:" in line for line in lines(out, "REGRESSION"))
    summary = [line.split() for line in out.splitlines() if line.startswith("  REGRESSION")]
    assert summary[0][:3] == ["REGRESSION", "topk", "rank_imbalance"]  # gated-on metrics first
    assert {"model.ep4.rank_imbalance", "model.ep8.rank_imbalance"} <= {s[2] for s in summary}
    assert compare_runs(runs["eplb"], runs["contiguous"], fail_on=["imbalance:0"]).exit_code == 0
    assert compare_runs(runs["eplb"], runs["contiguous"], fail_on=["rank_imbalance:5%"]).exit_code == 1
    assert compare_runs(runs["eplb"], runs["contiguous"], fail_on=["model.ep8.rank_imbalance:5%"]).exit_code == 0


def _timed_sides(spec: dict[str, list[tuple[float, float]]], half: float = 0.02, **meta_b):
    """(A, B) sides: for each router, one case per (A ms, B ms) with 95% CIs of +-``half``."""
    def rows(which: int) -> list[dict]:
        out = []
        for router, cells in spec.items():
            for i, cell in enumerate(cells):
                ms = cell[which]
                out.append({"case_id": f"case{i}", "router": router, "status": "ok", "device": "cpu",
                            "imbalance": 1.25, "route.median_ms": ms, "route.rounds": 30,
                            "route.ci_low_ms": ms * (1 - half), "route.ci_high_ms": ms * (1 + half)})
        return out

    meta = {"environment": {"cpu_model": "x", "hostname": "h"}, "timing": {"min_rounds": 30, "threads": 1}}
    return (meta, rows(0)), ({**meta, **meta_b}, rows(1))


def test_fail_on_median_flags_the_slowed_router_not_noisy_single_cells():
    # `slowed` is 12-25% slower on all 6 cases (median 1.17); judged cell by cell at 15% only
    # 3 of 6 pass, below 2/3. `deepseek` applies to one case only, where a burst made it 6x
    # slower; `hash` has one 19x cell among 4. Neither is a slower router.
    spec = {"slowed": [(1.0, 1.12), (1.0, 1.13), (2.0, 2.28), (1.0, 1.2), (1.0, 1.22), (2.0, 2.5)],
            "deepseek": [(1.0, 6.15)],
            "hash": [(1.0, 19.8), (1.0, 1.0), (2.0, 2.0), (1.0, 1.01)],
            "topk": [(1.0, 1.0)] * 6}
    a, b = _timed_sides(spec)
    c = compare_runs(a, b, fail_on=["route.median_ms:15%"])
    assert c.exit_code == 1
    assert {v.router for v in c.regressions} == {"slowed"}
    by_router = {g.router: g for g in c.summary() if g.metric == "route.median_ms"}
    assert by_router["slowed"].verdict == "REGRESSION" and by_router["slowed"].ratio == pytest.approx(1.17, abs=0.01)
    assert "6 of 6 cases slower" in by_router["slowed"].reason and "beyond 15%" in by_router["slowed"].reason
    assert by_router["deepseek"].verdict == "unchanged" and "needs >= 2 cases" in by_router["deepseek"].reason
    assert by_router["hash"].verdict == "unchanged" and "1 of 4 cases slower" in by_router["hash"].reason
    assert by_router["slowed"].interval[0] > 1.0  # the typical case's interval lies above 1
    # the summary lists the slowed router first
    assert c.summary()[0].router == "slowed"
    assert compare_runs(a, b, fail_on=["route.median_ms:20%"]).exit_code == 0  # median 1.17 is within 20%


def test_directionless_metrics_are_changed_never_a_regression(capsys):
    meta, rows = load_side(run("base"))
    moved = [dict(r, router_confidence=r["router_confidence"] + 0.1, experts_per_token_mean=1.5) for r in rows]
    c = compare_runs((meta, rows), (meta, moved))
    assert c.exit_code == 0 and not c.regressions
    changed = {(g.metric, g.verdict) for g in c.summary() if g.verdict != "unchanged"}
    assert changed == {("router_confidence", "changed"), ("experts_per_token_mean", "changed")}
    assert all("no direction: not gated" in g.reason for g in c.summary() if g.verdict == "changed")
    with pytest.raises(MoebenchError, match="router_confidence has no direction"):
        parse_gate("router_confidence:0")


def test_summary_is_first_sorted_by_severity_then_gated_metrics(capsys, tmp_path):
    meta, rows = load_side(run("base"))
    worse = [dict(r, z_loss=r["z_loss"] * 3, imbalance=r["imbalance"] * 1.01, router_confidence=0.7) for r in rows]
    base, cand = tmp_path / "a.json", tmp_path / "b.json"
    for path, side in ((base, rows), (cand, worse)):
        path.write_text(json.dumps({"meta": meta, "rows": side}))
    code, out, _ = main(["compare", str(base), str(cand)]), *capsys.readouterr()
    assert code == 1
    table = [line.split()[:3] for line in out.splitlines()[3:] if line.startswith("  ") and not line.startswith("  and")]
    verdicts = [t[0] for t in table]
    assert verdicts == sorted(verdicts, key=["REGRESSION", "worse", "changed", "better", "unchanged"].index)
    regressed = [t[2] for t in table if t[0] == "REGRESSION"]
    assert regressed[:2] == ["imbalance", "imbalance"] and regressed[2:] == ["z_loss", "z_loss"]
    assert ["changed", "switch", "router_confidence"] in table
    assert not lines(out, "REGRESSION")  # details only with --details
    assert "--details" in out


def test_timing_settings_note_names_the_keys():
    a, b = _timed_sides({"r": [(1.0, 1.0)] * 2}, timing={"min_rounds": 5, "threads": 1, "min_time_s": 0.5})
    notes = compare_runs(a, b).notes
    assert "the runs differ in timing settings: min_rounds 30 -> 5, min_time_s unset -> 0.5" in notes

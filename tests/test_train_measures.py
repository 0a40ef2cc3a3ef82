"""Training measures (MaxVio, NMI, fluctuation) on literal cases, and a training suite end to end."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.core.metrics import METRICS
from moebench.core.routing import Routing
from moebench.kinds.train import measures
from moebench.kinds.train.aggregate import FINAL, final_row, mean_ci


def _routing(token, expert, weight, kept, t, e, capacity=2):
    n = len(token)
    return Routing(torch.tensor(token), torch.tensor(expert), torch.zeros(n, dtype=torch.long),
                   torch.tensor(weight), torch.tensor(kept), torch.full((t, e), 1 / e), torch.zeros(t, e), 1, capacity)


def test_maxvio_literal():
    assert measures.maxvio(torch.tensor([4.0, 2.0, 0.0, 2.0])) == pytest.approx(1.0)  # (4 - 2) / 2
    assert measures.maxvio(torch.tensor([3.0, 3.0])) == 0.0
    assert math.isnan(measures.maxvio(torch.zeros(3)))


def _enumerated_floor(n: int, e: int, k: int) -> float:
    """E[MaxVio] by enumerating every choice of k-subsets for the n tokens (tiny cases only)."""
    import itertools

    subsets = list(itertools.combinations(range(e), k))
    mean, total = n * k / e, 0.0
    for picks in itertools.product(subsets, repeat=n):
        loads = [0] * e
        for subset in picks:
            for x in subset:
                loads[x] += 1
        total += (max(loads) - mean) / mean
    return total / len(subsets) ** n


def test_maxvio_floor_literal():
    assert measures.maxvio_floor(2, 2) == pytest.approx(0.5)  # (2,0),(1,1),(0,2): 1/4*1 + 1/2*0 + 1/4*1
    # (4,0) 2/16 -> 1; (3,1) 8/16 -> 0.5; (2,2) 6/16 -> 0
    assert measures.maxvio_floor(4, 2) == pytest.approx(0.375)
    assert measures.maxvio_floor(1, 3, k=2) == pytest.approx(0.5)  # every draw: loads (1,1,0), mean 2/3
    assert measures.maxvio_floor(1000, 4, k=4) == 0.0 and measures.maxvio_floor(10, 1) == 0.0
    assert math.isnan(measures.maxvio_floor(0, 4))
    assert measures.maxvio_floor(1024, 8) == pytest.approx(0.1276, abs=1e-4)  # the docstring's case
    assert measures.maxvio_floor(4096, 8) < measures.maxvio_floor(1024, 8)  # more tokens, less noise
    with pytest.raises(ValueError, match="1 <= k <= experts"):
        measures.maxvio_floor(10, 4, k=5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), e=st.integers(2, 4))
def test_exact_k1_floor_equals_enumeration(n, e):
    assert measures.maxvio_floor(n, e) == pytest.approx(_enumerated_floor(n, e, 1), rel=1e-9, abs=1e-12)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 4), e=st.integers(3, 5), k=st.integers(2, 3))
def test_monte_carlo_floor_matches_enumeration(n, e, k):
    k = min(k, e - 1)
    assert measures.maxvio_floor(n, e, k) == pytest.approx(_enumerated_floor(n, e, k), rel=0.02, abs=2e-3)


def test_token_by_token_floor_agrees_with_the_subset_draw(monkeypatch):
    by_subsets = measures.maxvio_floor.__wrapped__(512, 8, 2)
    monkeypatch.setattr(measures, "FLOOR_SUBSETS", 1)  # force the other path
    assert measures.maxvio_floor.__wrapped__(512, 8, 2) == pytest.approx(by_subsets, rel=0.03)


def test_balance_loads_count_demand_before_capacity():
    # 4 tokens, 3 experts: expert 0 asked 3 times (one dropped), expert 2 once
    r = _routing([0, 1, 2, 3], [0, 0, 0, 2], [0.9, 0.8, 0.7, 0.6], [True, True, False, True], 4, 3)
    assert measures.balance_loads(r).tolist() == [3.0, 0.0, 1.0]
    assert measures.dead_experts(measures.balance_loads(r), all_to_all=False) == 1
    assert measures.chosen_expert(r).tolist() == [0, 0, 3, 2]  # token 2 kept nowhere -> label E
    assert measures.chosen_expert(r, kept_only=False).tolist() == [0, 0, 0, 2]


def test_dense_routing_loads_are_weight_mass():
    t, e = 2, 2
    r = Routing(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long),
                torch.tensor([0.75, 0.25, 0.25, 0.75]), torch.ones(4, dtype=torch.bool), torch.full((t, e), 0.5),
                torch.zeros(t, e), 2, None)
    assert measures.is_all_to_all(r)
    assert measures.balance_loads(r).tolist() == [1.0, 1.0]
    assert measures.chosen_expert(r).tolist() == [0, 1]


def test_nmi_literal():
    perfect = torch.tensor([[5, 0], [0, 5]])
    assert measures.nmi(perfect) == pytest.approx(1.0)
    assert measures.nmi(torch.tensor([[5, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)
    # truth (a, a, b, b) vs expert (0, 0, 0, 1): I = 1.5 ln2 - 0.75 ln3 ... computed by hand:
    # H(truth) = ln 2, H(expert) = -(3/4 ln 3/4 + 1/4 ln 1/4), I = H(expert) - H(expert | truth)
    # H(expert | truth) = 1/2 * 0 + 1/2 * ln 2
    table = torch.tensor([[2, 0], [1, 1]])
    h_t = math.log(2)
    h_e = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = h_e - 0.5 * math.log(2)
    assert measures.nmi(table) == pytest.approx(mi / ((h_t + h_e) / 2))
    assert measures.contingency(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 2, 2).tolist() == [[2, 0], [1, 1]]


def test_fluctuation_tracks_changes_and_last_change_step():
    f = measures.Fluctuation()
    assert f.update(torch.tensor([0, 1, 2, 3]), 0) is None
    assert f.update(torch.tensor([0, 1, 0, 3]), 10) == 0.25
    assert f.update(torch.tensor([1, 1, 0, 3]), 20) == 0.25
    assert f.last_change.tolist() == [20, 0, 10, 0]


def test_mean_ci_is_student_t():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert mean_ci([5.0]) == (5.0, None, None)
    row = final_row({0: [{"eval_loss": 1.0, "maxvio_batch": 0.5}], 1: [{"eval_loss": 3.0, "maxvio_batch": 0.1}]})
    assert row["eval_loss"] == 2.0 and row["maxvio_batch_worst"] == 0.5 and row["seeds_trained"] == 2


def test_every_final_column_declares_a_direction():
    for name in FINAL:
        assert name in METRICS and METRICS[name].deterministic
        assert f"{name}_ci_low" in METRICS and f"{name}_ci_high" in METRICS
    assert METRICS["nmi"].direction == "higher" and METRICS["maxvio_global"].direction == "lower"


SUITE = """
name: train_tiny
version: 1
defaults: {experts: 4, top_k: 1, hidden: 6}
grid: {}
train:
  steps: 4
  tokens_per_step: 32
  eval_interval: 2
  eval_tokens: 64
  probe_tokens: 16
  seeds: [0, 1]
  expert_hidden: 4
  task: [{name: local_experts, params: {regions: 2}}, {name: language, params: {vocab: 16}}]
routers: [switch, expert_choice, hash]
timing: {threads: 1}
"""


def test_training_suite_runs_reports_and_compares(tmp_path):
    from moebench.compare.verdicts import compare_runs
    from moebench.report.build import write_report
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    path = tmp_path / "train_tiny.yaml"
    path.write_text(SUITE)
    suite = load_suite(path)
    run = execute(suite, RunOptions(results_root=tmp_path / "results"))
    rows = run.rows()
    assert len(rows) == 6
    status = {(r["workload"], r["router"]): r["status"] for r in rows}
    assert status[("local_experts", "hash")] == "skipped" and status[("language", "hash")] == "ok"
    steps = run.steps()
    assert len(steps) == 5 * 2 * 3  # (hash on local_experts: none) 5 routers x 2 seeds x evals at 0, 2, 4
    ec = [s for s in steps if s["router"] == "expert_choice"]
    assert all(s["maxvio_batch"] == 0.0 for s in ec)  # expert choice: balanced at every step
    switch = next(r for r in rows if r["router"] == "switch" and r["workload"] == "local_experts")
    # eval_tokens 64 on E=4, k=1: the reference an ideal balanced router would show
    assert switch["maxvio_global_floor"] == pytest.approx(measures.maxvio_floor(64, 4))
    assert switch["maxvio_batch_floor"] == pytest.approx(measures.maxvio_floor(32, 4))
    language = [s for s in steps if s["case_id"].startswith("language")]
    assert all(s["perplexity"] == pytest.approx(math.exp(s["eval_loss"]), rel=1e-9) for s in language)
    report = write_report([run.path], tmp_path / "reports")
    text = report.read_text()
    assert "## Training" in text and "train_curves_" in text and "train_specialisation_" in text
    assert (report.parent / "training.csv").exists()
    assert list((report.parent / "plots").glob("train_curves_*.png"))
    again = execute(suite, RunOptions(results_root=tmp_path / "results"))
    result = compare_runs(Path(run.path), Path(again.path), metrics="deterministic")
    assert not any(v.regression for row in result.rows for v in row.verdicts)


def test_report_groups_the_variants_of_a_case_in_one_figure():
    import pandas as pd

    from moebench.kinds.train.section import with_groups

    rows = pd.DataFrame({"case_id": ["teacher+a-T8-E2-k1-aaaa1111", "teacher+b-T8-E2-k1-bbbb2222"],
                         "case": ["teacher+a T=8", "teacher+b T=8"], "train.variant": ["a", "b"]})
    steps = pd.DataFrame({"case_id": rows["case_id"], "router": ["switch", "switch"]})
    out = with_groups(steps, rows)
    assert out["group"].tolist() == ["teacher-T8-E2-k1", "teacher-T8-E2-k1"]
    assert out["title"].tolist() == ["teacher T=8", "teacher T=8"]
    assert out["line"].tolist() == ["switch (a)", "switch (b)"]


def test_curves_mark_the_sampling_floor_only_where_the_case_has_one():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from moebench.kinds.train.section import _draw_floor

    rows = pd.DataFrame({"case_id": ["a", "a", "b", "c"], "maxvio_global_floor": [0.128, 0.128, None, 0.2]})
    fig, ax = plt.subplots()
    _draw_floor(ax, rows, ["a"])
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [0.128]
    for cases in (["b"], ["a", "c"]):  # no floor (dense routers), or two that disagree
        fig, ax = plt.subplots()
        _draw_floor(ax, rows, cases)
        assert not ax.get_lines()
    plt.close("all")


def test_large_floors_take_the_gaussian_and_agree_with_the_exact_and_drawn_ones(monkeypatch):
    exact = measures.maxvio_floor.__wrapped__(50_000, 16)
    drawn = measures.maxvio_floor.__wrapped__(4096, 64, 8)  # tokens drawn one by one
    monkeypatch.setattr(measures, "FLOOR_EXACT_TOKENS", 10)
    monkeypatch.setattr(measures, "FLOOR_TOKEN_BUDGET", 1)
    assert measures.maxvio_floor.__wrapped__(50_000, 16) == pytest.approx(exact, rel=0.01)  # mean load 3125
    assert measures.maxvio_floor.__wrapped__(4096, 64, 8) == pytest.approx(drawn, rel=0.04)  # mean load 512: reads low
    assert measures.maxvio_floor.__wrapped__(4096, 64, 8) < drawn

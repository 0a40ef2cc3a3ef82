"""The report's verdict (moebench/report/summary.py, summary_section.py, declarations.py) on
hand-made frames: ratios, ties, the Pareto front, the "best for" line, clipping, load, notes."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from moebench.report.declarations import LEGACY, declarations
from moebench.report.summary import (
    Lens, best_for, clip, lens_for, pareto_front, router_summary, tie, unreliable,
)
from moebench.report.summary_section import best_table, load_lines, notes_lines, summary_markdown

LENS = Lens("imbalance", "token_drop_rate", "route")
BASELINES = {"round_robin", "softmax_dense"}


def row(router, imbalance, drops, ms, width=0.02, case="c1", cf=1.25, workload="zipf", seed=0, **extra):
    """One ok row; the route CI is ms*(1 +- width)."""
    return {"status": "ok", "router": router, "router_name": router, "case_id": case, "run_id": "r",
            "workload": workload, "workload_params": "{}", "capacity_factor": cf, "seed": seed,
            "imbalance": imbalance, "token_drop_rate": drops, "route.median_ms": ms,
            "route.ci_low_ms": ms * (1 - width), "route.ci_high_ms": ms * (1 + width), **extra}


def frame(*rows):
    return pd.DataFrame(list(rows))


def base_rows():
    return [row("topk", 2.0, 0.10, 1.0), row("expert_choice", 1.0, 0.05, 3.0),
            row("sinkhorn", 1.5, 0.00, 2.0), row("round_robin", 1.0, 0.0, 0.3),
            row("softmax_dense", 1.0, 0.0, 9.0)]


def summary_of(rows):
    return router_summary(frame(*rows), BASELINES, LENS)


def test_ratio_is_to_the_fastest_non_baseline_router():
    s = summary_of(base_rows()).set_index("router")
    assert s.at["topk", "time_ratio"] == pytest.approx(1.0)
    assert s.at["sinkhorn", "time_ratio"] == pytest.approx(2.0)
    assert s.at["round_robin", "time_ratio"] == pytest.approx(0.3)  # faster, but not the reference
    # interval: own bounds over the reference's opposite bounds
    assert s.at["sinkhorn", "time_ratio_low"] == pytest.approx(2.0 * 0.98 / 1.02)
    assert s.at["sinkhorn", "time_ratio_high"] == pytest.approx(2.0 * 1.02 / 0.98)


def test_geometric_mean_over_cases():
    rows = [row("a", 1, 0, 1.0, case="c1"), row("b", 1, 0, 2.0, case="c1"),
            row("a", 1, 0, 8.0, case="c2"), row("b", 1, 0, 2.0, case="c2")]
    s = summary_of(rows).set_index("router")
    assert s.at["b", "time_ratio"] == pytest.approx(math.sqrt(2.0 * 1.0))  # ratios 2 and 1
    assert s.at["a", "time_ratio"] == pytest.approx(math.sqrt(1.0 * 4.0))  # ratios 1 and 4


def test_baselines_never_on_the_front_nor_best():
    s = summary_of(base_rows())
    assert not s[s["baseline"]]["pareto"].any()
    best = best_for(s, LENS)
    named = set(best.balanced_without_drops + best.fewest_drops + best.fastest_at_equal_drops)
    assert named and not named & BASELINES


def test_pareto_front_by_hand():
    # topk fastest, expert_choice most balanced, sinkhorn fewest drops: none dominates another;
    # "slow" is worse than sinkhorn on every objective
    rows = base_rows() + [row("slow", 1.6, 0.01, 2.5)]
    s = summary_of(rows)
    assert set(s[s["pareto"]]["router"]) == {"topk", "expert_choice", "sinkhorn"}


def test_overlapping_times_tie_and_a_tie_does_not_dominate():
    rows = [row("a", 1.5, 0.0, 1.00, width=0.2), row("b", 1.5, 0.0, 1.10, width=0.2)]
    s = summary_of(rows)
    assert s["pareto"].all()  # equal balance and drops; times overlap: a tie, so b survives
    assert set(best_for(s, LENS).fastest_at_equal_drops) == {"a", "b"}


def test_best_for_by_hand():
    best = best_for(summary_of(base_rows()), LENS)
    assert best.balanced_without_drops == ("sinkhorn",)  # the only non-baseline without drops
    assert best.fewest_drops == ("sinkhorn",)
    assert best.fastest_at_equal_drops == ("sinkhorn",)
    assert best.fastest == ("topk",)  # 1 ms, dropping 10%: named with its drops
    assert "| topk (drops 10.0%) |" in best_table(summary_of(base_rows()), LENS)


def test_best_for_line_follows_the_data():
    """Change one router's data and the "best for" line changes with it."""
    rows = base_rows()
    before = best_table(summary_of(rows), LENS)
    assert "| sinkhorn (1.50) | sinkhorn (0%) |" in before
    rows[1] = row("expert_choice", 1.0, 0.0, 3.0)  # expert choice now keeps every token
    after = best_table(summary_of(rows), LENS)
    best = best_for(summary_of(rows), LENS)
    assert best.balanced_without_drops == ("expert_choice",)
    assert set(best.fewest_drops) == {"expert_choice", "sinkhorn"}
    assert best.fastest_at_equal_drops == ("sinkhorn",)  # 2 ms against 3 ms at equal (zero) drops
    assert "| expert_choice (1.00) |" in after and after != before


def test_partial_router_is_listed_but_not_ranked():
    rows = [row("a", 1.5, 0.0, 1.0, case="c1"), row("a", 1.5, 0.0, 1.0, case="c2"),
            row("switch", 1.0, 0.0, 0.5, case="c1")]
    s = summary_of(rows).set_index("router")
    assert not s.at["switch", "eligible"] and not s.at["switch", "pareto"]
    assert best_for(s.reset_index(), LENS).balanced_without_drops == ("a",)


def test_unreliable_times():
    assert unreliable(1.0, 0.9, 1.1) is False  # 20% of the median
    assert unreliable(1.0, 0.8, 1.1) is True   # 30%
    assert unreliable(1.0, math.nan, math.nan) is True  # too few rounds: no CI
    rows = [row("a", 1, 0, 1.0), row("b", 1, 0, 2.0, width=0.2)]  # b: CI 40% of its median
    s = summary_of(rows).set_index("router")
    assert s.at["b", "time_unreliable"] and not s.at["a", "time_unreliable"]
    md = summary_markdown(frame(*rows), [{}], _tmp())
    assert "2.00× [1.57, 2.45] †" in md  # 2*0.8/1.02, 2*1.2/0.98


def _tmp():
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp())


def test_intervals_clipped_to_range():
    assert clip("maxvio_global", -0.2, 0.5) == (0.0, 0.5)
    assert clip("nmi", 0.7, 1.3) == (0.7, 1.0)
    assert clip("token_drop_rate", -0.1, 0.2) == (0.0, 0.2)
    assert clip("eval_loss", 1.0, 2.0) == (1.0, 2.0)
    # training rows carry their own interval; it is clipped in the summary
    rows = [row("a", 1.0, 0.0, 1.0, seed=0, maxvio_global=0.05, maxvio_global_ci_low=-0.1,
                maxvio_global_ci_high=0.2, kind="train", drop_rate=0.0, eval_loss=1.0)]
    s = router_summary(frame(*rows), set(), lens_for(frame(*rows)))
    assert s.at[0, "maxvio_global_low"] == 0.0


def test_seed_interval_for_deterministic_metrics():
    rows = [row("a", 1.0, 0.0, 1.0, seed=0, case="c0"), row("a", 2.0, 0.0, 1.0, seed=1, case="c1")]
    s = summary_of(rows)
    half = 12.706 * 0.7071067811865476 / math.sqrt(2)  # t(1) * sd / sqrt(n)
    assert s.at[0, "imbalance"] == pytest.approx(1.5)
    assert s.at[0, "imbalance_low"] == pytest.approx(1.0)  # 1.5 - half clipped at 1 (imbalance >= 1)
    assert s.at[0, "imbalance_high"] == pytest.approx(1.5 + half)


def test_tie_rules():
    assert tie((1.0, 0.9, 1.1), (1.05, 1.0, 1.2))
    assert not tie((1.0, 0.9, 1.0), (1.2, 1.1, 1.3))
    assert tie((0.0, math.nan, math.nan), (0.0, math.nan, math.nan))
    assert not tie((0.1, math.nan, math.nan), (0.11, math.nan, math.nan))


def test_load_lines_warn_when_busy():
    quiet = {"load": {"start": {"loadavg": [0.2, 0.1, 0.1], "cores": 8}, "end": {"loadavg": [2.0, 1, 1], "cores": 8}}}
    busy = {"load": {"start": {"loadavg": [6.5, 5, 5], "cores": 8}, "end": {"loadavg": [7.0, 6, 6], "cores": 8}}}
    assert "Busy" not in load_lines([quiet])[0] and "0.20 at the start" in load_lines([quiet])[0]
    assert "Busy" in load_lines([busy])[0]
    assert "not recorded" in load_lines([{}])[0]


def test_notes_only_where_the_condition_holds():
    rows = frame(row("expert_choice", 1, 0.1, 1.0, cf=1.25), row("topk", 1, 0.0, 1.0, cf=1.25))
    decl = declarations([{}], rows)
    assert notes_lines(rows, decl) == []  # expert choice's note is about dropless cases
    rows = frame(row("expert_choice", 1, 0.1, 1.0, cf=float("nan"), case="c2"))
    assert "dropless" in notes_lines(rows, declarations([{}], rows))[0]


def test_recorded_declarations_win_over_legacy():
    rows = frame(row("mine", 1, 0, 1.0), row("random", 1, 0, 1.0))
    meta = {"router_declarations": {"mine": {"baseline": True, "case_notes": {"always": "a plugin note"}}}}
    decl = declarations([meta], rows)
    assert decl.baseline == {"mine", "random"}  # random from LEGACY (not recorded)
    assert notes_lines(rows, decl) == ["- **mine**: a plugin note."]


def test_legacy_matches_router_classes():
    """LEGACY (for runs recorded before meta had declarations) says what the classes declare."""
    from moebench.routers.registry import router_class

    for name, declared in LEGACY.items():
        cls = router_class(name)
        assert bool(getattr(cls, "baseline", False)) == declared["baseline"], name
        assert dict(getattr(cls, "case_notes", {})) == declared["case_notes"], name


def test_table_cells_tie_dagger_and_baseline_never_bold():
    from moebench.report.markdown import markdown_table
    from moebench.report.summary import time_cell_marks

    rows = frame(row("a", 1.0, 0.0, 1.00, width=0.02), row("b", 1.1, 0.0, 2.00, width=0.02),
                 row("round_robin", 1.0, 0.0, 0.10, width=0.02),
                 row("a", 1.0, 0.0, 1.00, width=0.10, case="c2"), row("b", 1.1, 0.0, 1.05, width=0.10, case="c2"),
                 row("a", 1.0, 0.0, 1.00, width=0.20, case="c3"), row("b", 1.1, 0.0, 3.00, width=0.02, case="c3"))
    table = rows[["case_id", "router", "route.median_ms", "imbalance", "run_id"]].copy()
    table.insert(0, "case", table["case_id"])
    marks, tied = time_cell_marks(table, rows, {"round_robin"})
    assert marks["route.median_ms"].tolist() == [False, False, False, False, False, True, False]  # 40% wide
    assert tied["route.median_ms"].tolist() == [False, False, False, True, True, False, False]  # c2 overlaps
    md = markdown_table(table, references={"round_robin"}, marks=marks, tied=tied)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[2:]]
    time = [c[2] for c in cells]  # route.median_ms, rows in table order
    assert time == ["**1.000**", "2.000", "0.100", "1.000", "1.050", "1.000 †", "3.000"]
    assert cells[2][1] == "round_robin (baseline)" and cells[2][3] == "1.000"  # balanced, never bold

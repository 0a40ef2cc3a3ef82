"""The side-by-side route table: one line per case, one column per router, ratio to the fastest."""

from __future__ import annotations

import math

import pandas as pd

from moebench.report.route_pivot import markdown, side_by_side_table


def _rows():
    base = dict(workload="uniform", tokens=64, experts=4, top_k=2, capacity_factor=1.25, status="ok", run_id="r1")
    return pd.DataFrame([
        {**base, "case_id": "c1", "router": "topk", "route.median_ms": 2.0},
        {**base, "case_id": "c1", "router": "peer:megatron.topk", "route.median_ms": 15.0},
        {**base, "case_id": "c2", "tokens": 128, "router": "topk", "route.median_ms": 4.0},
        {**base, "case_id": "c2", "tokens": 128, "router": "peer:megatron.topk", "status": "skipped",
         "route.median_ms": None},
    ])


def test_one_line_per_case_one_column_per_router_in_suite_order():
    table = side_by_side_table(_rows())
    assert list(table.columns) == ["case", "topk", "peer:megatron.topk", "run_id", "case_id"]
    assert list(table["case_id"]) == ["c1", "c2"]
    assert table.loc[0, "peer:megatron.topk"] == 15.0
    assert math.isnan(table.loc[1, "peer:megatron.topk"])  # skipped rows leave a hole, not a zero


def test_markdown_gives_ratio_to_the_fastest_and_bolds_it_only_when_its_interval_is_apart():
    rows = _rows()
    rows["route.ci_low_ms"] = rows["route.median_ms"] * 0.95
    rows["route.ci_high_ms"] = rows["route.median_ms"] * 1.05
    lines = markdown(side_by_side_table(rows)).splitlines()
    assert lines[0] == "| case | topk | peer:megatron.topk |"
    assert "**2.000 (1.0×)**" in lines[2] and "15.000 (7.5×)" in lines[2]
    assert lines[3].endswith("| **4.000 (1.0×)** | - |")


def test_markdown_bolds_nothing_where_the_fastest_has_no_interval_to_be_apart():
    lines = markdown(side_by_side_table(_rows())).splitlines()
    assert "**" not in lines[2] and "2.000 (1.0×)" in lines[2]  # no CI: a tie, not a winner


def test_needs_two_timed_routers():
    rows = _rows()
    assert side_by_side_table(rows[rows["router"] == "topk"]).empty
    assert side_by_side_table(rows.drop(columns="route.median_ms")).empty

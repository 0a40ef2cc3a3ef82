"""Scaling exponents fitted from rows with known power laws."""

import pandas as pd
import pytest

from moebench.core.case import Case, NamedSpec, case_axes, case_fields
from moebench.core.scaling import scaling_table


def _rows(router, tokens, experts, ms):
    return {"router": router, "status": "ok", "workload": "zipf", "workload_params": "{}", "tokens": tokens,
            "experts": experts, "top_k": 2, "capacity_factor": 1.25, "drop_policy": "position", "hidden": 64,
            "dtype": "float32", "device": "cpu", "seed": 0, "batches": 1,
            "route.median_ms": ms, "dispatch.median_ms": 2 * ms, "combine.median_ms": None}


def test_power_laws_give_their_exponents():
    rows = [_rows("linear", t, 64, 1e-3 * t) for t in (4096, 8192, 16384, 32768)]
    rows += [_rows("quadratic", t, 64, 1e-6 * t * t) for t in (4096, 8192, 16384)]
    rows += [_rows("sqrt_e", 65536, e, 0.5 * e**0.5) for e in (8, 16, 32, 64)]
    rows += [_rows("two_points", t, 64, t) for t in (4096, 8192)]  # too few points: no fit
    table = scaling_table(pd.DataFrame(rows))
    got = {(r.router, r.phase, r.axis): r.exponent for r in table.itertuples()}
    assert got[("linear", "route", "T")] == pytest.approx(1.0, abs=1e-3)
    assert got[("linear", "dispatch", "T")] == pytest.approx(1.0, abs=1e-3)
    assert got[("quadratic", "route", "T")] == pytest.approx(2.0, abs=1e-3)
    assert got[("sqrt_e", "route", "E")] == pytest.approx(0.5, abs=1e-3)
    assert not any(r == "two_points" for r, _, _ in got)
    assert not any(p == "combine" for _, p, _ in got)


def test_top_exponent_fits_the_largest_points_only():
    # flat while cached, then linear: the whole-range slope is below 1, the top one is 1
    ms = {4096: 1.0, 8192: 1.0, 16384: 1.0, 32768: 2.0, 65536: 4.0, 131072: 8.0}
    table = scaling_table(pd.DataFrame([_rows("knee", t, 64, v) for t, v in ms.items()]))
    row = table[(table.router == "knee") & (table.phase == "route")].iloc[0]
    assert row.exponent < 0.8
    assert row.exponent_top == pytest.approx(1.0, abs=1e-3)


def test_no_rows_no_table():
    assert scaling_table(pd.DataFrame()).empty


@pytest.mark.parametrize("axis,values", [("min_capacity", (0, 4096)), ("capacity_multiple", (1, 128))])
def test_rows_differing_in_a_capacity_axis_are_separate_series(axis, values):
    # Two settings of the axis, each a clean power law in T: 1.0 at the first, 2.0 at the
    # second. Pooled (the old OTHER_AXES left these two axes out) the per-T medians mix both
    # laws and no exponent is 1 or 2; kept apart, each series gives its own.
    tokens = (4096, 8192, 16384, 32768)
    rows = [{**_rows("r", t, 64, 1e-3 * t), axis: values[0]} for t in tokens]
    rows += [{**_rows("r", t, 64, 1e-6 * t * t), axis: values[1]} for t in tokens]
    table = scaling_table(pd.DataFrame(rows))
    route_t = table[(table.phase == "route") & (table.axis == "T")]
    assert len(route_t) == 2
    assert sorted(route_t.exponent) == pytest.approx([1.0, 2.0], abs=1e-3)


def test_case_axes_come_from_the_case_dataclass():
    case = Case(NamedSpec("zipf", {"s": 1.2}), 1024, 8, 2, None, min_capacity=4, capacity_multiple=8)
    row = case.axes()
    assert list(row) == ["case_id", *case_axes()]
    assert row["workload_params"] == '{"s": 1.2}' and row["capacity_multiple"] == 8
    assert {"min_capacity", "capacity_multiple"} <= set(case_axes())
    assert set(case_fields()) - {"workload"} <= set(case_axes())


def test_every_list_of_axes_is_the_case_fields():
    from moebench.compare.export import _extra_info
    from moebench.report.tables import CASE_AXES
    from moebench.core.scaling import OTHER_AXES
    from moebench.suite.load import AXES

    assert tuple(AXES) == case_fields()
    assert CASE_AXES == OTHER_AXES == case_axes()
    row = {a: i for i, a in enumerate(case_axes())}
    assert set(case_axes()) <= set(_extra_info(row, "route"))

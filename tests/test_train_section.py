"""The training report section (moebench/kinds/train/section.py): ties where seed intervals
overlap are never bold, intervals are clipped to their metric's range, and the specialisation
heatmaps show every seed with a colour bar."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.kinds.train import section
from moebench.kinds.train.section import _interval, ranking_table, training_section


def _row(case: str, router: str, eval_loss: float, lo: float, hi: float, **extra) -> dict:
    row = {"status": "ok", "kind": "train", "run_id": "r1", "case_id": case, "case": case, "router": router,
           "router_name": router, "eval_loss": eval_loss, "eval_loss_ci_low": lo, "eval_loss_ci_high": hi,
           "seeds_trained": 3}
    row.update(extra)
    return row


def _bold(md: str) -> list[tuple[str, str]]:
    """(router, bold text) for every bold cell of a markdown table (router = column 2)."""
    found, header = [], None
    for line in md.splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        for name, cell in zip(header, cells):
            if cell.startswith("**"):
                found.append((cells[1].replace(" (baseline)", ""), name))
    return found


def _md(data) -> str:
    """The section's Markdown, written into a throw-away folder (hypothesis runs it many times)."""
    with tempfile.TemporaryDirectory() as folder:
        return training_section(data, Path(folder))


def _data(rows: list[dict], steps: list[dict] | None = None, meta: dict | None = None):
    run = SimpleNamespace(steps=lambda: list(steps or []))
    return SimpleNamespace(runs=[(run, meta or {})], rows=pd.DataFrame(rows), combined=False)


# ----------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("metric, low, high, text", [
    ("maxvio_global", -0.00713, 0.384, "[0, 0.384]"),     # MaxVio >= 0 (report of issue 21)
    ("nmi", 0.903, 1.04, "[0.903, 1]"),                  # NMI in [0, 1]
    ("nmi", -0.2, 0.1, "[0, 0.1]"),
    ("eval_loss", -0.832, 3.06, "[0, 3.06]"),             # losses >= 0
    ("drop_rate", -0.1, 1.2, "[0, 1]"),                   # rates in [0, 1]
    ("perplexity", 0.5, 3.0, "[1, 3]"),                   # exp(loss) >= 1
    ("maxvio_global", 0.2, 0.5, "[0.2, 0.5]"),            # inside: untouched
])
def test_interval_is_clipped_to_the_metric_range(metric, low, high, text):
    assert _interval(metric, low, high) == text


def test_missing_interval_is_a_dash():
    assert _interval("nmi", None, 0.5) == "-" and _interval("nmi", math.nan, 0.5) == "-"


def test_ranking_table_shows_clipped_intervals():
    rows = [_row("c", "a", 0.2, -0.1, 0.5, nmi=0.95, nmi_ci_low=0.9, nmi_ci_high=1.07,
                 maxvio_global=0.01, maxvio_global_ci_low=-0.02, maxvio_global_ci_high=0.04)]
    table = ranking_table(pd.DataFrame(rows))
    assert table.loc[0, "eval_loss 95%"] == "[0, 0.5]"
    assert table.loc[0, "nmi 95%"] == "[0.9, 1]"
    assert table.loc[0, "maxvio_global 95%"] == "[0, 0.04]"


# ----------------------------------------------------------------------------- ties

def test_overlapping_eval_loss_intervals_are_a_tie_not_bold():
    rows = [_row("tied", "a", 1.00, 0.90, 1.10), _row("tied", "b", 1.05, 1.00, 1.10),
            _row("tied", "c", 2.00, 1.90, 2.10),
            _row("clear", "a", 1.00, 0.95, 1.05), _row("clear", "b", 1.50, 1.40, 1.60),
            _row("clear", "c", 2.00, 1.90, 2.10)]
    md = _md(_data(rows))
    # "tied": a beats c, but its interval overlaps b's: no best; "clear": a beats both
    bold = _bold(md)
    assert bold == [("a", "eval_loss")], md


def test_a_baseline_is_never_bold_and_does_not_compete():
    rows = [_row("c", "softmax_dense", 0.10, 0.09, 0.11),  # declared baseline (LEGACY fallback)
            _row("c", "a", 1.00, 0.95, 1.05), _row("c", "b", 2.00, 1.90, 2.10)]
    md = _md(_data(rows))
    assert _bold(md) == [("a", "eval_loss")]
    assert "softmax_dense (baseline)" in md


def test_a_router_declared_baseline_in_meta_is_not_bold():
    rows = [_row("c", "a", 1.00, 0.95, 1.05), _row("c", "b", 2.00, 1.90, 2.10), _row("c", "z", 3.0, 2.9, 3.1)]
    md = _md(_data(rows, meta={"router_declarations": {"a": {"baseline": True}}}))
    assert _bold(md) == [("b", "eval_loss")]


def test_higher_is_better_column_ties_on_overlap_too():
    rows = [_row("c", "a", 1.0, None, None, nmi=0.90, nmi_ci_low=0.80, nmi_ci_high=1.0),
            _row("c", "b", 2.0, None, None, nmi=0.70, nmi_ci_low=0.60, nmi_ci_high=0.85),
            _row("c", "d", 3.0, None, None, nmi=0.10, nmi_ci_low=0.05, nmi_ci_high=0.15)]
    assert ("a", "nmi") not in _bold(_md(_data(rows)))
    rows[1].update(nmi_ci_high=0.75)  # now a's [0.8, 1] clears b's [0.6, 0.75]
    assert ("a", "nmi") in _bold(_md(_data(rows)))


def test_hidden_intervals_decide_ties_as_well():
    """drop_rate shows no interval column, but its seed interval still makes a tie."""
    rows = [_row("c", "a", 1.0, None, None, drop_rate=0.01, drop_rate_ci_low=0.0, drop_rate_ci_high=0.05),
            _row("c", "b", 2.0, None, None, drop_rate=0.03, drop_rate_ci_low=0.02, drop_rate_ci_high=0.04)]
    assert ("a", "drop_rate") not in _bold(_md(_data(rows)))
    rows[1].update(drop_rate_ci_low=0.06, drop_rate=0.07, drop_rate_ci_high=0.08)
    assert ("a", "drop_rate") in _bold(_md(_data(rows)))


def test_equal_values_without_intervals_are_a_tie():
    rows = [_row("c", "a", 1.0, None, None, maxvio_batch_worst=0.0),
            _row("c", "b", 2.0, None, None, maxvio_batch_worst=0.0),
            _row("c", "d", 3.0, None, None, maxvio_batch_worst=1.5)]
    bold = _bold(_md(_data(rows)))
    assert ("a", "maxvio_batch_worst") not in bold and ("b", "maxvio_batch_worst") not in bold
    # with no intervals at all, a clear value still wins (one seed: nothing to overlap)
    assert ("a", "eval_loss") in bold


def test_step_time_without_interval_is_marked_and_never_bold():
    rows = [_row("c", "a", 1.0, 0.9, 1.1, **{"train.step_ms": 1.0}),
            _row("c", "b", 3.0, 2.9, 3.1, **{"train.step_ms": 9.0})]
    md = _md(_data(rows))
    assert ("a", "train.step_ms") not in _bold(md)
    assert "1.000 †" in md and "9.000 †" in md and "† a time without an interval" in md
    rows = [{k: v for k, v in r.items() if k != "train.step_ms"} for r in rows]
    assert "†" not in _md(_data(rows))  # the mark is explained only when used


def test_cases_are_ranked_separately():
    rows = [_row("x", "a", 1.0, 0.9, 1.1), _row("x", "b", 5.0, 4.9, 5.1),
            _row("y", "a", 5.0, 4.9, 5.1), _row("y", "b", 1.0, 0.9, 1.1)]
    assert sorted(_bold(_md(_data(rows)))) == [("a", "eval_loss"), ("b", "eval_loss")]


intervals = st.tuples(st.floats(0, 10), st.floats(0, 3)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(intervals, min_size=2, max_size=6))
def test_bold_only_for_a_best_clear_of_every_other_interval(spans):
    """Property: a bold eval_loss cell is the lowest, and its interval overlaps no other."""
    rows = [_row("c", f"r{i}", (lo + hi) / 2, lo, hi) for i, (lo, hi) in enumerate(spans)]
    bold = [r for r, col in _bold(_md(_data(rows))) if col == "eval_loss"]
    assert len(bold) <= 1
    mids = [(lo + hi) / 2 for lo, hi in spans]
    best = min(range(len(spans)), key=lambda i: mids[i])
    clear = all(spans[best][1] < lo or hi < spans[best][0] for i, (lo, hi) in enumerate(spans) if i != best)
    if bold:
        assert bold == [f"r{best}"] and clear
    # a clear best is bold, unless its value prints like another's (markdown.TIE_RTOL)
    elif clear and all(abs(m - mids[best]) > 1e-3 * max(abs(m), 1e-9) for i, m in enumerate(mids) if i != best):
        raise AssertionError(f"r{best} is clear of every other interval but not bold: {spans}")


# ----------------------------------------------------------------------------- heatmaps

def _steps(routers=("a", "b", "c"), seeds=(0, 1, 2)) -> list[dict]:
    out = []
    for router in routers:
        for seed in seeds:
            table = np.zeros((2, 4), dtype=int)
            table[0, seed % 3], table[1, (seed + 1) % 3] = 10, 10
            out.append({"run_id": "r1", "case_id": "c", "router": router, "seed": seed, "step": 5,
                        "eval_loss": 1.0, "maxvio_global": 0.1, "dead_experts": 0, "fluctuation": 0.0})
            out.append({"run_id": "r1", "case_id": "c", "router": router, "seed": seed, "step": 10,
                        "eval_loss": 0.5, "maxvio_global": 0.1, "dead_experts": 0, "fluctuation": 0.0,
                        "contingency": table.tolist()})
    return out


def test_heatmaps_show_every_seed_with_a_colour_bar(tmp_path, monkeypatch):
    from moebench.report import plot_style

    figures = []
    real = plot_style.new_figure

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        figures.append(fig)
        return fig, axes

    monkeypatch.setattr(plot_style, "new_figure", spy)
    rows = pd.DataFrame([_row("c", r, 1.0, 0.9, 1.1) for r in ("a", "b", "c")])
    drawn = section.plot_heatmaps(pd.DataFrame(_steps()), rows, tmp_path)
    assert len(drawn) == 1 and drawn[0][1].exists()
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    titles = sorted(ax.get_title() for ax in panels)
    assert titles == sorted(f"{r} · seed {s}" for r in "abc" for s in (0, 1, 2))
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "share of the group's held-out tokens"]
    assert len(bars) == 1
    assert "every seed (3)" in fig._suptitle.get_text()
    # each panel is the row-normalised contingency of its seed: group 0 went to expert seed % 3
    for ax in panels:
        seed = int(re.search(r"seed (\d)", ax.get_title()).group(1))
        share = ax.images[0].get_array()
        assert share[0, seed % 3] == 1.0 and share[0].sum() == 1.0
        assert ax.images[0].get_clim() == (0, 1)


def test_heatmaps_leave_out_a_seed_a_router_did_not_run(tmp_path, monkeypatch):
    from moebench.report import plot_style

    figures = []
    real = plot_style.new_figure
    monkeypatch.setattr(plot_style, "new_figure",
                        lambda *a, **k: (lambda fa: (figures.append(fa[0]), fa)[1])(real(*a, **k)))
    steps = [s for s in _steps(routers=("a", "b")) if not (s["router"] == "b" and s["seed"] == 2)]
    rows = pd.DataFrame([_row("c", r, 1.0, 0.9, 1.1) for r in ("a", "b")])
    section.plot_heatmaps(pd.DataFrame(steps), rows, tmp_path)
    titles = {ax.get_title() for ax in figures[-1].axes if ax.get_visible() and ax.images}
    assert len(titles) == 5 and "b · seed 2" not in titles


def test_section_writes_the_table_curves_and_heatmaps(tmp_path):
    rows = [_row("c", r, v, v - 0.1, v + 0.1, maxvio_global=0.1, maxvio_global_ci_low=-0.05,
                 maxvio_global_ci_high=0.25) for r, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    md = training_section(_data(rows, _steps()), tmp_path)
    assert (tmp_path / "training.csv").exists()
    assert "[0, 0.25]" in md and "-0.05" not in md
    assert "one panel per router and seed" in md
    assert len(list((tmp_path / "plots").glob("train_specialisation_*.png"))) == 1

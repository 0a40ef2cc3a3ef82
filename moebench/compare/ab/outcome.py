"""What `moebench ab` found, as a user meets it: the summary table (per router and phase:
ratio B/A, interval, verdict and reason, most severe first), the deterministic comparison
(`moebench compare --metrics deterministic` of the two sides' rows), the exit code, a run
folder per side and ``ab.json`` with every pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from moebench.compare.ab.driver import Cell, Group
from moebench.compare.ab.stats import hodges_lehmann, min_pairs, severity_key, shift_interval
from moebench.compare.verdicts import Comparison
from moebench.core.timing_stats import summarize
from moebench.store.durable import write_json_atomic
from moebench.store.runs import RunDir, utc_now

FORMAT = "moebench-ab"
PHASE_ORDER = {"route": 0, "dispatch": 1, "combine": 2}


@dataclass
class Outcome:
    """Everything one `ab` found. ``groups``: the router-phase verdicts; ``deterministic``:
    the comparison of the two sides' routing metrics; ``errors``: rows ok in A, error in B."""

    groups: list[Group]
    cells: list[Cell]
    deterministic: Comparison
    alpha: float
    min_effect: float
    rounds: int
    notes: list[str] = field(default_factory=list)

    @property
    def slower(self) -> list[Group]:
        return [g for g in self.groups if g.verdict == "slower"]

    @property
    def exit_code(self) -> int:
        if self.slower or self.deterministic.regressions:
            return 1
        if not self.groups and self.deterministic.matched == 0:
            return 2
        return 0


def cell_interval(cell: Cell, alpha: float, cells: int):
    """The cell's own interval (details only, never gating): Bonferroni over the cells."""
    return shift_interval(cell.log_ratios(), alpha / max(1, cells))


def reason(g: Group, o: Outcome) -> str:
    iv = g.interval
    n_cases = len(g.cells)
    above = sum(1 for c in g.cells if c.pairs and _hl(c) > 0)
    spread = f"{above} of {n_cases} cases above 1"
    if iv is None or iv.n == 0:
        return "no pairs: the set-up spent the budget (--budget-s longer)"
    if not math.isfinite(iv.low):
        return f"{iv.n} pairs, too few for this look's level (needs >= {min_pairs(iv.alpha)}); {spread}"
    bound = {"slower": f"above {1 + o.min_effect:.3g}", "faster": f"below {1 - o.min_effect:.3g}",
             "same": f"inside {1 - o.min_effect:.3g}-{1 + o.min_effect:.3g}",
             "undecided": f"straddles {1 - o.min_effect:.3g} or {1 + o.min_effect:.3g}"}[g.verdict]
    when = f"settled after {g.settled_at} pairs" if g.settled else f"{iv.n} pairs, budget spent"
    return f"interval {bound}; {when}; {spread}"


def _hl(cell: Cell) -> float:
    d = [x for x in cell.log_ratios() if math.isfinite(x)]
    return hodges_lehmann(d) if d else 0.0


def summary_rows(o: Outcome) -> list[dict]:
    rows = []
    for g in o.groups:
        iv = g.interval
        ratio = iv.ratio if iv and iv.n else math.nan
        rows.append({"router": g.router, "phase": g.phase, "device": g.device, "cases": len(g.cells),
                     "pairs": iv.n if iv else 0, "ratio": ratio,
                     "low": iv.ratio_low if iv and math.isfinite(iv.low) else None,
                     "high": iv.ratio_high if iv and math.isfinite(iv.high) else None,
                     "alpha": iv.alpha if iv else None, "verdict": g.verdict, "reason": reason(g, o),
                     "settled_at": g.settled_at})
    rows.sort(key=lambda r: (*severity_key(r["verdict"], r["ratio"]), PHASE_ORDER.get(r["phase"], 9), r["router"]))
    return rows


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_text(o: Outcome, header: list[str], details: bool = False) -> str:
    """The summary table first, then the deterministic comparison and the result line."""
    rows = summary_rows(o)
    devices = len({r["device"] for r in rows}) > 1
    table = [["router", "phase"] + (["device"] if devices else []) + ["ratio B/A", "interval", "verdict", "reason"]]
    for r in rows:
        interval = f"{_fmt(r['low'])}-{_fmt(r['high'])}" if r["low"] is not None else "-"
        table.append([r["router"], r["phase"]] + ([r["device"]] if devices else [])
                     + [_fmt(r["ratio"]), interval, r["verdict"], r["reason"]])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]) - 1)]
    lines = list(header)
    for row in table:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)) + "  " + str(row[-1]))
    if rows:
        lines.append(f"(intervals are simultaneous: {1 - o.alpha:.0%} for all {len(rows)} router-phases and every "
                     f"look together; a verdict needs the whole interval beyond 1 +/- {o.min_effect:g})")
    lines += [f"note: {n}" for n in o.notes]
    if details:
        lines.append("per case (details, not gating; Bonferroni over the cells):")
        for c in sorted(o.cells, key=lambda c: (c.router, PHASE_ORDER.get(c.phase, 9), c.case_id)):
            iv = cell_interval(c, o.alpha, len(o.cells))
            lines.append(f"  {c.router} {c.phase} {c.case_id}: {_fmt(iv.ratio)} "
                         f"[{_fmt(iv.ratio_low)}-{_fmt(iv.ratio_high)}] {len(c.pairs)} pairs x {c.calls} calls, "
                         f"A {_fmt(statistics_median(c.blocks[0]), '.4g')} ms, B {_fmt(statistics_median(c.blocks[1]), '.4g')} ms")
    d = o.deterministic
    lines.append(f"deterministic metrics (as moebench compare --metrics deterministic): {d.matched} rows compared, "
                 f"{len(d.regressions)} regressions")
    shown = d.regressions if details else d.regressions[:20]
    for v in shown:
        lines.append(f"  REGRESSION {v.case_id} {v.router} {v.metric}: {v.a} -> {v.b}"
                     + (f" ({v.detail})" if v.detail else ""))
    if len(shown) < len(d.regressions):
        lines.append(f"  ... and {len(d.regressions) - len(shown)} more (--details)")
    lines += [f"note: {n}" for n in d.notes]
    lines.append(result_line(o))
    return "\n".join(lines) + "\n"


def statistics_median(xs: list[float]) -> float | None:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else None


def result_line(o: Outcome) -> str:
    slow = ", ".join(f"{g.router} {g.phase} x{g.interval.ratio:.3f}" for g in o.slower)
    parts = []
    if o.slower:
        parts.append(f"{len(o.slower)} slower ({slow})")
    if o.deterministic.regressions:
        parts.append(f"{len(o.deterministic.regressions)} deterministic regressions")
    if o.exit_code == 2:
        return "result: ERROR: nothing was compared"
    return f"result: FAIL: {'; '.join(parts)}" if parts else "result: PASS"


def side_rows(rows: list[dict], cells: list[Cell], side: int, cell_info: list[dict]) -> list[dict]:
    """The side's rows (its deterministic metrics) with the `<phase>.*` time columns of its
    blocks (one sample per block: the block's median), so report and compare read them."""
    by_row: dict[tuple, dict] = {}
    for c in cells:
        stats = summarize(c.blocks[side]) if c.blocks[side] else None
        cols = {f"{c.phase}.status": "ok", f"{c.phase}.reason": None, f"{c.phase}.calls_per_block": c.calls}
        if stats is not None:
            cols.update(stats.as_row(c.phase))
        by_row.setdefault((c.case_id, c.router), {}).update(cols)
    for info in cell_info:
        if info.get("status") != "ok":
            by_row.setdefault((info["case_id"], info["router"]), {}).update(
                {f"{info['phase']}.status": "skipped", f"{info['phase']}.reason": info.get("reason")})
    return [{**r, **by_row.get((r.get("case_id"), r.get("router")), {})} for r in rows]


def write_side(path: Path, meta: dict, rows: list[dict], suite_text: str) -> RunDir:
    run = RunDir(path)
    run.create({**meta, "status": "running"}, suite_text)
    for row in rows:
        run.append_row(row)
    run.update_meta(status="complete", ended_at=utc_now())
    return run


def write_ab_json(path: Path, o: Outcome, record: dict) -> None:
    cells = []
    for c in o.cells:
        iv = cell_interval(c, o.alpha, len(o.cells))
        cells.append({"key": c.key, "case_id": c.case_id, "router": c.router, "phase": c.phase, "device": c.device,
                      "calls_per_block": c.calls, "est_ms": list(c.est_ms), "ratio": iv.ratio,
                      "low": iv.ratio_low, "high": iv.ratio_high if math.isfinite(iv.high) else None,
                      "pairs": [{"a_ms": a, "b_ms": b, "first": "A" if f == 0 else "B", "a_min_ms": fa, "b_min_ms": fb}
                                for (a, b, f), (fa, fb) in zip(c.pairs, c.fastest)]})
    doc = {"format": FORMAT, "version": 1, **record, "alpha": o.alpha, "min_effect": o.min_effect,
           "pairs": o.rounds, "exit_code": o.exit_code, "result": result_line(o),
           "summary": summary_rows(o), "cells": cells,
           "deterministic": {k: v for k, v in o.deterministic.to_dict().items() if k != "rows"},
           "notes": o.notes}
    write_json_atomic(path, json.loads(json.dumps(doc, default=str)))

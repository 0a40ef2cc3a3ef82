"""Phases that were not timed: the report's "Phases not timed" table and section.

A row can be ``ok`` (its routing and metrics measured) while one of its timed phases is not:
``<phase>.status`` is ``skipped`` (cuda_graph: a phase the router cannot capture) or ``error``
(building, preparing or measuring it raised), with ``<phase>.reason`` and, for errors,
``<phase>.error_at`` (see ``moebench.run.runner._time_phase``). Rows that are not ok at all are the
"Skipped and failed rows" table's; this module only looks at ok rows.

:func:`phases_not_timed_table` has one line per (case, router, phase), written as
``phases_not_timed.csv``; the Markdown section groups it per router x phase x status x reason,
so that a suite where one router cannot capture its route in every case reads as one line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moebench.report import tables
from moebench.report.markdown import escape
from moebench.core.metrics import PHASES

COLUMNS = ("case", "router", "phase", "status", "reason", "error_at")
LISTED_CASES = 3  # case labels named in a grouped line; beyond that only the count


def phases_not_timed_table(rows: pd.DataFrame) -> pd.DataFrame:
    """``case, router, phase, status, reason, error_at, run_id, case_id``: one line per phase
    of an ok row whose ``<phase>.status`` is present and not ok; sorted like the other tables
    (case axes, run, router in suite order), phases in PHASES order. Empty (with those
    columns) when every phase was timed."""
    empty = pd.DataFrame(columns=[*COLUMNS, *tables.KEY_TAIL])
    ok = tables.ok_rows(rows) if not rows.empty else rows
    if ok.empty:
        return empty
    records = []
    for _, row in ok.iterrows():
        for phase in PHASES:
            status = row.get(f"{phase}.status")
            if not isinstance(status, str) or status == "ok":
                continue  # None/NaN: a row without per-phase status (older runs, other kinds)
            records.append({
                "case": row["case"], "router": row["router"], "phase": phase, "status": status,
                "reason": _text(row.get(f"{phase}.reason")), "error_at": _text(row.get(f"{phase}.error_at")),
                **{k: row.get(k) for k in tables.KEY_TAIL},
            })
    return pd.DataFrame.from_records(records, columns=list(empty.columns)) if records else empty


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def grouped(table: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``router, phase, status, reason, error_at, rows, of, cases``: the lines of
    :func:`phases_not_timed_table` counted per router x phase x status x reason (x error_at),
    in first-appearance order. ``rows``: how many; ``of``: how many ok rows that router has
    (so "12 of 12" reads as every case); ``cases``: up to LISTED_CASES distinct case labels."""
    out = pd.DataFrame(columns=["router", "phase", "status", "reason", "error_at", "rows", "of", "cases"])
    if table.empty:
        return out
    ok = tables.ok_rows(rows)
    per_router = ok["router"].value_counts().to_dict()
    keys = ["router", "phase", "status", "reason", "error_at"]
    records = []
    for key, group in table.fillna({"reason": "", "error_at": ""}).groupby(keys, sort=False):
        labels = list(dict.fromkeys(group["case"]))
        shown = "; ".join(labels[:LISTED_CASES]) + (f"; and {len(labels) - LISTED_CASES} more"
                                                    if len(labels) > LISTED_CASES else "")
        records.append({**dict(zip(keys, key)), "rows": len(group),
                        "of": per_router.get(key[0], len(group)), "cases": shown})
    return pd.DataFrame.from_records(records, columns=list(out.columns))


def markdown(table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """The grouped lines as a Markdown table: router, phase, status, reason (with ``at
    <file:line>`` for errors), rows ("3 of 12") and the cases."""
    lines = ["| router | phase | status | reason | rows | cases |", "|---|---|---|---|---:|---|"]
    for _, g in grouped(table, rows).iterrows():
        reason = (g["reason"] or "(no reason recorded)") + (f" (at `{g['error_at']}`)" if g["error_at"] else "")
        cells = [g["router"], g["phase"], g["status"], reason, f"{g['rows']} of {g['of']}", g["cases"]]
        lines.append("| " + " | ".join(escape(str(c)) for c in cells) + " |")
    return "\n".join(lines)


def section(data, out_dir: Path) -> str | None:
    """The report section (see :mod:`moebench.report.build`); None when every phase of every ok row
    was timed. Reads ``data.tables["phases_not_timed"]``."""
    table = data.tables.get("phases_not_timed")
    if table is None or table.empty:
        return None
    return "\n".join([
        "## Phases not timed", "",
        "Rows whose routing and metrics were measured but one timed phase was not: `skipped` (the "
        "timing mode cannot run it, e.g. a route that cannot be captured into a CUDA graph) or "
        "`error` (building, preparing or measuring it raised). Their cells in the throughput table "
        "read the status instead of a number. One line per router, phase and reason; "
        "`phases_not_timed.csv` has one line per case.", "",
        markdown(table, data.rows),
    ])

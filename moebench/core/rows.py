"""What every stage knows about a result row: its key, its statuses and which rows count.

A row (one line of rows.jsonl) is one router measured on one case; ``ROW_KEY`` names it, and
``PHASES`` are its timed phases (defined here, torch-free, so the pytest plugin can read them).
Only ``ok`` rows hold measurements: tables, fits, comparisons and exports read those
(:func:`ok_only`); ``skipped`` and ``error`` rows carry a ``reason`` instead. Reading rows from
disk (de-duplication included) is :mod:`moebench.store.reader`; this module is pure, so that
core's own users (``core.scaling``) can share it.
"""

from __future__ import annotations

from typing import Any, TypeVar

ROW_KEY = ("case_id", "router")  # one row per key; a repeated key is a resumed or joined run
PHASES = ("route", "dispatch", "combine")  # the timed phases: a row's "<phase>.<stat>" columns
OK, SKIPPED, ERROR = "ok", "skipped", "error"
STATUSES = (OK, SKIPPED, ERROR)

Rows = TypeVar("Rows")


def is_ok(row: Any) -> bool:
    """Whether one row (a dict) was measured: its ``status`` is ``ok``."""
    return isinstance(row, dict) and row.get("status") == OK


def ok_only(rows: Rows) -> Rows:
    """The ok rows of ``rows``: a list of row dicts, or a DataFrame of rows (duck-typed, so core
    needs no pandas import here).

    A DataFrame without a ``status`` column is returned whole (a table built by hand, e.g. in a
    test, holds measurements only); a dict without ``status`` is not ok.
    """
    columns = getattr(rows, "columns", None)
    if columns is not None:  # a DataFrame
        return rows[rows["status"] == OK] if "status" in columns else rows
    return [r for r in rows if is_ok(r)]

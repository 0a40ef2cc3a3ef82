"""Markdown rendering of the result tables (:mod:`moebench.report.tables` builds them).

:func:`markdown_table` renders a table (no ``tabulate`` needed), bolding the best value of each
case for every column whose metric has a direction (see :mod:`moebench.core.metrics`);
:func:`pipe_table` is the plain renderer under it, for callers with their own cells.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from moebench.core.metrics import PHASES, Direction, direction

KEY_TAIL = ("run_id", "case_id")  # trailing identity columns of every table (hidden by default)
STREAM_STATS = ("first", "last", "mean", "worst")  # suffixes of the stream-table columns
TIE_RTOL = 5e-4  # values this close (relative) to the best tie with it: as printed, they match


# ----------------------------------------------------------------------------- directions

def column_direction(column: str) -> Direction:
    """Which way is better for a table column (metrics, peak_mb and stream statistics included)."""
    found = direction(column)
    if found != "none":
        return found
    if column.endswith(".peak_mb"):
        return direction(column[: -len("peak_mb")] + "peak_mem_bytes")
    for stat in STREAM_STATS:
        if column.endswith("_" + stat):
            return direction(column[: -len(stat) - 1])
    return "none"


def best_mask(table: pd.DataFrame, group_by: tuple[str, ...] = KEY_TAIL,
              references: Iterable[str] = ()) -> pd.DataFrame:
    """Booleans shaped like ``table``: True where a value is the best of its case (and run).

    Only columns with a direction are marked; values within TIE_RTOL of the best tie with it,
    and a case where every router ties marks nothing. Rows of a ``references`` router (a
    baseline) are never best and do not compete.
    """
    if references and "router" in table.columns:  # baselines are shown, never ranked
        table = table[~table["router"].astype(str).isin(set(map(str, references)))]
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    keys = [k for k in group_by if k in table.columns]
    if table.empty or not keys:
        return mask
    for column in table.columns:
        way = column_direction(column)
        if way == "none":
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        for _, idx in table.groupby(keys, sort=False, dropna=False).groups.items():
            v = values.loc[idx].dropna()
            if len(v) < 2 or np.isclose(v.min(), v.max(), rtol=TIE_RTOL, atol=0):
                continue
            best = v.min() if way == "lower" else v.max()
            mask.loc[v.index[np.isclose(v, best, rtol=TIE_RTOL, atol=0)], column] = True
    return mask


def legend(columns: Iterable[str]) -> str:
    """One line naming which direction is better for each column of a table."""
    lower = [c for c in columns if column_direction(c) == "lower"]
    higher = [c for c in columns if column_direction(c) == "higher"]
    parts = []
    if lower:
        parts.append("lower is better: " + ", ".join(f"`{c}`" for c in lower))
    if higher:
        parts.append("higher is better: " + ", ".join(f"`{c}`" for c in higher))
    if not parts:
        return ""
    return "Better: " + "; ".join(parts) + ". **Bold**: the best router of the case."


# ----------------------------------------------------------------------------- formatting

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def engineering(value: float) -> str:
    """3 significant digits with an SI prefix: 1234567 -> "1.23M", 950 -> "950"."""
    if value == 0:
        return "0"
    for i, (scale, prefix) in enumerate(_PREFIXES):
        if abs(value) >= scale or scale == 1.0:
            text = f"{value / scale:.3g}"
            if abs(float(text)) >= 1000 and i > 0:  # 999.7k rounds to 1e+03k: use the next prefix
                scale, prefix = _PREFIXES[i - 1]
                text = f"{value / scale:.3g}"
            return text + prefix
    return f"{value:.3g}"


def format_value(column: str, value, integer: bool = False) -> str:
    """A cell as text: ms with 3 decimals, tokens/s in engineering form, integers (``integer``:
    the column holds only whole numbers) as integers, other numbers with 3 decimals (3
    significant digits below 1); missing values as "-"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return str(value)
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if column.endswith("_ms"):
        return f"{value:.3f}"
    if column.endswith("tokens_per_s"):
        return engineering(value)
    if column.endswith("x_memcopy"):
        return f"{value:.1f}"
    if integer and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 0.9995:  # would round to 1.00 with 3 significant digits
        return f"{value:.3f}"
    return f"{value:.3g}"


def _whole(column: pd.Series) -> bool:
    values = pd.to_numeric(column, errors="coerce").dropna()
    values = values[np.isfinite(values)]
    return bool(len(values)) and bool((values == np.round(values)).all())


def escape(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def markdown_table(table: pd.DataFrame, hide: Iterable[str] = KEY_TAIL, bold: bool = True,
                   references: Iterable[str] = (), marks: pd.DataFrame | None = None,
                   tied: pd.DataFrame | None = None) -> str:
    """A GitHub Markdown table of ``table`` without the ``hide`` columns.

    The best value of each case is bolded (see :func:`best_mask`); a case label repeated on
    consecutive rows is written once. Numeric columns are right-aligned. ``<phase>.status``
    columns are not shown: a phase that is not ok has its status in its cells.
    """
    hide = set(hide) | {f"{p}.status" for p in PHASES}  # shown in their phase's cells instead
    shown = [c for c in table.columns if c not in hide]
    if table.empty:
        return "_No rows._"
    references = set(map(str, references))  # baselines: "(baseline)" after the name, never bold
    mask = (best_mask(table, references=references).reindex(index=table.index, fill_value=False) if bold
            else pd.DataFrame(False, index=table.index, columns=table.columns))
    if tied is not None:  # overlapping intervals: a tie, never bold (report/summary.time_cell_marks)
        mask = mask & ~tied.reindex_like(mask).fillna(False).astype(bool)
    numeric = {c: pd.api.types.is_numeric_dtype(table[c]) for c in shown}
    integer = {c: numeric[c] and _whole(table[c]) for c in shown}
    body = []
    previous_case = None
    for idx, row in table.iterrows():
        cells = []
        for c in shown:
            text = format_value(c, row[c], integer[c])
            untimed = row.get(f"{c.split('.', 1)[0]}.status") if "." in c else None
            if isinstance(untimed, str) and untimed != "ok":
                text = untimed  # "skipped"/"error", not "-": the phase was not timed at all
            elif c == "case":
                text, previous_case = ("" if text == previous_case else text), text
            elif c == "router" and text in references:
                text += " (baseline)"
            elif marks is not None and c in marks.columns and marks.at[idx, c] and text != "-":
                text += " †"  # a time that cannot be trusted (CI missing or wide): never bold
            elif mask.at[idx, c]:
                text = f"**{text}**"
            cells.append(escape(text))
        body.append(cells)
    return pipe_table(shown, body, [numeric[c] for c in shown])


def pipe_table(header: Sequence[str], rows: Iterable[Sequence[str]],
               right: Sequence[bool] | None = None) -> str:
    """A GitHub Markdown table: ``header`` (escaped here), then ``rows`` of cell text written
    as given (the caller escapes and bolds). ``right[i]``: right-align column i (numbers)."""
    right = list(right) if right is not None else [False] * len(header)
    lines = ["| " + " | ".join(escape(str(h)) for h in header) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)

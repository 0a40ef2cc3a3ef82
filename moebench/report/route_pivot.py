"""Routers side by side: one line per case, one column per router, the route phase's median.

The throughput table lists routers one under another; comparing two of them (moebench's
top-k with Megatron-Core's, say) means reading rows apart. Here each case is one line, each
cell the router's median route time and its ratio to the fastest router of that case, all
measured in the same process on the same logits.
"""

from __future__ import annotations

import pandas as pd

from moebench.report import tables
from moebench.report.markdown import escape


def side_by_side_table(rows: pd.DataFrame, phase: str = "route") -> pd.DataFrame:
    """``case, <router>..., run_id, case_id``: each router's ``<phase>.median_ms`` per case
    (NaN where it did not run), routers in suite order; empty without two timed routers."""
    column = f"{phase}.median_ms"
    if rows.empty or column not in rows.columns:
        return pd.DataFrame()
    ok = tables.ok_rows(rows)
    ok = ok[pd.to_numeric(ok[column], errors="coerce").notna()]
    routers = list(dict.fromkeys(ok["router"]))
    if len(routers) < 2:
        return pd.DataFrame()
    keys = ["case", *tables.KEY_TAIL]
    wide = ok.pivot_table(index=keys, columns="router", values=column, aggfunc="first", sort=False)
    wide = wide.reindex(columns=routers).reset_index()
    wide.columns.name = None
    return wide[["case", *routers, *tables.KEY_TAIL]]


def markdown(table: pd.DataFrame, hide: tuple[str, ...] = tables.KEY_TAIL) -> str:
    """Cells as ``ms (r×)``, r = median / the case's fastest median; the fastest in bold.
    A combined report (``run_id`` not hidden) names the run after the case."""
    routers = [c for c in table.columns if c not in ("case", *hide, *tables.KEY_TAIL)]
    shown = ["case", *routers]
    lines = ["| " + " | ".join(escape(c) for c in shown) + " |",
             "|---|" + "|".join("---:" for _ in routers) + "|"]
    for _, row in table.iterrows():
        values = pd.to_numeric(row[routers], errors="coerce")
        fastest = values.min()
        label = str(row["case"]) + ("" if "run_id" in hide else f" [{row['run_id']}]")
        cells = [escape(label)]
        for router in routers:
            v = values[router]
            if pd.isna(v):
                cells.append("-")
                continue
            text = f"{v:.3f} ({v / fastest:.1f}×)" if fastest > 0 else f"{v:.3f}"
            cells.append(f"**{text}**" if v == fastest else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

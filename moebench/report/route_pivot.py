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
from moebench.report.summary import unreliable


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
    bounds = []  # each router's 95% CI of the median, for ties and the unreliable mark
    for bound in ("ci_low", "ci_high"):
        source = f"{phase}.{bound}_ms"
        if source not in ok.columns:
            continue
        part = ok.pivot_table(index=keys, columns="router", values=source, aggfunc="first", sort=False,
                              dropna=False)
        part = part.reindex(columns=routers).reindex(pd.MultiIndex.from_frame(wide[keys]))
        for router in routers:
            wide[f"{router}{CI_SUFFIX[bound]}"] = part[router].to_numpy()
            bounds.append(f"{router}{CI_SUFFIX[bound]}")
    return wide[["case", *routers, *bounds, *tables.KEY_TAIL]]


CI_SUFFIX = {"ci_low": " ci_low_ms", "ci_high": " ci_high_ms"}


def _interval(row: pd.Series, router: str) -> tuple[float, float]:
    low, high = (row.get(f"{router}{CI_SUFFIX[b]}") for b in ("ci_low", "ci_high"))
    return (float(low) if low is not None and pd.notna(low) else float("nan"),
            float(high) if high is not None and pd.notna(high) else float("nan"))


def markdown(table: pd.DataFrame, hide: tuple[str, ...] = tables.KEY_TAIL, references=()) -> str:
    """Cells as ``ms (r×)``, r = median / the case's fastest non-baseline median (any router
    where all are baselines); that fastest in bold unless its 95% CI overlaps another
    non-baseline router's (a tie: nothing bold). ``†`` marks a median whose CI is missing or
    wider than 25% of it (:func:`moebench.report.summary.unreliable`). Baselines
    (``references``) are named "(baseline)" in the header and never bold. A combined report
    (``run_id`` not hidden) names the run after the case."""
    references = set(map(str, references))
    routers = [c for c in table.columns if c not in ("case", *hide, *tables.KEY_TAIL)
               and not c.endswith(tuple(CI_SUFFIX.values()))]
    ranked = [r for r in routers if r not in references] or routers
    shown = ["case", *(f"{r} (baseline)" if r in references else r for r in routers)]
    lines = ["| " + " | ".join(escape(c) for c in shown) + " |",
             "|---|" + "|".join("---:" for _ in routers) + "|"]
    for _, row in table.iterrows():
        values = pd.to_numeric(row[routers], errors="coerce")
        fastest = values[ranked].min()
        winner = values[ranked].idxmin() if values[ranked].notna().any() else None
        if winner is not None:  # a tie (overlapping CIs) with another ranked router: no bold
            w_low, w_high = _interval(row, winner)
            for other in ranked:
                o_low, o_high = _interval(row, other)
                if other != winner and pd.notna(values[other]) and not (
                        o_low > w_high or pd.isna(o_low) and values[other] > w_high):
                    winner = None
                    break
        label = str(row["case"]) + ("" if "run_id" in hide else f" [{row['run_id']}]")
        cells = [escape(label)]
        for router in routers:
            v = values[router]
            if pd.isna(v):
                cells.append("-")
                continue
            text = f"{v:.3f} ({v / fastest:.1f}×)" if fastest > 0 else f"{v:.3f}"
            if unreliable(v, *_interval(row, router)) and any(c.endswith(" ci_low_ms") for c in row.index):
                text += " †"
            cells.append(f"**{text}**" if router == winner else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

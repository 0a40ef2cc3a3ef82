"""The report's first section: machine load, the "best for" table per scenario, the headline
figure and one line per router per scenario (the numbers come from
:mod:`moebench.report.summary`; the figure from :mod:`moebench.report.headline`).

Markdown marks: ``†`` after a time that cannot be trusted (CI missing or wider than 25% of
the median; said once under the table), ``[low, high]`` a 95% interval, ``●`` a router on the
Pareto front, baselines in italics with "(baseline)". ``<!-- class: summary -->`` before a
table or figure is an HTML comment that report.html turns into a CSS class (the browser test
and the styles find the summary by it); Markdown viewers do not show it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from moebench.report.declarations import CONDITIONS, Declarations, declarations
from moebench.report.markdown import escape, pipe_table
from moebench.report.summary import (
    UNRELIABLE_SHARE, BestFor, Lens, best_for, lens_for, objectives, router_summary, scenario_labels,
)

DAGGER = "†"
BUSY_SHARE = 0.5  # a 1-minute load average above this share of the cores at the start: busy


# ----------------------------------------------------------------------------- machine load

def _load_text(meta: dict) -> tuple[str, bool]:
    """("start 0.4, end 2.1 on 2 cores", busy) from meta ``load`` ({start, end}: {loadavg, cores})."""
    load = meta.get("load") if isinstance(meta.get("load"), dict) else {}
    parts, busy, cores = [], False, None
    for when in ("start", "end"):
        snap = load.get(when) if isinstance(load.get(when), dict) else {}
        avg, cores = snap.get("loadavg"), snap.get("cores") or cores
        if isinstance(avg, list) and avg and isinstance(avg[0], (int, float)):
            parts.append(f"{avg[0]:.2f} at the {when}")
            if cores:
                # at the start the run adds nothing yet; at the end it may add its own threads
                limit = BUSY_SHARE * cores if when == "start" else cores + BUSY_SHARE * cores
                busy = busy or avg[0] > limit
    if not parts:
        return "not recorded (the run predates the record)", False
    return "1-minute load average " + ", ".join(parts) + (f" on {cores} cores" if cores else ""), busy


def load_lines(metas: list[dict]) -> list[str]:
    """One line per run on the machine's load, with a warning when it was busy."""
    lines = []
    for meta in metas:
        text, busy = _load_text(meta)
        run = f" (run `{meta.get('run_id')}`)" if len(metas) > 1 else ""
        warn = (" **Busy: other work shared the CPU, so times may be inflated and noisy; rerun on a "
                "quiet machine before trusting them.**") if busy else ""
        lines.append(f"Machine load during the run{run}: {text}.{warn}")
    return lines


# ----------------------------------------------------------------------------- cells

def _is_nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _value(metric: str, v) -> str:
    if _is_nan(v):
        return "-"
    if "drop_rate" in metric:  # a small nonzero rate must not read as 0.0%
        return "0%" if v == 0 else (f"{100 * v:.2g}%" if v < 0.01 else f"{100 * v:.1f}%")
    return f"{v:.2f}" if abs(v) < 10 else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")


def cell(row: pd.Series, metric: str) -> str:
    """``value [low, high]`` (the interval only where there is one)."""
    text = _value(metric, row.get(metric))
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if not (_is_nan(low) or _is_nan(high)) and text != "-":
        text += f" [{_value(metric, low)}, {_value(metric, high)}]"
    return text


def ratio_cell(row: pd.Series, prefix: str) -> str:
    v = row.get(f"{prefix}_ratio")
    if _is_nan(v):
        return "-"
    text = f"{v:.2f}×"
    low, high = row.get(f"{prefix}_ratio_low"), row.get(f"{prefix}_ratio_high")
    if not (_is_nan(low) or _is_nan(high)):
        text += f" [{low:.2f}, {high:.2f}]"
    return text + (f" {DAGGER}" if row.get(f"{prefix}_unreliable") else "")


def _router(row: pd.Series) -> str:
    name = escape(str(row["router"]))
    if row["baseline"]:
        return f"_{name}_ (baseline)"
    if row["cases"] < row["scenario_cases"]:
        return f"{name} ({row['cases']}/{row['scenario_cases']} cases)"
    return name


def _names(rows: pd.DataFrame, labels: tuple[str, ...], metric: str | None) -> str:
    if not labels:
        return "-"
    text = ", ".join(escape(x) for x in labels)
    if len(labels) > 1:
        text += " (tie)"
    if metric is not None:
        first = rows[rows["router"] == labels[0]].iloc[0]
        value = ratio_cell(first, "time") if metric == "time_ratio" else _value(metric, first[metric])
        text += f" ({value})" if len(labels) == 1 else ""
    return text


def _fastest(rows: pd.DataFrame, labels: tuple[str, ...], lens: Lens) -> str:
    """The fastest routers whatever they drop, with the drops of the first."""
    if not labels:
        return "-"
    first = rows[rows["router"] == labels[0]].iloc[0]
    text = ", ".join(escape(x) for x in labels) + (" (tie)" if len(labels) > 1 else "")
    return text + f" (drops {_value(lens.drops, first[lens.drops])})"


# ----------------------------------------------------------------------------- tables

def _titles(lens: Lens) -> dict[str, str]:
    what = {"route": "route", "train.step_ms": "step", "layer_ms": "layer"}.get(lens.time or "", lens.time or "")
    return {"balance": lens.balance.replace("_", " "), "drops": lens.drops.replace("_", " "),
            "time": f"{what} time × fastest", "move": "dispatch+combine × fastest"}


def best_table(summary: pd.DataFrame, lens: Lens) -> str:
    """One line per scenario: the "best for" routers and the Pareto front."""
    titles = _titles(lens)
    header = ["scenario", "most balanced without drops", "fewest drops at this capacity"]
    header += [f"fastest at equal drops ({titles['time'].split(' ×')[0]})", "fastest"] if lens.time else []
    header += [f"best {lens.quality.replace('_', ' ')}"] if lens.quality else []
    header += ["Pareto front"]
    body = []
    for scenario, part in summary.groupby("scenario", sort=False):
        best: BestFor = best_for(part, lens)
        cells = [escape(scenario),
                 _names(part, best.balanced_without_drops, lens.balance)
                 if best.balanced_without_drops else "none keeps every token",
                 "every router keeps every token" if best.no_drops_anywhere
                 else _names(part, best.fewest_drops, lens.drops)]
        if lens.time:
            cells.append(_names(part, best.fastest_at_equal_drops, "time_ratio"))
            cells.append("the same" if best.fastest == best.fastest_at_equal_drops and best.fastest
                         else _fastest(part, best.fastest, lens))
        if lens.quality:
            cells.append(_names(part, best.best_quality, lens.quality))
        front = part[part["pareto"]]["router"]
        cells.append(", ".join(escape(r) for r in front) or "-")
        body.append(cells)
    return pipe_table(header, body)


def router_table(summary: pd.DataFrame, lens: Lens) -> str:
    """One line per scenario x router, the scenario written once."""
    titles = _titles(lens)
    header = ["scenario", "router", titles["balance"], titles["drops"]]
    header += [lens.quality.replace("_", " ")] if lens.quality else []
    header += [titles["time"]] if lens.time else []
    header += [titles["move"]] if "move_ratio" in summary.columns else []
    header += ["front"]
    body, previous = [], None
    for _, row in summary.iterrows():
        scenario = "" if row["scenario"] == previous else escape(row["scenario"])
        previous = row["scenario"]
        cells = [scenario, _router(row), cell(row, lens.balance), cell(row, lens.drops)]
        cells += [cell(row, lens.quality)] if lens.quality else []
        cells += [ratio_cell(row, "time")] if lens.time else []
        cells += [ratio_cell(row, "move")] if "move_ratio" in summary.columns else []
        cells.append("ref" if row["baseline"] else ("●" if row["pareto"] else ""))
        body.append(cells)
    return pipe_table(header, body, [False, False] + [True] * (len(header) - 3) + [False])


def notes_lines(rows: pd.DataFrame, decl: Declarations) -> list[str]:
    """One line per (router, condition) whose condition holds in some scenario the router ran."""
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    if ok.empty or not decl.notes:
        return []
    ok = ok.assign(_scenario=scenario_labels(ok).values)
    cf = ok["capacity_factor"] if "capacity_factor" in ok.columns else pd.Series(None, index=ok.index)
    batches = pd.to_numeric(ok["batches"], errors="coerce") if "batches" in ok.columns else pd.Series(1, index=ok.index)
    holds = {"dropless": cf.isna(), "capacity": cf.notna(), "single_batch": batches.fillna(1) <= 1,
             "always": pd.Series(True, index=ok.index)}
    lines = []
    for router, notes in decl.notes.items():
        mine = ok["router"].astype(str) == router
        for condition, text in notes.items():
            where = ok.loc[mine & holds[condition], "_scenario"].unique()
            if len(where):
                scope = "" if condition == "always" else f", {CONDITIONS[condition]}"
                lines.append(f"- **{escape(router)}**{scope}: {escape(text)}.")
    return lines


# ----------------------------------------------------------------------------- section

def summary_markdown(rows: pd.DataFrame, metas: list[dict], out_dir: Path, plot_dir: str = "plots") -> str | None:
    """The summary section's Markdown (writes the headline figure); None without ok rows."""
    decl = declarations(metas, rows)
    summary = router_summary(rows, decl.baseline)
    if summary.empty:
        return None
    lens = lens_for(rows[rows["status"] == "ok"] if "status" in rows.columns else rows)
    front = ", ".join(t.replace("_ratio", "").replace("_", " ") for t in objectives(lens))
    body = ["## Summary", ""] + load_lines(metas) + [""]
    body += ["<!-- class: summary -->", best_table(summary, lens), ""]
    how = [f"Which router for which traffic, per scenario (workload × capacity regime, over its "
           f"cases), among the non-baseline routers that ran every case; ties (overlapping "
           f"intervals, equal exact values) are listed together. Pareto front over {front}.", ""]
    from moebench.report.headline import plot_headline  # matplotlib only when a report draws

    figure = plot_headline(summary, lens, out_dir / plot_dir)
    if figure is not None:
        rel = figure.relative_to(out_dir).as_posix()
        body += ["<!-- class: headline -->",
                 f"![Headline: {lens.drops.replace('_', ' ')} against time, coloured by {lens.balance}]({rel})", "",
                 "Each point is a router's scenario: black-edged points (bold labels) are on the "
                 "Pareto front; baselines are hollow or faded (references, never best); bars are "
                 "95% intervals.", ""]
    body += how  # after the figure: the first screen shows the table and the figure
    body += ["### Routers per scenario", "", "<!-- class: summary -->", router_table(summary, lens), ""]
    legend = [f"Times are ratios to the fastest non-baseline router of each case (geometric mean "
              f"over the scenario's cases); `[low, high]` is a 95% interval; {DAGGER} marks a time "
              f"that cannot be trusted: too few rounds for an interval, or an interval wider than "
              f"{UNRELIABLE_SHARE:.0%} of the median. Balance and drops without an interval are "
              f"exact (the same inputs for every router). ● Pareto front; _baseline_: a reference "
              f"point, never ranked."]
    body += legend
    notes = notes_lines(rows, decl)
    if notes:
        body += ["", "Read with care:", ""] + notes
    return "\n".join(body)

"""The verdict a report opens with: per scenario, one line per router, the Pareto front and a
"best for" line generated from the data (pure pandas/numpy; rendered by
:mod:`moebench.report.summary_section`).

A **scenario** is a workload (with its parameters) x a capacity regime (a capacity factor, or
dropless); its cases are the other axes (tokens, experts, top_k, seeds, ...). Per router and
scenario (the router's ok rows of that scenario):

- balance and drops (``Lens.balance``, ``Lens.drops``): the mean over the cases. Its interval is
  the 95% interval over seeds where the rows carry one (``<metric>_ci_low/_ci_high``, training)
  or where the scenario has several seeds (t interval of the per-seed means); else the value is
  exact (deterministic metrics on the same inputs) and has none. Intervals are clipped to the
  metric's range (:data:`RANGES`).
- time (``Lens.time``): per case, the router's median over the median of the fastest
  non-baseline router of the case; the scenario's ratio is the geometric mean over its cases.
  The ratio's interval divides the router's 95% CI bounds by the reference's opposite bounds
  (``low/ref_high``, ``high/ref_low``), geometric mean over the cases. A time is **unreliable**
  when a case's CI is missing (too few rounds) or wider than :data:`UNRELIABLE_SHARE` of its
  median; a time measured without a CI (training step, expert-parallel layer) always is, and
  only CI-carrying times join the Pareto front.

Comparisons: two deterministic values tie within ``TIE_RTOL`` (relative) or ``TIE_ATOL``; two
values with intervals tie where the intervals overlap. A tie is never a win. Baselines (declared
by the router: softmax_dense, random, round_robin) are shown as references and never enter the
front or the "best for" line; neither do routers that ran only some of the scenario's cases
(their means would be over other cases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

UNRELIABLE_SHARE = 0.25  # a time whose 95% CI is wider than this share of its median is marked
TIE_RTOL = 5e-4
TIE_ATOL = 1e-9
RANGES = {  # (low, high) of a metric's values; intervals are clipped to these
    "imbalance": (1.0, math.inf), "maxvio_global": (0.0, math.inf), "maxvio_batch": (0.0, math.inf),
    "rank_imbalance": (1.0, math.inf), "drop_rate": (0.0, 1.0), "token_drop_rate": (0.0, 1.0),
    "nmi": (0.0, 1.0), "dead_experts": (0.0, math.inf), "eval_loss": (0.0, math.inf),
    "perplexity": (1.0, math.inf),
}


def clip(metric: str, low: float, high: float) -> tuple[float, float]:
    """``(low, high)`` clipped to the metric's range (:data:`RANGES`; times and ratios >= 0)."""
    lo, hi = RANGES.get(metric, (0.0, math.inf) if metric.endswith(("_ms", "ratio")) else (-math.inf, math.inf))
    return (min(max(low, lo), hi), max(min(high, hi), lo))


@dataclass(frozen=True)
class Lens:
    """Which columns a kind of run is judged on: balance, drops, time (a ``<phase>`` with
    ``<phase>.median_ms`` and CI columns, or a plain column without CI), and an optional
    quality metric (training: held-out loss) that joins the front."""

    balance: str
    drops: str
    time: str | None
    time_phases: tuple[str, ...] = ()  # extra phases shown as one summed ratio (dispatch + combine)
    quality: str | None = None

    def time_column(self) -> str | None:
        return None if self.time is None else (f"{self.time}.median_ms" if self.phase_timed else self.time)

    @property
    def phase_timed(self) -> bool:
        return self.time in ("route", "dispatch", "combine")


def lens_for(rows: pd.DataFrame) -> Lens:
    """The lens for these rows: training rows (kind train) by held-out loss, MaxVio_global,
    drop rate and step time; expert-parallel rows by rank imbalance and layer time; others by
    imbalance, token drop rate and route time (with dispatch + combine)."""
    cols = set(rows.columns)
    kinds = set(rows["kind"].dropna().astype(str)) if "kind" in cols else set()
    if "train" in kinds:
        return Lens("maxvio_global" if "maxvio_global" in cols else "imbalance", "drop_rate",
                    "train.step_ms" if "train.step_ms" in cols else None, quality="eval_loss")
    if "layer_ms" in cols and "route.median_ms" not in cols:
        return Lens("imbalance", "token_drop_rate" if "token_drop_rate" in cols else "drop_rate", "layer_ms")
    phases = tuple(p for p in ("dispatch", "combine") if f"{p}.median_ms" in cols)
    return Lens("imbalance", "token_drop_rate" if "token_drop_rate" in cols else "drop_rate",
                "route" if "route.median_ms" in cols else None, phases)


# ----------------------------------------------------------------------------- scenarios

def _fmt(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def scenario_labels(rows: pd.DataFrame) -> pd.Series:
    """"<workload> [(params)] · cf=<factor>" or "· dropless" per row."""
    def one(row) -> str:
        name = str(row.get("workload", "?"))
        params = row.get("workload_params")
        if isinstance(params, str) and params not in ("", "{}"):
            try:
                import json
                parsed = json.loads(params)
                name += " (" + ", ".join(f"{k}={v}" for k, v in parsed.items()) + ")"
            except ValueError:
                name += f" {params}"
        cf = row.get("capacity_factor")
        regime = "dropless" if cf is None or (isinstance(cf, float) and math.isnan(cf)) else f"cf={_fmt(cf)}"
        return f"{name} · {regime}"
    return pd.Series([one(r) for _, r in rows.iterrows()], index=rows.index, dtype=object)


# ----------------------------------------------------------------------------- per router

def _num(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce") if column in frame.columns else pd.Series(np.nan, index=frame.index)


def _mean_interval(part: pd.DataFrame, metric: str) -> tuple[float, float, float]:
    """(mean, low, high) of a deterministic metric over a router's cases in a scenario."""
    values = _num(part, metric)
    mean = float(values.mean()) if values.notna().any() else math.nan
    low, high = _num(part, f"{metric}_ci_low"), _num(part, f"{metric}_ci_high")
    if low.notna().any() and high.notna().any():
        lo, hi = float(low.mean()), float(high.mean())
    elif "seed" in part.columns and part["seed"].nunique() > 1:
        per_seed = values.groupby(part["seed"]).mean().dropna()
        n = len(per_seed)
        half = float(_t975(n - 1) * per_seed.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        lo, hi = mean - half, mean + half
    else:
        return mean, math.nan, math.nan
    if math.isnan(lo) or math.isnan(hi):
        return mean, math.nan, math.nan
    lo, hi = clip(metric, lo, hi)
    return mean, lo, hi


def _t975(dof: int) -> float:
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    return table.get(dof, 1.96 + 2.4 / max(dof, 1))


def _phase_frame(rows: pd.DataFrame, phases: tuple[str, ...]) -> pd.DataFrame:
    """median, low, high (ms) summed over ``phases`` per row (NaN where any is missing)."""
    med = sum(_num(rows, f"{p}.median_ms") for p in phases)
    low = sum(_num(rows, f"{p}.ci_low_ms") for p in phases)
    high = sum(_num(rows, f"{p}.ci_high_ms") for p in phases)
    return pd.DataFrame({"med": med, "low": low, "high": high}, index=rows.index)


def unreliable(median, low, high, share: float = UNRELIABLE_SHARE) -> bool:
    """True when a time cannot be trusted: no CI (too few rounds) or a CI wider than ``share``
    of the median."""
    values = [median, low, high]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return True
    return bool(median <= 0 or (high - low) > share * median)


def _time_ratios(ok: pd.DataFrame, baseline: set[str], lens: Lens, phases: tuple[str, ...]) -> pd.DataFrame:
    """Per row: ratio, ratio_low, ratio_high to the fastest non-baseline router of its case, and
    whether the row's time is unreliable."""
    out = pd.DataFrame(index=ok.index, columns=["ratio", "ratio_low", "ratio_high", "unreliable"], dtype=float)
    if not phases:
        return out
    if lens.phase_timed:
        t = _phase_frame(ok, phases)
    else:
        med = _num(ok, phases[0])
        t = pd.DataFrame({"med": med, "low": np.nan, "high": np.nan}, index=ok.index)
    case_key = ok["case_id"].astype(str) + "|" + ok.get("run_id", pd.Series("", index=ok.index)).astype(str)
    for _, idx in ok.groupby(case_key, sort=False).groups.items():
        part = t.loc[idx]
        candidates = part[~ok.loc[idx, "router"].astype(str).isin(baseline)]["med"].dropna()
        candidates = candidates[candidates > 0]
        if candidates.empty:
            continue
        ref = candidates.idxmin()
        ref_med, ref_low, ref_high = t.at[ref, "med"], t.at[ref, "low"], t.at[ref, "high"]
        out.loc[idx, "ratio"] = part["med"] / ref_med
        if lens.phase_timed and not (math.isnan(ref_low) or math.isnan(ref_high)) and ref_low > 0:
            out.loc[idx, "ratio_low"] = part["low"] / ref_high
            out.loc[idx, "ratio_high"] = part["high"] / ref_low
        # a time without a CI (training step, layer time) cannot be told from noise: unreliable
        out.loc[idx, "unreliable"] = [float(unreliable(m, lo, hi))
                                      for m, lo, hi in zip(part["med"], part["low"], part["high"])]
    return out


def _geomean(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce")
    if v.isna().any() or (v <= 0).any() or v.empty:
        return math.nan
    return float(np.exp(np.log(v).mean()))


def router_summary(rows: pd.DataFrame, baseline: set[str] | frozenset[str] = frozenset(),
                   lens: Lens | None = None) -> pd.DataFrame:
    """One row per scenario x router (suite order within a scenario): ``scenario, router,
    baseline, cases, coverage`` (cases run / cases in the scenario), balance/drops/quality as
    ``<metric>, <metric>_low, <metric>_high``, ``time_ratio[_low/_high]``, ``time_unreliable``,
    ``move_ratio[...]`` (dispatch + combine), ``eligible`` (non-baseline, every case) and
    ``pareto``. Empty without ok rows."""
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    if ok.empty or "router" not in ok.columns:
        return pd.DataFrame()
    lens = lens or lens_for(ok)
    baseline = set(map(str, baseline))
    ok = ok.assign(scenario=scenario_labels(ok).values, router=ok["router"].astype(str))
    if "case_id" not in ok.columns:
        ok = ok.assign(case_id=[str(i) for i in range(len(ok))])
    time_phases = (lens.time,) if lens.time else ()
    times = _time_ratios(ok, baseline, lens, time_phases)
    moves = _time_ratios(ok, baseline, lens, lens.time_phases) if lens.time_phases else None
    order = ok["router_rank"] if "router_rank" in ok.columns else pd.Series(0, index=ok.index)
    records = []
    for scenario, group in ok.groupby("scenario", sort=False):
        n_cases = group["case_id"].nunique()
        for router, part in group.groupby("router", sort=False):
            rec = {"scenario": scenario, "router": router, "baseline": router in baseline,
                   "cases": part["case_id"].nunique(), "scenario_cases": n_cases,
                   "_rank": order.loc[part.index].min()}
            for metric in (lens.balance, lens.drops) + ((lens.quality,) if lens.quality else ()):
                rec[metric], rec[f"{metric}_low"], rec[f"{metric}_high"] = _mean_interval(part, metric)
            for prefix, frame in (("time", times), ("move", moves)):
                if frame is None:
                    continue
                mine = frame.loc[part.index]
                rec[f"{prefix}_ratio"] = _geomean(mine["ratio"])
                rec[f"{prefix}_ratio_low"] = _geomean(mine["ratio_low"])
                rec[f"{prefix}_ratio_high"] = _geomean(mine["ratio_high"])
                rec[f"{prefix}_unreliable"] = bool((mine["unreliable"].fillna(1.0) > 0).any())
            records.append(rec)
    out = pd.DataFrame.from_records(records)
    out["eligible"] = ~out["baseline"] & (out["cases"] == out["scenario_cases"])
    out = out.sort_values(["scenario", "_rank"], kind="stable").drop(columns="_rank")
    out["scenario"] = pd.Categorical(out["scenario"], categories=list(dict.fromkeys(ok["scenario"])), ordered=True)
    out = out.sort_values("scenario", kind="stable").reset_index(drop=True)
    out["scenario"] = out["scenario"].astype(str)
    out["pareto"] = False
    for _, idx in out.groupby("scenario", sort=False).groups.items():
        out.loc[pareto_front(out.loc[idx], lens), "pareto"] = True
    return out


# ----------------------------------------------------------------------------- comparisons

def _triple(row: pd.Series, metric: str) -> tuple[float, float, float]:
    return (float(row.get(metric, math.nan)), float(row.get(f"{metric}_low", math.nan)),
            float(row.get(f"{metric}_high", math.nan)))


def tie(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Two (value, low, high) tie: their intervals overlap where both have one, else the values
    agree within TIE_RTOL/TIE_ATOL. Missing values never tie (and never win)."""
    if math.isnan(a[0]) or math.isnan(b[0]):
        return False
    if not any(math.isnan(x) for x in (*a[1:], *b[1:])):
        return a[1] <= b[2] and b[1] <= a[2]
    return abs(a[0] - b[0]) <= TIE_RTOL * max(abs(a[0]), abs(b[0])) + TIE_ATOL


def better(a, b) -> bool:
    """a is lower than b and does not tie with it (every summary metric is lower-is-better)."""
    return not math.isnan(a[0]) and (math.isnan(b[0]) or (a[0] < b[0] and not tie(a, b)))


def objectives(lens: Lens) -> list[str]:
    """The front's metrics; time only where it has CIs (a time without one would win or lose
    on noise: training step and layer times are single measurements)."""
    names = [lens.balance, lens.drops] + ([lens.quality] if lens.quality else [])
    return names + (["time_ratio"] if lens.time and lens.phase_timed else [])


def pareto_front(frame: pd.DataFrame, lens: Lens) -> list:
    """Index labels of the eligible rows of one scenario that no other eligible row dominates
    (no worse on every objective, better on one; ties are no worse)."""
    rows = frame[frame["eligible"]]
    metrics = [m for m in objectives(lens) if m in rows.columns and rows[m].notna().any()]
    front = []
    for i, r in rows.iterrows():
        dominated = False
        for j, s in rows.iterrows():
            if i == j:
                continue
            pairs = [(_triple(s, m), _triple(r, m)) for m in metrics]
            if all(better(a, b) or tie(a, b) for a, b in pairs) and any(better(a, b) for a, b in pairs):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def _lowest(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows tied with the lowest value of ``metric`` (none if it is missing everywhere)."""
    rows = rows[pd.to_numeric(rows[metric], errors="coerce").notna()] if metric in rows.columns else rows.iloc[0:0]
    if rows.empty:
        return rows
    best = _triple(rows.loc[rows[metric].astype(float).idxmin()], metric)
    keep = [i for i, r in rows.iterrows() if not better(best, _triple(r, metric))]
    return rows.loc[keep]


@dataclass(frozen=True)
class BestFor:
    """Router labels per criterion (several: a tie); empty where nothing qualifies."""

    balanced_without_drops: tuple[str, ...]
    fewest_drops: tuple[str, ...]
    fastest_at_equal_drops: tuple[str, ...]
    no_drops_anywhere: bool  # every eligible router keeps every token
    best_quality: tuple[str, ...] = ()
    fastest: tuple[str, ...] = ()  # whatever it drops (a peers suite: which system is fastest)


def best_for(frame: pd.DataFrame, lens: Lens) -> BestFor:
    """The "best for" of one scenario's :func:`router_summary` rows (eligible routers only)."""
    rows = frame[frame["eligible"]]
    drops = pd.to_numeric(rows.get(lens.drops, pd.Series(dtype=float)), errors="coerce")
    dropless = rows[drops.abs() <= TIE_ATOL]
    fewest = _lowest(rows, lens.drops)
    fastest = _lowest(fewest, "time_ratio") if lens.time else fewest.iloc[0:0]
    quality = _lowest(rows, lens.quality) if lens.quality else rows.iloc[0:0]
    overall = _lowest(rows, "time_ratio") if lens.time else rows.iloc[0:0]
    return BestFor(tuple(_lowest(dropless, lens.balance)["router"]), tuple(fewest["router"]),
                   tuple(fastest["router"]), bool(len(rows)) and len(dropless) == len(rows),
                   tuple(quality["router"]), tuple(overall["router"]))


# ----------------------------------------------------------------------------- table cells

def time_cell_marks(table: pd.DataFrame, rows: pd.DataFrame, baseline=frozenset()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(unreliable, tied): booleans shaped like a per-row table (``run_id, case_id, router`` and
    ``<phase>.median_ms`` columns, e.g. the throughput table), from the rows' CIs.

    unreliable: the ``<phase>.median_ms`` cell's CI is missing or wider than
    :data:`UNRELIABLE_SHARE` of it. tied: every time-derived cell of the phase
    (``median_ms``, ``tokens_per_s``, ``x_memcopy``) in a case where the fastest non-baseline
    router's CI overlaps another non-baseline router's: such a case has no best time."""
    unreliable_mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    tied = unreliable_mask.copy()
    keys = [k for k in ("run_id", "case_id", "router") if k in table.columns and k in rows.columns]
    if table.empty or len(keys) < 3:
        return unreliable_mask, tied
    phases = [c[: -len(".median_ms")] for c in table.columns if c.endswith(".median_ms")]
    cis = [f"{p}.{b}_ms" for p in phases for b in ("ci_low", "ci_high") if f"{p}.{b}_ms" in rows.columns]
    merged = table[keys].merge(rows[keys + cis].drop_duplicates(keys, keep="last"), on=keys, how="left")
    merged.index = table.index
    for phase in phases:
        med = pd.to_numeric(table[f"{phase}.median_ms"], errors="coerce")
        low, high = _num(merged, f"{phase}.ci_low_ms"), _num(merged, f"{phase}.ci_high_ms")
        unreliable_mask[f"{phase}.median_ms"] = [bool(not math.isnan(m) and unreliable(m, lo, hi))
                                                 for m, lo, hi in zip(med, low, high)]
        derived = [c for c in table.columns if c.startswith(f"{phase}.")
                   and c.split(".", 1)[1] in ("median_ms", "tokens_per_s", "x_memcopy")]
        ranked = ~table["router"].astype(str).isin(set(map(str, baseline)))
        for _, idx in table[ranked & med.notna()].groupby(["run_id", "case_id"], sort=False).groups.items():
            if len(idx) < 2:
                continue
            best = med.loc[idx].idxmin()
            others = [i for i in idx if i != best]
            if any(not (low[i] > high[best]) for i in others):  # an overlap (or a missing CI): a tie
                tied.loc[idx, derived] = True
    return unreliable_mask, tied

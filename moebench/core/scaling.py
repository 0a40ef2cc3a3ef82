"""Scaling exponents: how a phase's median time grows with tokens T or experts E.

For each router, phase and swept axis, rows that agree on every other case axis form a series;
with at least three distinct values the exponent is the least-squares slope of
log(median_ms) against log(axis). 1.0 is linear; the fast paths aim for <= 1 in T and in E.

A whole-range slope mixes regimes: small sizes run from cache and reuse heap pages, while
tensors of 32 MiB and more get fresh pages on every call (glibc's mmap threshold), whose
faults cost more than the copy. ``exponent_top`` fits only the largest TOP_POINTS values of
the axis, the asymptotic growth once every tensor is out of cache.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moebench.core.case import case_axes
from moebench.core.metrics import PHASES
from moebench.core.rows import ok_only

AXES = ("tokens", "experts")
OTHER_AXES = case_axes()  # a series holds every case axis fixed but the swept one
MIN_POINTS = 3
TOP_POINTS = 3


def scaling_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per router × phase × swept axis × fixed setting with >= 3 points: the fitted
    exponent over all points and over the largest TOP_POINTS (``exponent_top``), the points
    used and the range of the axis and of the median time."""
    out = []
    if rows.empty or "status" not in rows:
        return pd.DataFrame()
    ok = ok_only(rows)
    for axis in AXES:
        fixed = [c for c in OTHER_AXES if c != axis and c in ok.columns]
        for phase in PHASES:
            col = f"{phase}.median_ms"
            if col not in ok.columns:
                continue
            for key, group in ok.groupby(["router", *fixed], dropna=False, sort=True):
                series = group[[axis, col]].dropna()
                series = series[series[col] > 0].groupby(axis)[col].median()
                if len(series) < MIN_POINTS:
                    continue
                slope = _slope(series)
                top = _slope(series.iloc[-TOP_POINTS:]) if len(series) > TOP_POINTS else slope
                setting = dict(zip(fixed, key[1:]))
                fixed_at = "E" if axis == "tokens" else "T"
                out.append({
                    "router": key[0],
                    "phase": phase,
                    "axis": "T" if axis == "tokens" else "E",
                    "at": f"{fixed_at}={setting['experts' if axis == 'tokens' else 'tokens']}",
                    "exponent": round(slope, 3),
                    "exponent_top": round(top, 3),
                    "points": len(series),
                    "range": f"{series.index.min()}..{series.index.max()}",
                    "ms": f"{series.iloc[0]:.3g}..{series.iloc[-1]:.3g}",
                })
    return pd.DataFrame(out)


def _slope(series: pd.Series) -> float:
    """Least-squares slope of log(value) on log(index)."""
    return float(np.polyfit(np.log(series.index.to_numpy(float)), np.log(series.to_numpy(float)), 1)[0])

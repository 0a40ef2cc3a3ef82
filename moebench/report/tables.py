"""Result tables: run rows as pandas DataFrames laid out to compare routers on the same case.

Every table has ONE ROW PER case x router (x run, when several runs are combined): a short
``case`` label first, then ``router``, the metric columns, and ``run_id``/``case_id`` last (kept
for the CSVs; the Markdown hides them unless several runs are shown). Only ``ok`` rows enter the
metric tables; skipped and failed rows go to :func:`skipped_table`.

These are frames only; :mod:`moebench.report.markdown` renders them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from moebench.core.case import case_axes
from moebench.core.metrics import PHASES, direction
from moebench.core.rows import ok_only
from moebench.report.markdown import KEY_TAIL, STREAM_STATS
from moebench.store.runs import RunDir, load_run

CASE_AXES = case_axes()  # the columns naming a case (Case.axes() without case_id), in sort order
BALANCE_COLUMNS = ("imbalance", "cv", "entropy", "gini", "idle_experts", "min_load", "max_load")
DROPS_COLUMNS = ("capacity", "drop_rate", "token_drop_rate", "experts_per_token_mean",
                 "expert_usage", "aux_loss", "z_loss")
STREAM_METRICS = ("imbalance", "drop_rate")
SKIPPED_COLUMNS = ("case", "router", "status", "reason")

RunLike = str | Path | RunDir


def _run(run: RunLike) -> RunDir:
    return run if isinstance(run, RunDir) else load_run(run)


# ----------------------------------------------------------------------------- loading

def load_rows(run_dirs: Iterable[RunLike]) -> pd.DataFrame:
    """The rows of one or more runs as one DataFrame, with a ``case`` label column.

    ``run_id`` is filled from each run's meta where a row lacks it. A ``router_rank`` column
    records the suite's router order (meta "routers"), which the tables sort by.
    """
    frames, order = [], []
    for run in map(_run, run_dirs):
        frame = pd.DataFrame(run.rows())
        frame = _with_run_id(frame, run)
        frames.append(frame)
        order += [str(r) for r in run.meta().get("routers") or []]
        if "router" in frame.columns:
            order += [str(r) for r in frame["router"]]
    frames = [f for f in frames if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in ("run_id", "case_id", "router", "status", "reason"):
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    rank = {r: i for i, r in enumerate(dict.fromkeys(order))}
    df["router_rank"] = df["router"].astype(str).map(rank)
    return add_case_labels(df)


def load_batches(run_dirs: Iterable[RunLike]) -> pd.DataFrame:
    """The per-batch records (batches.jsonl) of one or more runs as one DataFrame."""
    frames = [_with_run_id(pd.DataFrame(run.batches()), run) for run in map(_run, run_dirs)]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_expert_loads(run_dirs: Iterable[RunLike]) -> pd.DataFrame:
    """Per-expert loads (loads.jsonl: first batch, after capacity) of one or more runs, long:
    one row per case x router x expert with ``run_id, case_id, router, expert, load, rank``
    (``rank`` 0 is the most loaded expert of that case and router). Runs without the file
    contribute nothing; with none at all the frame is empty (with those columns)."""
    columns = ["run_id", "case_id", "router", "expert", "load", "rank"]
    records = []
    for run in map(_run, run_dirs):
        run_id = run.meta().get("run_id") or run.path.name
        for rec in run.loads():  # de-duplicated (a resumed run may repeat a killed router's)
            values = rec.get("loads")
            if not isinstance(values, list) or not values:
                continue
            loads = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(float)
            order = np.argsort(-loads, kind="stable")
            rank = np.empty(len(loads), dtype=int)
            rank[order] = np.arange(len(loads))
            base = (rec.get("run_id") or run_id, rec.get("case_id"), rec.get("router"))
            records += [(*base, e, loads[e], int(rank[e])) for e in range(len(loads))]
    return pd.DataFrame.from_records(records, columns=columns)


def _with_run_id(frame: pd.DataFrame, run: RunDir) -> pd.DataFrame:
    run_id = run.meta().get("run_id") or run.path.name
    if frame.empty:
        return frame
    if "run_id" not in frame.columns:
        frame["run_id"] = run_id
    else:
        frame["run_id"] = frame["run_id"].fillna(run_id)
    return frame


# ----------------------------------------------------------------------------- case labels

def _fmt_axis(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# How an axis reads in a case label, and whether it is always shown (else only where it varies);
# an axis not named here (a new Case field) reads "axis=value", shown where it varies.
_LABEL_FORMAT = {
    "workload": ("{}", True), "workload_params": ("{}", False), "tokens": ("T={}", True),
    "experts": ("E={}", True), "top_k": ("k={}", True), "capacity_factor": ("cf={}", True),
    "drop_policy": ("{}", False), "min_capacity": ("minC={}", False),
    "capacity_multiple": ("mult={}", False), "hidden": ("H={}", False), "dtype": ("{}", False),
    "device": ("{}", False), "seed": ("seed={}", False), "batches": ("batches={}", False),
}
_LABEL_PARTS = tuple((axis, *_LABEL_FORMAT.get(axis, (axis + "={}", False))) for axis in CASE_AXES)


def add_case_labels(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``case`` column first, e.g. "zipf T=4096 E=8 k=2 cf=1.25 float32 cpu".

    workload/T/E/k/cf are always named; the other axes only when they vary across ``df``.
    """
    df = df.copy()
    present = [p for p in _LABEL_PARTS if p[0] in df.columns]
    shown = [p for p in present if p[2] or df[p[0]].astype(str).nunique(dropna=False) > 1]

    def label(row) -> str:
        parts = []
        for axis, pattern, _ in shown:
            value = row[axis]
            if axis == "capacity_factor" and (value is None or (isinstance(value, float) and math.isnan(value))):
                parts.append("dropless")
            elif axis == "workload_params":
                params = json.loads(value) if isinstance(value, str) and value else {}
                if params:  # compact: (s=1.2, hot=2); nothing for default parameters
                    parts.append("(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")")
            else:
                parts.append(pattern.format(_fmt_axis(value)))
        return " ".join(parts) if parts else str(row.get("case_id", ""))

    df["case"] = [label(r) for _, r in df.iterrows()] if len(df) else pd.Series(dtype=object)
    return df[["case"] + [c for c in df.columns if c != "case"]]


def _ensure_labels(df: pd.DataFrame) -> pd.DataFrame:
    return df if "case" in df.columns else add_case_labels(df)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Sorted by the case axes, then run, then router in suite order (``router_rank`` from
    :func:`load_rows`, else the order of first appearance)."""
    if df.empty:
        return df.reset_index(drop=True)
    df = df.copy()
    if "router_rank" in df.columns:
        df["_router_rank"] = df["router_rank"]
    else:
        df["_router_rank"] = df["router"].map({r: i for i, r in enumerate(pd.unique(df["router"]))})
    keys = [c for c in (*CASE_AXES, "case_id", "run_id") if c in df.columns] + ["_router_rank"]
    df = df.sort_values(keys, kind="stable", na_position="first")
    return df.drop(columns="_router_rank").reset_index(drop=True)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of ``df``, with case labels, sorted by case axes, run and router."""
    return _sorted(ok_only(_ensure_labels(df)))


def _select(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """``case, router, <columns present>, run_id, case_id`` of the sorted ok rows."""
    df = ok_rows(df)
    cols = ["case", "router"] + [c for c in columns if c in df.columns] + list(KEY_TAIL)
    return df.reindex(columns=cols).reset_index(drop=True)


# ----------------------------------------------------------------------------- builders

def balance_table(df: pd.DataFrame) -> pd.DataFrame:
    """Load balance per case x router: imbalance, cv, entropy, gini, idle experts, min/max load."""
    return _select(df, BALANCE_COLUMNS)


def drops_table(df: pd.DataFrame) -> pd.DataFrame:
    """Dropped tokens and losses per case x router: capacity, drop rates, usage, aux/z loss."""
    return _select(df, DROPS_COLUMNS)


def throughput_table(df: pd.DataFrame) -> pd.DataFrame:
    """Speed per case x router: for each phase the median and IQR in ms, tokens/s, the median
    over the case's memcopy bound (``<phase>.x_memcopy``) and the peak memory in MB
    (``<phase>.peak_mb``); the last two only where some row has them; then threads.

    Rows with per-phase status keep ``<phase>.status``, and a phase that is not ok has no
    number in any of its columns (:func:`moebench.report.markdown.markdown_table` writes its
    status there instead)."""
    df = blank_untimed(_ensure_labels(df))
    ok = ok_only(df)
    columns = []
    for phase in PHASES:
        status = [f"{phase}.status"] if f"{phase}.status" in df.columns else []
        columns += [*status, f"{phase}.median_ms", f"{phase}.iqr_ms", f"{phase}.tokens_per_s"]
        if f"{phase}.x_memcopy" in ok.columns and ok[f"{phase}.x_memcopy"].notna().any():
            columns.append(f"{phase}.x_memcopy")
        peak = f"{phase}.peak_mem_bytes"
        if peak in ok.columns and ok[peak].notna().any():
            df = df.assign(**{f"{phase}.peak_mb": pd.to_numeric(df[peak], errors="coerce") / 2**20})
            columns.append(f"{phase}.peak_mb")
    return _select(df, columns + ["threads"])


def blank_untimed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every ``<phase>.*`` number set to NaN where ``<phase>.status`` is present and
    not ok: a skipped or failed phase must not show a time (a stale or partial one included)."""
    df = df.copy()
    for phase in PHASES:
        status = df.get(f"{phase}.status")
        if status is None:
            continue
        untimed = status.notna() & (status != "ok")
        numbers = [c for c in df.columns if c.startswith(f"{phase}.")
                   and c.split(".", 1)[1] not in ("status", "reason", "error_at")]
        df.loc[untimed, numbers] = np.nan
    return df


def stream_table(df_rows: pd.DataFrame, batches_df: pd.DataFrame) -> pd.DataFrame:
    """Trajectories of streams (batches > 1) per case x router: for imbalance and drop_rate the
    ``_first``, ``_last``, ``_mean`` and ``_worst`` value over the batches (worst is the max
    for lower-is-better metrics, the min for higher-is-better ones)."""
    cols = [f"{m}_{s}" for m in STREAM_METRICS for s in STREAM_STATS]
    empty = pd.DataFrame(columns=["case", "router", "batches"] + cols + list(KEY_TAIL))
    rows = ok_only(_ensure_labels(df_rows))
    if batches_df is None or batches_df.empty or rows.empty or "batches" not in rows.columns:
        return empty
    rows = rows[pd.to_numeric(rows["batches"], errors="coerce") > 1]
    keys = [k for k in ("run_id", "case_id", "router") if k in batches_df.columns]
    records = []
    for key, group in batches_df.groupby(keys, sort=False):
        group = group.sort_values("batch") if "batch" in group.columns else group
        record = dict(zip(keys, key))
        for metric in STREAM_METRICS:
            values = pd.to_numeric(group.get(metric, pd.Series(dtype=float)), errors="coerce")
            worst = values.min() if direction(metric) == "higher" else values.max()
            stats = (values.iloc[0] if len(values) else np.nan,
                     values.iloc[-1] if len(values) else np.nan, values.mean(), worst)
            record.update({f"{metric}_{s}": float(v) for s, v in zip(STREAM_STATS, stats)})
        records.append(record)
    if not records:
        return empty
    merged = rows.drop(columns=[c for c in cols if c in rows.columns]).merge(
        pd.DataFrame(records), on=keys, how="inner")
    return _select(merged, ["batches"] + cols)


def skipped_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that were not measured (status skipped or error) with their reason."""
    df = _ensure_labels(df)
    bad = df[df["status"] != "ok"] if "status" in df.columns else df.iloc[0:0]
    bad = _sorted(bad)
    return bad.reindex(columns=list(SKIPPED_COLUMNS) + list(KEY_TAIL)).reset_index(drop=True)

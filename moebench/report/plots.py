"""Plots of a run (or several combined): PNGs written with seaborn on matplotlib's Agg canvas.

Every function takes the DataFrames of :mod:`moebench.report.tables` (``load_rows``,
``load_batches``, ``load_expert_loads``) and an output folder, and returns the :class:`Plot`s it
wrote: none when the data do not allow the plot (one capacity factor, one token count, no
stream, no ``loads.jsonl``...). No display is needed: figures are drawn on
:class:`matplotlib.figure.Figure` objects with an Agg canvas, never through pyplot's global state.

Colours (and markers) are keyed on the sorted list of every router in the report (see
:func:`moebench.report.plot_style.router_palette`), so a router looks the same in every figure.
Combined runs (or one run over several devices) are told apart by line style: the ``variant``
is the device, plus the run where the device alone does not identify it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter

from moebench.report.plot_style import (
    VARIANT, Style, draw_lines, legend_outside, new_figure, plain_log_axis, save, slug, theme,
)
from moebench.core.metrics import PHASES
from moebench.core.rows import ok_only
from moebench.report.tables import add_case_labels

MAX_CASE_FIGURES = 4  # per-case figures (expert loads, stream trajectories) per report


@dataclass(frozen=True)
class Plot:
    """A PNG written, with the title it is shown under and a one-line caption."""

    path: Path
    title: str
    caption: str = ""


# ----------------------------------------------------------------------------- helpers

def _ok(rows: pd.DataFrame) -> pd.DataFrame:
    if rows is None or rows.empty:
        return pd.DataFrame()
    return ok_only(rows).copy()


def _run_labels(run_ids) -> dict[str, str]:
    """Short run names: the random suffix of the run id where it is unique, else the full id."""
    ids = sorted({str(r) for r in run_ids})
    tails = {r: r.rsplit("-", 1)[-1] for r in ids}
    unique = len(set(tails.values())) == len(ids)
    return {r: ("run " + tails[r] if unique else r) for r in ids}


def with_context(rows: pd.DataFrame) -> pd.DataFrame:
    """Ok rows with ``plot_case`` (the case label without device and run, so the same case of a
    CPU and a GPU run shares one figure) and ``variant`` (device and/or run; None if unique)."""
    df = _ok(rows)
    if df.empty:
        return df
    multi_run = df["run_id"].nunique() > 1
    multi_dev = "device" in df.columns and df["device"].astype(str).nunique() > 1
    if multi_run or multi_dev:
        df["plot_case"] = add_case_labels(df.drop(columns=["case", "device"], errors="ignore"))["case"].values
    else:
        df["plot_case"] = df["case"] if "case" in df.columns else add_case_labels(df)["case"]
    parts = []
    if multi_dev:
        parts.append(df["device"].astype(str))
    if multi_run and (not multi_dev or df.groupby("device")["run_id"].nunique().max() > 1):
        parts.append(df["run_id"].astype(str).map(_run_labels(df["run_id"])))
    if parts:
        variant = parts[0]
        for part in parts[1:]:
            variant = variant + " · " + part
        df[VARIANT] = variant
    else:
        df[VARIANT] = None
    return df


# ----------------------------------------------------------------------------- expert loads

def skewed_cases(df: pd.DataFrame, limit: int = MAX_CASE_FIGURES) -> list[str]:
    """The ``plot_case`` labels to show: the most skewed case (highest imbalance of any router)
    of each workload, most skewed first, at most ``limit``."""
    if df.empty or "imbalance" not in df.columns:
        return []
    skew = df.assign(_imb=pd.to_numeric(df["imbalance"], errors="coerce")).dropna(subset=["_imb"])
    if skew.empty:
        return []
    worst = skew.groupby("plot_case", sort=False).agg(imb=("_imb", "max"), workload=("workload", "first"))
    worst = worst.sort_values("imb", ascending=False, kind="stable")
    return list(worst.drop_duplicates("workload").index[:limit])


def plot_expert_loads(rows: pd.DataFrame, loads: pd.DataFrame, out_dir: Path,
                      style: Style | None = None) -> list[Plot]:
    """Per-expert load, sorted descending, one line per router: one figure per selected case
    (see :func:`skewed_cases`). Loads are shown relative to the mean load of the router, so a
    dense router (every expert sees every token) and a sparse one share the axis; the highest
    point of a line is its imbalance. Nothing without ``loads.jsonl``."""
    df = with_context(rows)
    if df.empty or loads is None or loads.empty:
        return []
    keys = ["run_id", "case_id", "router"]
    merged = loads.merge(df[keys + ["plot_case", VARIANT]], on=keys, how="inner")
    if merged.empty:
        return []
    mean = merged.groupby(keys)["load"].transform("mean")
    merged["relative"] = np.where(mean > 0, merged["load"] / mean.where(mean > 0, 1.0), np.nan)
    style = style or Style.of(df["router"])
    out = []
    for i, case in enumerate(skewed_cases(df[df["plot_case"].isin(merged["plot_case"])])):
        part = merged[merged["plot_case"] == case]
        experts = int(part["expert"].max()) + 1
        with theme():
            fig, axes = new_figure(width=7.5 if experts <= 16 else 9.5)
            ax = axes[0, 0]
            entries, variants = draw_lines([(ax, part)], "rank", "relative", style,
                                            markersize=3.5 if experts > 16 else 6)
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("expert, sorted by load (0 = most loaded)")
            ax.set_ylabel("load / mean load of the router")
            ax.set_title(f"Per-expert load (first batch): {case}", fontsize="medium")
            ax.set_ylim(bottom=0)
            if experts <= 16:
                ax.set_xticks(range(experts))
            legend_outside(fig, entries, variants, style)
            path = save(fig, out_dir / f"loads_{i + 1}_{slug(case, 60)}.png")
        out.append(Plot(path, f"Per-expert load: {case}",
                        "Loads after capacity on the first batch, sorted descending and divided by "
                        "the router's mean load (dotted: perfectly even; a line's first point is "
                        "its imbalance). Routers with identical loads share a line (a = b)."))
    return out


# ----------------------------------------------------------------------------- drops

def plot_drop_rate(rows: pd.DataFrame, out_dir: Path, style: Style | None = None) -> list[Plot]:
    """Drop rate against capacity factor (numeric factors only), one line per router, one panel
    per workload; only with at least two capacity factors."""
    df = with_context(rows)
    if df.empty or "capacity_factor" not in df.columns or "drop_rate" not in df.columns:
        return []
    df["capacity_factor"] = pd.to_numeric(df["capacity_factor"], errors="coerce")
    df["drop_rate"] = pd.to_numeric(df["drop_rate"], errors="coerce")
    df = df.dropna(subset=["capacity_factor", "drop_rate"])
    if df["capacity_factor"].nunique() < 2:
        return []
    style = style or Style.of(df["router"])
    df["workload_label"] = _workload_labels(df) if "workload" in df.columns else ""
    workloads = sorted(df["workload_label"].unique())
    ncols = min(len(workloads), 3)
    nrows = -(-len(workloads) // ncols)
    factors = sorted(df["capacity_factor"].unique())
    with theme():
        fig, axes = new_figure(ncols, nrows, width=4.3 * ncols + 0.6, height=3.3 * nrows + 0.6,
                            sharex=True, sharey=True)
        flat = np.ravel(axes)
        panels = [(ax, df[df["workload_label"] == w]) for ax, w in zip(flat, workloads)]
        entries, variants = draw_lines(panels, "capacity_factor", "drop_rate", style)
        for ax, workload in zip(flat, workloads):
            ax.set_title(workload, fontsize="medium")
            ax.set_xticks(factors)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("capacity factor")
            ax.set_ylabel("drop rate (assignments)" if ax.get_subplotspec().is_first_col() else "")
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        for ax in flat[len(workloads):]:
            ax.set_visible(False)
        fig.suptitle("Dropped assignments against capacity factor (mean over the other axes)",
                     fontsize="medium")
        legend_outside(fig, entries, variants, style)
        path = save(fig, out_dir / "drop_rate_vs_capacity.png")
    return [Plot(path, "Drop rate against capacity factor",
                 "Fraction of token-expert assignments dropped, averaged over the other case axes "
                 "(dropless cases left out). Routers with identical lines share one (a = b).")]


# ----------------------------------------------------------------------------- throughput

def plot_throughput(rows: pd.DataFrame, out_dir: Path, style: Style | None = None) -> list[Plot]:
    """Median time per call against tokens, log-log, one panel per phase (route, dispatch,
    combine), one line per router (line style: device/run); only with two token counts or more."""
    df = with_context(rows)
    cols = [f"{p}.median_ms" for p in PHASES if f"{p}.median_ms" in df.columns]
    if df.empty or "tokens" not in df.columns or not cols:
        return []
    df["tokens"] = pd.to_numeric(df["tokens"], errors="coerce")
    if df["tokens"].nunique() < 2:
        return []
    id_vars = ["router", "tokens", VARIANT]
    long = df[id_vars + cols].melt(id_vars=id_vars, var_name="phase", value_name="ms")
    long["ms"] = pd.to_numeric(long["ms"], errors="coerce")
    long = long[long["ms"] > 0].dropna(subset=["tokens", "ms"])
    if long["tokens"].nunique() < 2:
        return []
    long["phase"] = long["phase"].str.replace(".median_ms", "", regex=False)
    phases = [p for p in PHASES if p in set(long["phase"])]
    style = style or Style.of(df["router"])
    with theme():
        fig, axes = new_figure(len(phases), 1, width=4.0 * len(phases) + 0.6, height=3.8)
        panels = [(ax, long[long["phase"] == p]) for ax, p in zip(np.ravel(axes), phases)]
        entries, variants = draw_lines(panels, "tokens", "ms", style, estimator="median")
        for ax, phase in zip(np.ravel(axes), phases):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            plain_log_axis(ax.xaxis, long["tokens"].unique())
            plain_log_axis(ax.yaxis)
            ax.set_title(phase, fontsize="medium")
            ax.set_xlabel("tokens per batch")
            ax.set_ylabel("median ms per call")
        fig.suptitle("Time per call against tokens (log-log; median over the other axes)",
                     fontsize="medium")
        legend_outside(fig, entries, variants, style)
        path = save(fig, out_dir / "throughput_vs_tokens.png")
    return [Plot(path, "Time per call against tokens",
                 "Median milliseconds per call of each phase, log-log; the median over the other "
                 "case axes. A slope of 1 is linear scaling.")]


# ----------------------------------------------------------------------------- streams

def plot_streams(rows: pd.DataFrame, batches: pd.DataFrame, out_dir: Path,
                 style: Style | None = None) -> list[Plot]:
    """Imbalance (and drop rate where anything was dropped) over the batches of each stream,
    one line per router: one figure per stream case, the most skewed first, at most
    :data:`MAX_CASE_FIGURES`."""
    df = with_context(rows)
    if df.empty or batches is None or batches.empty or "imbalance" not in batches.columns:
        return []
    keys = ["run_id", "case_id", "router"]
    merged = batches.merge(df[keys + ["plot_case", VARIANT]], on=keys, how="inner")
    if merged.empty:
        return []
    merged["imbalance"] = pd.to_numeric(merged["imbalance"], errors="coerce")
    if "drop_rate" in merged.columns:
        merged["drop_rate"] = pd.to_numeric(merged["drop_rate"], errors="coerce")
    worst = merged.groupby("plot_case", sort=False)["imbalance"].max().sort_values(ascending=False, kind="stable")
    style = style or Style.of(df["router"])
    out = []
    for i, case in enumerate(worst.index[:MAX_CASE_FIGURES]):
        part = merged[merged["plot_case"] == case]
        metrics = ["imbalance"]
        if "drop_rate" in part.columns and (part["drop_rate"] > 0).any():
            metrics.append("drop_rate")
        with theme():
            fig, axes = new_figure(len(metrics), 1, width=5.0 * len(metrics) + 0.6, height=3.8)
            flat = np.ravel(axes)
            flat[0].axhline(1.0, color="grey", linestyle=":", linewidth=1)
            long = part.melt(id_vars=["router", VARIANT, "batch"], value_vars=metrics,
                             var_name="metric", value_name="value")
            panels = [(ax, long[long["metric"] == m]) for ax, m in zip(flat, metrics)]
            entries, variants = draw_lines(panels, "batch", "value", style)
            for ax, metric in zip(flat, metrics):
                ax.set_xlabel("batch")
                ax.set_ylabel(metric.replace("_", " "))
                ax.set_xticks(sorted(part["batch"].unique()))
            fig.suptitle(f"Stream: {case}", fontsize="medium")
            legend_outside(fig, entries, variants, style)
            path = save(fig, out_dir / f"stream_{i + 1}_{slug(case, 60)}.png")
        out.append(Plot(path, f"Stream: {case}",
                        "Per-batch imbalance (dotted: perfect balance)"
                        + (" and drop rate" if len(metrics) > 1 else "")
                        + "; stateful routers carry their state from batch to batch."))
    return out


# ----------------------------------------------------------------------------- heatmap

def _workload_labels(df: pd.DataFrame) -> pd.Series:
    """The workload name, with its parameters where one name runs with several."""
    names = df["workload"].astype(str)
    if "workload_params" not in df.columns:
        return names
    params = df["workload_params"].fillna("{}").astype(str)
    several = df.assign(_n=names, _p=params).groupby("_n")["_p"].transform("nunique") > 1
    return names.where(~several, names + " " + params)


def plot_imbalance_heatmap(rows: pd.DataFrame, out_dir: Path) -> list[Plot]:
    """Mean imbalance per router x workload, annotated; only with at least two workloads or two
    routers."""
    df = with_context(rows)
    if df.empty or "workload" not in df.columns or "imbalance" not in df.columns:
        return []
    df["imbalance"] = pd.to_numeric(df["imbalance"], errors="coerce")
    df["workload_label"] = _workload_labels(df)
    table = df.pivot_table(index="router", columns="workload_label", values="imbalance", aggfunc="mean")
    table = table.sort_index().sort_index(axis=1)
    if table.empty or (table.shape[0] < 2 and table.shape[1] < 2):
        return []
    with theme():
        fig, axes = new_figure(width=1.3 * table.shape[1] + 3.2, height=0.5 * table.shape[0] + 1.8)
        ax = axes[0, 0]
        sns.heatmap(table, annot=True, fmt=".2f", cmap="YlOrRd", linewidths=0.5, ax=ax,
                    cbar_kws={"label": "mean imbalance (lower is better)"})
        ax.set_xlabel("workload")
        ax.set_ylabel("router")
        ax.set_title("Mean imbalance (max load / mean load) over every case", fontsize="medium")
        ax.tick_params(axis="x", labelrotation=20)
        path = save(fig, out_dir / "imbalance_heatmap.png")
    return [Plot(path, "Imbalance by router and workload",
                 "Mean over every case of the workload (token counts, experts, k, capacity); 1.0 "
                 "is perfect balance.")]


# ----------------------------------------------------------------------------- all

def write_plots(rows: pd.DataFrame, batches: pd.DataFrame | None, loads: pd.DataFrame | None,
                out_dir: Path) -> list[Plot]:
    """Every plot the data allow, into ``out_dir`` (created only when something is drawn).
    Order: heatmap, expert loads, drops, throughput, streams."""
    out_dir = Path(out_dir)
    ok = _ok(rows)
    if ok.empty:
        return []
    style = Style.of(ok["router"])
    return [
        *plot_imbalance_heatmap(rows, out_dir),
        *plot_expert_loads(rows, loads, out_dir, style),
        *plot_drop_rate(rows, out_dir, style),
        *plot_throughput(rows, out_dir, style),
        *plot_streams(rows, batches, out_dir, style),
    ]

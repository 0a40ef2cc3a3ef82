"""The report's headline figure: drop rate against route time, coloured by imbalance, one panel
per scenario (from :func:`moebench.report.summary.router_summary`).

Each point is a router's scenario summary: x the time ratio to the fastest non-baseline router
(log axis, with its interval as a bar), y the token drop rate, colour the balance metric (one
colour bar for every panel). Pareto-front routers are filled and labelled in bold; other
routers are filled; baselines are hollow squares with grey italic labels (references, never best).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.ticker import FuncFormatter, NullFormatter

from moebench.report.plot_style import new_figure, theme
from moebench.report.summary import Lens

HEADLINE = "headline_pareto.png"
PANEL_COLUMNS = 4
MAX_LABELLED = 8  # more routers than this: markers and a legend instead of labels
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "p", "h", "H", "d", "8")


def _x_axis(summary: pd.DataFrame, lens: Lens) -> tuple[str, str]:
    """(column, label) for the x axis: the time ratio where there is one, else quality/balance."""
    if "time_ratio" in summary.columns and summary["time_ratio"].notna().any():
        what = {"route": "route time", "train.step_ms": "training step time", "layer_ms": "layer time"}
        return "time_ratio", f"{what.get(lens.time or '', lens.time)} / fastest non-baseline (log)"
    if lens.quality and lens.quality in summary.columns:
        return lens.quality, lens.quality.replace("_", " ")
    return lens.balance, lens.balance


def _shared_labels(part: pd.DataFrame, xs: pd.Series, ys: pd.Series) -> dict:
    """index -> label: points that nearly coincide (same drops, time within 8%) share one label
    ("topk = topk_renorm") on the first of them; the others get none."""
    labels, taken = {}, set()
    span = max(float(ys.max() - ys.min()), 1.0) if ys.notna().any() else 1.0
    for i in part.index:
        if i in taken or pd.isna(xs[i]) or pd.isna(ys[i]):
            continue
        near = [j for j in part.index if j not in taken and not pd.isna(xs[j]) and not pd.isna(ys[j])
                and part.at[j, "baseline"] == part.at[i, "baseline"]
                and abs(math.log(max(xs[j], 1e-12) / max(xs[i], 1e-12))) < 0.08 and abs(ys[j] - ys[i]) < 0.03 * span]
        taken.update(near)
        labels[i] = " = ".join(str(part.at[j, "router"]) for j in near)
    return labels


def _staggered(part: pd.DataFrame, xs: pd.Series, ys: pd.Series, names: dict) -> dict:
    """index -> vertical label offset (points): labelled non-baseline points at about the same
    drop rate whose labels would overlap (within a factor 2.5 in time) are spread up and down."""
    span = max(float(ys.max() - ys.min()), 1.0) if ys.notna().any() else 1.0
    labelled = [i for i in part.index if names.get(i) and not part.at[i, "baseline"]
                and not (pd.isna(xs[i]) or pd.isna(ys[i]))]
    labelled.sort(key=lambda i: (round(float(ys[i]) / (0.05 * span)), float(xs[i])))
    out, cycle = {}, (-10, 8, -20, 18, -30, 28)
    for n, i in enumerate(labelled):
        crowd = [j for j in labelled[:n] if abs(ys[j] - ys[i]) < 0.05 * span
                 and abs(math.log(max(xs[i], 1e-12) / max(xs[j], 1e-12))) < math.log(2.5)]
        out[i] = cycle[len(crowd) % len(cycle)]
    return out


def plot_headline(summary: pd.DataFrame, lens: Lens, out_dir: Path) -> Path | None:
    """Write ``out_dir/headline_pareto.png``; None without a summary or with one router (nothing
    to compare)."""
    if summary is None or summary.empty or summary["router"].nunique() < 2:
        return None
    x, xlabel = _x_axis(summary, lens)
    scenarios = list(dict.fromkeys(summary["scenario"]))
    ncols = min(PANEL_COLUMNS, len(scenarios))
    nrows = -(-len(scenarios) // ncols)
    colour = pd.to_numeric(summary[lens.balance], errors="coerce")
    finite = colour[np.isfinite(colour)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (1.0, 2.0)
    hi = hi if hi > lo else lo + 1e-6
    norm = LogNorm(lo, hi) if lo > 0 and hi / lo > 4 else Normalize(lo, hi)
    cmap = colormaps["viridis_r"]
    drops = lens.drops
    routers = list(dict.fromkeys(summary["router"]))
    legend_mode = len(routers) > MAX_LABELLED  # too many to label: a marker per router, one legend
    marker = {r: MARKERS[i % len(MARKERS)] for i, r in enumerate(routers)}
    with theme():
        fig, axes = new_figure(ncols, nrows, width=3.6 * ncols + 1.2, height=2.3 * nrows + 0.4, sharey=True)
        flat = np.ravel(axes)
        scatter = None
        for ax, scenario in zip(flat, scenarios):
            part = summary[summary["scenario"] == scenario]
            xs = pd.to_numeric(part[x], errors="coerce")
            ys = pd.to_numeric(part[drops], errors="coerce") * 100
            names = _shared_labels(part, xs, ys)
            offsets = _staggered(part, xs, ys, names)
            for (_, row), xv, yv in zip(part.iterrows(), xs, ys):
                if math.isnan(xv) or math.isnan(yv):
                    continue
                low, high = row.get(f"{x}_low", math.nan), row.get(f"{x}_high", math.nan)
                if not (pd.isna(low) or pd.isna(high)):
                    ax.plot([low, high], [yv, yv], color="0.6", linewidth=1, zorder=1)
                c = row[lens.balance]
                if legend_mode:
                    scatter = ax.scatter([xv], [yv], c=[c] if np.isfinite(c) else "0.5", cmap=cmap, norm=norm,
                               marker=marker[row["router"]], s=60 if row["pareto"] else 34,
                               edgecolors="black" if row["pareto"] else "0.55", linewidths=1.2 if row["pareto"] else 0.5,
                               alpha=0.55 if row["baseline"] else 1.0, zorder=3)
                    continue
                if row["baseline"]:
                    ax.scatter([xv], [yv], s=46, marker="s", facecolors="none",
                               edgecolors=cmap(norm(c)) if np.isfinite(c) else "0.5", linewidths=1.6, zorder=2)
                    if names.get(row.name):
                        ax.annotate(names[row.name], (xv, yv), textcoords="offset points", xytext=(0, 5),
                                    fontsize=6.5, color="0.45", style="italic", ha="center", rotation=30)
                    continue
                scatter = ax.scatter([xv], [yv], c=[c], cmap=cmap, norm=norm, s=70 if row["pareto"] else 40,
                                     edgecolors="black" if row["pareto"] else "white", linewidths=1.0, zorder=3)
                if names.get(row.name):
                    dy = offsets.get(row.name, -10)
                    ax.annotate(names[row.name], (xv, yv), textcoords="offset points", xytext=(5, dy),
                                fontsize=7.5, fontweight="bold" if row["pareto"] else "normal",
                                arrowprops=None if dy == -10 else {"arrowstyle": "-", "color": "0.7", "lw": 0.5})
            if x == "time_ratio":
                ax.set_xscale("log")
                ax.axvline(1.0, color="0.75", linestyle=":", linewidth=1, zorder=0)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(scenario, fontsize="small")
            ax.set_xlabel(xlabel if ax.get_subplotspec().is_last_row() else "", fontsize="small")
            ax.set_ylabel("token drops (%)" if ax.get_subplotspec().is_first_col() else "", fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.margins(x=0.25, y=0.15)
        for ax in flat[len(scenarios):]:
            ax.set_visible(False)
        if legend_mode:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], linestyle="none", marker=marker[r], markerfacecolor="0.85",
                              markeredgecolor="0.3", label=r + (" (baseline)" if summary.loc[summary["router"] == r,
                                                                                     "baseline"].any() else ""))
                       for r in routers]
            fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.45, 0.0), ncol=min(6, len(routers)),
                       frameon=False, fontsize="x-small", title="router (black edge: on the Pareto front)",
                       title_fontsize="x-small")
        if scatter is not None:
            bar = fig.colorbar(scatter, ax=list(flat), shrink=0.85, pad=0.015, fraction=0.03)
            bar.set_label(f"{lens.balance} (lower is better)", fontsize="small")
            bar.ax.tick_params(labelsize="x-small")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            bar.ax.yaxis.set_major_formatter(plain)
            bar.ax.yaxis.set_minor_formatter(NullFormatter())
            if isinstance(norm, LogNorm):  # a few plain ticks (a log bar has one or two of its own)
                bar.set_ticks([v for v in (1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500) if lo <= v <= hi])
        path = out_dir / HEADLINE
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return path

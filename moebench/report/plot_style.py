"""Figure helpers for :mod:`moebench.report.plots`: fixed router styles, line drawing that merges
identical routers, one legend outside the axes, plain-number log ticks, saving PNGs.

Figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas (no display, no pyplot
global state); seaborn supplies the theme and the palettes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; harmless when pyplot is never imported

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

DPI = 110
VARIANT = "variant"  # column telling devices/runs apart (None when there is one)


def router_palette(routers) -> dict[str, tuple]:
    """A fixed colour per router, keyed on the sorted router names (same in every figure)."""
    names = sorted({str(r) for r in routers})
    base = "tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "husl"
    return dict(zip(names, sns.color_palette(base, len(names))))


MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "p", "h")
DASHES = ("-", "--", ":", "-.")


def router_markers(routers) -> dict[str, str]:
    """A fixed marker per router, keyed like :func:`router_palette`."""
    names = sorted({str(r) for r in routers})
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(names)}


@dataclass
class Style:
    """How series look: colour and marker per router, line style per variant."""

    palette: dict
    markers: dict

    @classmethod
    def of(cls, routers) -> "Style":
        return cls(router_palette(routers), router_markers(routers))


def variants(df: pd.DataFrame) -> list:
    values = df[VARIANT].dropna().unique() if VARIANT in df.columns else []
    return sorted(values) if len(values) > 1 else [None]


def draw_lines(panels: list, x: str, y: str, style: Style, estimator: str = "mean",
                markersize: float = 5.0) -> tuple[list, list]:
    """Draw one line per router (and variant) on each ``(ax, frame)`` panel; ``y`` aggregated
    with ``estimator`` over the rows sharing ``x``. Routers whose lines are identical on every
    panel are drawn once and named together ("a = b"). Returns the legend's router entries
    ``[(label, router)]`` and the variants (``[None]`` when there is only one)."""
    shown = variants(pd.concat([frame for _, frame in panels]))
    curves: dict[str, list] = {}
    for _, frame in panels:
        frame = frame.assign(**{y: pd.to_numeric(frame[y], errors="coerce")}).dropna(subset=[y])
        key = frame[VARIANT].fillna("") if VARIANT in frame.columns else ""
        frame = frame.assign(_v=key)
        agg = frame.groupby(["router", "_v", x])[y].agg(estimator)
        for router in sorted({str(r) for _, f in panels for r in f["router"]}):
            part = agg.xs(router, level="router") if router in agg.index.get_level_values(0) else agg.iloc[0:0]
            curves.setdefault(router, []).append(part)
    groups: list[list[str]] = []
    for router, series in curves.items():
        for group in groups:
            other = curves[group[0]]
            if all(a.index.equals(b.index) and np.allclose(a.to_numpy(float), b.to_numpy(float),
                                                           rtol=1e-9, atol=1e-12, equal_nan=True)
                   for a, b in zip(series, other)):
                group.append(router)
                break
        else:
            groups.append([router])
    entries = []
    for group in groups:
        first, label = group[0], " = ".join(group)
        entries.append((label, first))
        for (ax, _), series in zip(panels, curves[first]):
            for i, variant in enumerate(shown):
                key = "" if variant is None else variant
                if key not in series.index.get_level_values(0):
                    continue
                line = series.xs(key, level="_v").sort_index()
                ax.plot(line.index.to_numpy(), line.to_numpy(float), color=style.palette[first],
                        marker=style.markers[first], markersize=markersize,
                        linestyle=DASHES[i % len(DASHES)], linewidth=1.6, alpha=0.9)
    return entries, shown


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 4.2, **kw):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def legend_outside(fig: Figure, entries: list, variants: list, style: Style) -> None:
    """One legend right of the axes: routers (colour and marker), then variants (line style)."""
    handles = [Line2D([], [], color=style.palette[r], marker=style.markers[r], label=label)
               for label, r in entries]
    if variants != [None]:
        handles.append(Line2D([], [], linestyle="none", label=""))
        handles += [Line2D([], [], color="0.35", linestyle=DASHES[i % len(DASHES)], label=str(v))
                    for i, v in enumerate(variants)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False,
               title="router",
               fontsize="small", title_fontsize="small")


def slug(text: str, limit: int = 80) -> str:
    """A file-name-safe form of a label for a figure's name: letters, digits, ``.``, ``_`` and
    ``-`` kept, every other run of characters one ``-``; at most ``limit`` characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:limit].rstrip("-") or "case"


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def theme():
    return sns.axes_style("whitegrid")


def plain_log_axis(axis, values=None) -> None:
    """Log axis ticks as plain numbers (256, 0.05) rather than powers: at ``values`` when
    given, else at 1, 2 and 5 times the powers of ten."""
    locator = FixedLocator(sorted(values)) if values is not None else LogLocator(10, subs=(1.0, 2.0, 5.0))
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())

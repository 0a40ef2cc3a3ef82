"""The report section of training runs: final ranking, curves over steps, specialisation heatmaps.

`training_section(data, out_dir)` is one section of moebench.report.build (None when the runs have no
steps.jsonl). It writes training.csv (the ranking table) and plots/train_*.png:

- curves: per case (the variants of one case in one figure), eval loss (perplexity on
  language), MaxVio_global, dead experts and
  routing fluctuation against the step, one line per router (mean over seeds) with a band from
  the lowest to the highest seed;
- heatmaps: per case, for each router and each seed, the share of each ground-truth group's
  held-out tokens that each expert took at the end of training, with one colour bar. One panel
  per seed, not a mean: expert numbers are arbitrary per seed (seed 1's expert 3 is not seed 0's),
  so a mean over seeds would blur a specialised router into a uniform one.

Ranking cells (the rules of moebench/report/summary.py): a column's value is bold
only where one non-baseline router beats every other one of its case. Two routers tie where their
95% intervals over seeds overlap (summary.tie), or, without intervals, where their values agree;
a tie for the best leaves the column without bold. A time without an interval (`train.step_ms`:
one median per seed, no CI) is marked unreliable (†) and never bold. Shown intervals are clipped
to their metric's range (summary.clip: MaxVio >= 0, NMI in [0, 1], losses >= 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from moebench.core.metrics import metric as metric_of
from moebench.core.rows import ok_only
from moebench.report import summary, tables
from moebench.report.markdown import column_direction, engineering, legend, markdown_table

RANKING_COLUMNS = ("eval_loss", "perplexity", "maxvio_global", "maxvio_global_floor", "maxvio_batch_worst",
                   "dead_experts", "nmi", "fluctuation", "settle_step", "bias_flip_rate", "drop_rate", "train.step_ms")
INTERVALS = ("eval_loss", "perplexity", "maxvio_global", "nmi")  # shown with their 95% interval
CURVES = (("eval_loss", "held-out loss"), ("maxvio_global", "MaxVio_global"),
          ("dead_experts", "dead experts"), ("fluctuation", "fluctuation (share of probes)"))


def load_steps(runs) -> pd.DataFrame:
    frames = [pd.DataFrame(run.steps()) for run, _ in runs if hasattr(run, "steps")]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def ranking_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per case x trained router, sorted by held-out loss within each case; each metric
    shown as `mean [low, high]` text would defeat bolding, so the interval is its own column."""
    ok = ok_only(rows)
    ok = ok[ok["kind"] == "train"] if "kind" in ok.columns else ok.iloc[0:0]
    if ok.empty:
        return pd.DataFrame()
    columns = ["case", "router"]
    for metric in RANKING_COLUMNS:
        if metric in ok.columns and ok[metric].notna().any():
            columns.append(metric)
            if metric in INTERVALS and f"{metric}_ci_low" in ok.columns and ok[f"{metric}_ci_low"].notna().any():
                ok = ok.assign(**{f"{metric} 95%": [_interval(metric, a, b) for a, b in zip(ok[f"{metric}_ci_low"],
                                                                                           ok[f"{metric}_ci_high"])]})
                columns.append(f"{metric} 95%")
    out = ok.sort_values(["case", "eval_loss"], kind="stable")
    return out.reindex(columns=columns + list(tables.KEY_TAIL)).reset_index(drop=True)


def _interval(metric: str, low, high) -> str:
    """``[low, high]`` clipped to the metric's range: a t interval of 3 seeds near a bound runs
    past it (MaxVio below 0, NMI above 1), which no seed can reach."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "-"
    low, high = summary.clip(metric, float(low), float(high))
    return f"[{engineering(low)}, {engineering(high)}]"


def _triples(table: pd.DataFrame, rows: pd.DataFrame, column: str) -> list[tuple[float, float, float]]:
    """(value, low, high) per table row: the row's 95% interval over seeds where the rows carry
    ``<column>_ci_low/_ci_high`` (clipped to the range), else NaN bounds (summary.tie then
    compares the values)."""
    values = pd.to_numeric(table[column], errors="coerce")
    keys = [k for k in ("run_id", "case_id", "router") if k in table.columns and k in rows.columns]
    bounds = [f"{column}_ci_low", f"{column}_ci_high"]
    if len(keys) < 3 or not set(bounds) <= set(rows.columns):
        return [(float(v), math.nan, math.nan) for v in values]
    rows = ok_only(rows)  # an error row of the same router carries no interval
    merged = table[keys].merge(rows[keys + bounds].drop_duplicates(keys, keep="last"), on=keys, how="left")
    out = []
    for v, lo, hi in zip(values, pd.to_numeric(merged[bounds[0]], errors="coerce"),
                         pd.to_numeric(merged[bounds[1]], errors="coerce")):
        if math.isnan(lo) or math.isnan(hi):
            out.append((float(v), math.nan, math.nan))
        else:
            out.append((float(v), *summary.clip(column, float(lo), float(hi))))
    return out


def cell_marks(table: pd.DataFrame, rows: pd.DataFrame,
               baseline=frozenset()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(unreliable, tied): booleans shaped like the ranking ``table``, for markdown_table's
    ``marks`` and ``tied``.

    unreliable: a measured (not deterministic) metric without an interval, e.g.
    ``train.step_ms``: it is noise-prone and cannot be told apart, so it is never bold.
    tied: every cell of a column in a case whose best non-baseline router ties (summary.tie:
    overlapping 95% intervals over seeds, or equal values without them) with another
    non-baseline router: the case has no single best for that column."""
    unreliable = pd.DataFrame(False, index=table.index, columns=table.columns)
    tied = unreliable.copy()
    keys = [k for k in tables.KEY_TAIL if k in table.columns]
    if table.empty or not keys or "router" not in table.columns:
        return unreliable, tied
    ranked = ~table["router"].astype(str).isin(set(map(str, baseline)))
    for column in table.columns:
        way = column_direction(column)
        if way == "none":
            continue
        triples = pd.Series(_triples(table, rows, column), index=table.index)
        found = metric_of(column)
        if found is not None and not found.deterministic:
            unreliable[column] = [not math.isnan(t[0]) and summary.unreliable(*t) for t in triples]
        sign = 1.0 if way == "lower" else -1.0  # best = lowest after the sign
        for _, idx in table[ranked].groupby(keys, sort=False, dropna=False).groups.items():
            present = [i for i in idx if not math.isnan(triples[i][0])]
            if len(present) < 2:
                continue
            best = min(present, key=lambda i: sign * triples[i][0])
            if any(summary.tie(triples[best], triples[i]) for i in present if i != best):
                tied.loc[table.index.isin(idx), column] = True
    return unreliable, tied


def with_groups(steps: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Steps with `group` (the case without its training variant: variants of one case share a
    figure), `title` and `line` (router, plus its variant in brackets)."""
    info = {}
    for _, row in rows.drop_duplicates("case_id").iterrows():
        variant = row.get("train.variant") if "train.variant" in rows.columns else None
        variant = None if variant is None or pd.isna(variant) else str(variant)
        label = str(row.get("case", row["case_id"]))
        cut = (lambda text: text.replace(f"+{variant}", "", 1)) if variant else (lambda text: text)  # noqa: E731
        # the case id's last part hashes every field (the variant's label too): drop it as well
        group = cut(str(row["case_id"])).rsplit("-", 1)[0] if variant else str(row["case_id"])
        info[row["case_id"]] = (group, cut(label), variant)
    groups = steps["case_id"].map(lambda c: info.get(c, (c, c, None)))
    lines = [f"{r} ({g[2]})" if g[2] else str(r) for r, g in zip(steps["router"], groups)]
    return steps.assign(group=[g[0] for g in groups], title=[g[1] for g in groups], line=lines)


def plot_curves(steps: pd.DataFrame, rows: pd.DataFrame, out_dir: Path) -> list[tuple[str, Path]]:
    """One figure per case (its variants together): the CURVES panels over steps, one line per
    router (and variant), band = min..max over seeds."""
    from moebench.report import plot_style as figures

    drawn = []
    steps = with_groups(steps, rows)
    style = figures.Style.of(steps["line"].unique())
    for group, frame in steps.groupby("group", sort=False):
        language = "perplexity" in frame.columns and frame["perplexity"].notna().any()
        fig, axes = figures.new_figure(ncols=2, nrows=2, width=10.0, height=6.5)
        for ax, (metric, title) in zip(axes.flat, CURVES):
            if metric == "eval_loss" and language:
                metric, title = "perplexity", "held-out perplexity"
            for router, part in frame.groupby("line", sort=False):
                values = part.assign(v=pd.to_numeric(part[metric], errors="coerce")).groupby("step")["v"]
                mean, low, high = values.mean(), values.min(), values.max()
                colour = style.palette[str(router)]
                ax.plot(mean.index, mean.to_numpy(float), color=colour, marker=style.markers[str(router)],
                        markersize=3, linewidth=1.4, label=str(router))
                ax.fill_between(mean.index, low.to_numpy(float), high.to_numpy(float), color=colour, alpha=0.15)
            if metric == "maxvio_global":
                _draw_floor(ax, rows, frame["case_id"].unique())
            if metric in ("eval_loss", "perplexity") and (pd.to_numeric(frame[metric], errors="coerce") > 0).all():
                ax.set_yscale("log")  # the untrained start would flatten the rest
            ax.set_title(title, fontsize="small")
            ax.set_xlabel("step")
        entries = [(str(r), str(r)) for r in frame["line"].unique()]
        figures.legend_outside(fig, entries, [None], style)
        title = str(frame["title"].iloc[0])
        fig.suptitle(title, fontsize="small")
        path = figures.save(fig, out_dir / "plots" / f"train_curves_{figures.slug(group)}.png")
        drawn.append((title, path))
    return drawn


def _draw_floor(ax, rows: pd.DataFrame, case_ids) -> None:
    """A dashed line at the MaxVio_global an ideal balanced router would show on this many
    held-out tokens (measures.maxvio_floor), where the case's rows agree on one."""
    if "maxvio_global_floor" not in rows.columns:
        return
    floors = pd.to_numeric(rows.loc[rows["case_id"].isin(case_ids), "maxvio_global_floor"], errors="coerce").dropna()
    if len(floors) and floors.nunique() == 1:
        ax.axhline(float(floors.iloc[0]), color="grey", linestyle="--", linewidth=0.9)
        ax.annotate("sampling floor", (1.0, float(floors.iloc[0])), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize="x-small", color="grey")


SEED_PANELS = 6  # panels per figure row: routers side by side, each with all its seeds


def plot_heatmaps(steps: pd.DataFrame, rows: pd.DataFrame, out_dir: Path) -> list[tuple[str, Path]]:
    """One figure per case: a heatmap of P(expert | ground-truth group) per router and seed
    (contingency: groups x (experts + 1 "none" column) token counts of the held-out set), one
    shared colour bar from 0 to 1. A router's seeds sit side by side; several routers share a
    figure row when there are few seeds."""
    from moebench.report import plot_style as figures

    final = steps[steps["contingency"].notna()] if "contingency" in steps.columns else steps.iloc[0:0]
    final = with_groups(final, rows)
    drawn = []
    for group, frame in final.groupby("group", sort=False):
        # the last evaluation of each router and seed (the end of training)
        frame = frame.sort_values("step", kind="stable").drop_duplicates(["line", "seed"], keep="last")
        lines, seeds = list(dict.fromkeys(frame["line"])), sorted(frame["seed"].unique())
        per_row = max(1, min(len(lines), SEED_PANELS // len(seeds)))
        ncols, nrows = per_row * len(seeds), (len(lines) + per_row - 1) // per_row
        fig, axes = figures.new_figure(ncols=ncols, nrows=nrows, width=2.4 * ncols + 1.0, height=2.0 * nrows + 0.4)
        image = None
        for ax in axes.flat:
            ax.set_visible(False)  # shown below where a router ran that seed
        for (line, seed), rec in frame.set_index(["line", "seed"]).iterrows():
            k = lines.index(line)
            ax = axes[k // per_row, (k % per_row) * len(seeds) + seeds.index(seed)]
            ax.set_visible(True)
            table = np.asarray(rec["contingency"], dtype=float)
            share = table / np.maximum(table.sum(1, keepdims=True), 1)
            image = ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            e = share.shape[1] - 1
            ax.set_xticks(range(e + 1), [str(i) for i in range(e)] + ["-"], fontsize="x-small")
            ax.set_yticks(range(share.shape[0]), [str(i) for i in range(share.shape[0])], fontsize="x-small")
            ax.set_title(f"{line} · seed {seed}", fontsize="small")
        for (r, c), ax in np.ndenumerate(axes):  # axis labels on the outer panels only
            if ax.get_visible() and (r == nrows - 1 or not axes[r + 1, c].get_visible()):
                ax.set_xlabel("expert (- = none)", fontsize="x-small")
            if ax.get_visible() and c == 0:
                ax.set_ylabel("group", fontsize="x-small")
        title = str(frame["title"].iloc[0])
        fig.suptitle(f"{title}: every seed ({len(seeds)}); expert numbers differ between seeds", fontsize="small")
        fig.tight_layout()
        if image is not None:  # one bar for all panels (they share vmin/vmax)
            bar = fig.colorbar(image, ax=list(axes.flat), fraction=0.02, pad=0.015, shrink=0.9)
            bar.set_label("share of the group's held-out tokens", fontsize="small")
            bar.ax.tick_params(labelsize="x-small")
        path = out_dir / "plots" / f"train_specialisation_{figures.slug(group)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # not figures.save: its tight_layout would squeeze the colour bar's axes into the grid
        fig.savefig(path, dpi=figures.DPI, bbox_inches="tight", metadata={"Software": None})
        drawn.append((title, path))
    return drawn


BOLD_RULE = ("**Bold**: the one router of the case better than every other non-baseline router; no bold where "
             "the best ties another (overlapping 95% intervals over seeds, for every metric that has one, shown "
             "or not; equal values without). Intervals are clipped to the metric's range.")
UNRELIABLE_RULE = " † a time without an interval (one median step time per seed): never bold."


def _baselines(data) -> set[str]:
    """Router labels that declare themselves baselines (shown, never bold)."""
    from moebench.report.declarations import declarations

    return declarations([meta for _, meta in data.runs], data.rows).baseline


def training_section(data, out_dir: Path) -> str | None:
    """Markdown of the training section (see the module docstring), or None without training runs."""
    steps = load_steps(data.runs)
    table = ranking_table(data.rows)
    if steps.empty and table.empty:
        return None
    hide = ("case_id",) if data.combined else tables.KEY_TAIL
    baseline = _baselines(data)
    body = ["## Training", "",
            "Each router trained a small MoE layer (its own routing inside the forward pass) for every "
            "seed; values are at the end of training, mean over seeds with the 95% interval (Student t). "
            "Rows within a case are ordered by held-out loss; routers whose intervals overlap are tied, "
            "whatever their order.", ""]
    if not table.empty:
        table.to_csv(out_dir / "training.csv", index=False)
        marks, tied = cell_marks(table, data.rows, baseline)
        body += [markdown_table(table, hide=hide, references=baseline, marks=marks, tied=tied), ""]
        line = legend([c for c in table.columns if c not in hide])
        if line:
            rule = BOLD_RULE + (UNRELIABLE_RULE if marks.to_numpy().any() else "")
            body += [line.replace("**Bold**: the best router of the case.", rule), ""]
    if not steps.empty:
        for title, path in plot_curves(steps, data.rows, out_dir):
            body += [f"### Training curves: {title}", "", f"![curves]({path.relative_to(out_dir).as_posix()})", ""]
        body += ["Lines: mean over seeds; bands: lowest to highest seed.", ""]
        for title, path in plot_heatmaps(steps, data.rows, out_dir):
            body += [f"### Specialisation: {title}", "",
                     f"![specialisation]({path.relative_to(out_dir).as_posix()})", "",
                     "Share of each ground-truth group's held-out tokens taken by each expert at the end "
                     "of training, one panel per router and seed (expert numbers are arbitrary per seed, "
                     "so seeds are shown side by side, not averaged).", ""]
    return "\n".join(body).rstrip()

"""The report section of training runs: final ranking, curves over steps, specialisation heatmaps.

`training_section(data, out_dir)` is one section of moebench.report.build (None when the runs have no
steps.jsonl). It writes training.csv (the ranking table) and plots/train_*.png:

- curves: per case (the variants of one case in one figure), eval loss (perplexity on
  language), MaxVio_global, dead experts and
  routing fluctuation against the step, one line per router (mean over seeds) with a band from
  the lowest to the highest seed;
- heatmaps: per case, for each router, the share of each ground-truth group's held-out tokens
  that each expert took at the end of training (seed of the first row; expert labels differ
  between seeds, so seeds are not summed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moebench.core.rows import ok_only
from moebench.report import tables
from moebench.report.markdown import engineering, legend, markdown_table

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
                ok = ok.assign(**{f"{metric} 95%": [_interval(a, b) for a, b in zip(ok[f"{metric}_ci_low"],
                                                                                   ok[f"{metric}_ci_high"])]})
                columns.append(f"{metric} 95%")
    out = ok.sort_values(["case", "eval_loss"], kind="stable")
    return out.reindex(columns=columns + list(tables.KEY_TAIL)).reset_index(drop=True)


def _interval(low, high) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "-"
    return f"[{engineering(low)}, {engineering(high)}]"


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


def plot_heatmaps(steps: pd.DataFrame, rows: pd.DataFrame, out_dir: Path) -> list[tuple[str, Path]]:
    """One figure per case: a heatmap of P(expert | ground-truth group) per router."""
    from moebench.report import plot_style as figures

    final = steps[steps["contingency"].notna()] if "contingency" in steps.columns else steps.iloc[0:0]
    final = with_groups(final, rows)
    drawn = []
    for group, frame in final.groupby("group", sort=False):
        first_seed = frame["seed"].min()
        frame = frame[frame["seed"] == first_seed]
        n = len(frame)
        cols = min(4, n)
        fig, axes = figures.new_figure(ncols=cols, nrows=(n + cols - 1) // cols, width=3.0 * cols,
                                       height=2.6 * ((n + cols - 1) // cols))
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax, (_, rec) in zip(axes.flat, frame.iterrows()):
            table = np.asarray(rec["contingency"], dtype=float)
            share = table / np.maximum(table.sum(1, keepdims=True), 1)
            ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            e = share.shape[1] - 1
            ax.set_xticks(range(e + 1), [str(i) for i in range(e)] + ["-"], fontsize="x-small")
            ax.set_yticks(range(share.shape[0]), [str(i) for i in range(share.shape[0])], fontsize="x-small")
            ax.set_title(str(rec["line"]), fontsize="small")
            ax.set_xlabel("expert (- = none)", fontsize="x-small")
            ax.set_ylabel("group", fontsize="x-small")
        title = str(frame["title"].iloc[0])
        fig.suptitle(f"{title} (seed {first_seed})", fontsize="small")
        path = figures.save(fig, out_dir / "plots" / f"train_specialisation_{figures.slug(group)}.png")
        drawn.append((title, path))
    return drawn


def training_section(data, out_dir: Path) -> str | None:
    """Markdown of the training section (see the module docstring), or None without training runs."""
    steps = load_steps(data.runs)
    table = ranking_table(data.rows)
    if steps.empty and table.empty:
        return None
    hide = ("case_id",) if data.combined else tables.KEY_TAIL
    body = ["## Training", "",
            "Each router trained a small MoE layer (its own routing inside the forward pass) for every "
            "seed; values are at the end of training, mean over seeds with the 95% interval (Student t). "
            "Rows within a case are ranked by held-out loss.", ""]
    if not table.empty:
        table.to_csv(out_dir / "training.csv", index=False)
        body += [markdown_table(table, hide=hide), ""]
        line = legend([c for c in table.columns if c not in hide])
        if line:
            body += [line, ""]
    if not steps.empty:
        for title, path in plot_curves(steps, data.rows, out_dir):
            body += [f"### Training curves: {title}", "", f"![curves]({path.relative_to(out_dir).as_posix()})", ""]
        body += ["Lines: mean over seeds; bands: lowest to highest seed.", ""]
        for title, path in plot_heatmaps(steps, data.rows, out_dir):
            body += [f"### Specialisation: {title}", "",
                     f"![specialisation]({path.relative_to(out_dir).as_posix()})", "",
                     "Share of each ground-truth group's held-out tokens taken by each expert at the end "
                     "of training.", ""]
    return "\n".join(body).rstrip()

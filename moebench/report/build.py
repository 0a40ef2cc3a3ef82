"""Reports: reports/<suite>/<run-id>/report.md, report.html, one CSV per table, plots/*.png.

A report is a list of sections. Each section is a function ``(ReportData, out_dir) -> str |
None`` returning Markdown (None leaves it out); it may also write files next to report.md (the
plots section writes ``plots/*.png``). report.html is the same Markdown rendered by
:mod:`moebench.report.html`, self-contained (images inlined). Nothing is printed:
:func:`write_report` returns the path of report.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from moebench.report import phases_not_timed as phase_status

from moebench.report import route_pivot as side_by_side

from moebench.report import tables
from moebench.report.markdown import legend, markdown_table
from moebench.report.summary import time_cell_marks
from moebench.core.errors import MoebenchError
from moebench.report.html import write_html
from moebench.core.paths import folder_name_problem, inside
from moebench.store.environment import environment, git as git_of
from moebench.store.runs import RunDir, effective_status, load_run
from moebench.core.scaling import scaling_table
from moebench.report.route_pivot import side_by_side_table
from moebench.core import kinds

REPORT = "report.md"


@dataclass
class ReportData:
    """Everything a section may use: the runs (folder and meta), all rows, all batch records,
    the tables built from them (name -> DataFrame; the name is also the CSV's stem) and the
    per-expert loads (long, see :func:`moebench.report.tables.load_expert_loads`; empty when the runs
    have no loads.jsonl)."""

    runs: list[tuple[RunDir, dict]]
    rows: pd.DataFrame
    batches: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    loads: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def combined(self) -> bool:
        return len(self.runs) > 1


Section = Callable[[ReportData, Path], "str | None"]


def build_data(run_dirs: Sequence[str | Path | RunDir]) -> ReportData:
    """Load the runs (each once, in the order given) and build every table."""
    runs, seen = [], set()
    for run_dir in run_dirs:
        run = run_dir if isinstance(run_dir, RunDir) else load_run(run_dir)
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append((run, run.meta()))
    if not runs:
        raise ValueError("write_report needs at least one run folder")
    dirs = [run for run, _ in runs]
    rows = tables.blank_untimed(tables.load_rows(dirs))  # no section may show a time of a phase not timed
    batches = tables.load_batches(dirs)
    data = ReportData(runs, rows, batches, loads=tables.load_expert_loads(dirs))
    data.tables = {
        "balance": tables.balance_table(rows),
        "drops": tables.drops_table(rows),
        "throughput": tables.throughput_table(rows),
        "streams": tables.stream_table(rows, batches),
        "skipped": tables.skipped_table(rows),
        "phases_not_timed": phase_status.phases_not_timed_table(rows),
        "scaling": scaling_table(rows),
        "side_by_side": side_by_side_table(rows),
    }
    return data


def report_dir(data: ReportData, reports_root: Path) -> Path:
    """reports/<suite>/<run-id>/, or reports/<suite>/combined-<id1>+<id2>/ for several runs."""
    suites = list(dict.fromkeys(str(meta.get("suite") or "unknown") for _, meta in data.runs))
    ids = [str(meta.get("run_id") or run.path.name) for run, meta in data.runs]
    for (run, meta), run_id in zip(data.runs, ids):  # meta.json is read back: it must not steer the writer
        for what, value in (("suite", str(meta.get("suite") or "unknown")), ("run_id", run_id)):
            if folder_name_problem(value):
                raise MoebenchError(f"{run.meta_path}: {what} {value[:60]!r} is not a safe folder name")
    name = ids[0] if len(ids) == 1 else "combined-" + "+".join(ids)
    return inside(reports_root, Path(reports_root) / "+".join(suites) / name)


# ----------------------------------------------------------------------------- sections

def _title(data: ReportData, out_dir: Path) -> str:
    suites = ", ".join(dict.fromkeys(str(m.get("suite", "unknown")) for _, m in data.runs))
    ids = ", ".join(f"`{m.get('run_id', run.path.name)}`" for run, m in data.runs)
    lines = [f"# moebench report: {suites}", "", f"Run{'s' if data.combined else ''}: {ids}"]
    for description in dict.fromkeys((m.get("description") or "").strip() for _, m in data.runs):
        if description:
            lines += ["", description]
    return "\n".join(lines)


_STATUS_TEXT = {
    "complete": "complete",
    "interrupted": "**INTERRUPTED** - the run was stopped before it finished; the tables show "
                   "only the rows measured until then (`moebench run --resume` continues it)",
    "running": "**INCOMPLETE** - the run never recorded an end (it was killed, or is still "
               "running); the tables show only the rows measured so far",
    "unknown": "**INCOMPLETE** - still running on another host, or killed there (meta.json "
               "`process`); the tables show only the rows measured so far",
}


def _machine(env: dict, threads: list) -> list[str]:
    affinity = env.get("cpu_affinity")
    cores = env.get("logical_cores")
    core_text = f"{cores} logical cores" if cores is not None else "cores unknown"
    if affinity and cores and len(affinity) != cores:
        core_text += f", {len(affinity)} usable"
    torch_version = env.get("torch") or env.get("torch_version") or "?"
    cuda = env.get("cuda") if isinstance(env.get("cuda"), dict) else {}
    devices = []
    for d in cuda.get("devices") or []:
        if isinstance(d, dict):
            mem = d.get("total_memory_bytes")
            extra = [f"sm {d['capability']}"] if d.get("capability") else []
            extra += [f"{mem / 2**30:.0f} GiB"] if mem else []
            devices.append(f"{d.get('name', 'CUDA device')}" + (f" ({', '.join(extra)})" if extra else ""))
    if devices:
        cuda_text = ", ".join(devices) + f"; CUDA {cuda.get('version')}"
    elif cuda.get("available"):
        cuda_text = f"available (CUDA {cuda.get('version')}), not used"
    else:
        cuda_text = "none"
    thread_text = ", ".join(str(t) for t in threads) if threads else str(env.get("torch_num_threads", "?"))
    return [
        f"- CPU: {env.get('cpu_model', 'unknown')} ({core_text})",
        f"- CUDA devices: {cuda_text}",
        f"- torch {torch_version}, Python {env.get('python', '?')}, threads used: {thread_text}",
        f"- platform: {env.get('platform', '?')}, host: {env.get('hostname', '?')}",
    ]


def _git_text(meta: dict) -> str:
    git = git_of(meta)
    if not git["commit"]:
        return "unknown (not run from a git checkout)"
    return f"`{git['commit']}`" + (" (with uncommitted changes)" if git["dirty"] else "")


def _provenance_one(run: RunDir, meta: dict, rows: pd.DataFrame) -> list[str]:
    env = environment(meta)
    run_id = meta.get("run_id", run.path.name)
    mine = rows[rows["run_id"] == run_id] if "run_id" in rows.columns else rows
    threads = sorted(mine["threads"].dropna().unique().tolist()) if "threads" in mine.columns else []
    threads = [int(t) if float(t).is_integer() else t for t in threads]
    status = effective_status(meta)  # 'running' with its process gone reads as interrupted
    expected = None
    if isinstance(meta.get("cases"), int) and isinstance(meta.get("routers"), list):
        expected = meta["cases"] * len(meta["routers"])
    if isinstance(meta.get("planned_rows"), int):  # a train suite's own count (train/spec.py planned_rows)
        expected = meta["planned_rows"]
    count = f"{len(mine)} rows" + (f" of {expected} planned" if expected is not None else "")
    timing = meta.get("timing") if isinstance(meta.get("timing"), dict) else {}
    lines = [
        "Command:", "", "```", str(meta.get("command") or "(not recorded)"), "```", "",
        f"- status: {_STATUS_TEXT.get(status, status)} ({count})",
        f"- started {meta.get('started_at') or '?'}, ended {meta.get('ended_at') or 'never recorded'}"
        + (f", resumed {meta['resumed_at']}" if meta.get("resumed_at") else ""),
        f"- moebench {meta.get('moebench_version') or env.get('moebench') or '?'}, git commit {_git_text(meta)}",
        f"- suite `{meta.get('suite', '?')}` version {meta.get('suite_version', '?')} from "
        f"`{meta.get('suite_path', '?')}` (sha256 `{str(meta.get('suite_sha256', '?'))[:12]}`)",
        "- quick mode: **yes** (smoke-run sizes and timing; not for comparison)" if meta.get("quick")
        else "- quick mode: no",
        f"- devices: {', '.join(map(str, meta.get('devices') or [])) or '?'}, seeds: "
        f"{', '.join(map(str, meta.get('seeds') or [])) or '?'}",
    ]
    if timing:
        lines.append("- timing: " + ", ".join(f"{k}={v}" for k, v in timing.items()))
    lines += _machine(env, threads)
    return lines


def _provenance(data: ReportData, out_dir: Path) -> str:
    out = ["## How this was made"]
    for run, meta in data.runs:
        if data.combined:
            out += ["", f"### Run `{meta.get('run_id', run.path.name)}`"]
        out += [""] + _provenance_one(run, meta, data.rows)
    return "\n".join(out)


def _hidden(data: ReportData) -> tuple[str, ...]:
    return ("case_id",) if data.combined else tables.KEY_TAIL


def table_section(name: str, title: str, note: str = "") -> Section:
    """A section rendering ``data.tables[name]`` under ``## title`` with its legend line;
    left out when the table is empty and ``name`` is one of the optional tables."""

    def section(data: ReportData, out_dir: Path) -> str | None:
        table = data.tables.get(name)
        if table is None or not has_data(table):  # no section without data (issue #21)
            return None
        body = [f"## {title}", ""]
        if note:
            body += [note, ""]
        marks, tied = time_cell_marks(table, data.rows, _baselines(data))  # † and CI ties
        body.append(markdown_table(table, hide=_hidden(data), bold=name != "skipped",
                                   references=_baselines(data), marks=marks, tied=tied))
        line = legend([c for c in table.columns if c not in _hidden(data)])
        if line and not table.empty:
            body += ["", line]
        return "\n".join(body)

    return section


OPTIONAL_TABLES = ("streams", "skipped", "scaling", "side_by_side", "phases_not_timed")
_NOT_DATA = ("case", "router", "threads", *tables.KEY_TAIL)  # columns every table has


def has_data(table: pd.DataFrame) -> bool:
    """A table with a row and some value beyond its identity columns (a training run's drops
    table, or a throughput table whose only column is ``threads``, has none)."""
    if table is None or table.empty:
        return False
    values = table.drop(columns=[c for c in _NOT_DATA if c in table.columns])
    return bool(values.notna().to_numpy().any())


def _baselines(data: ReportData) -> set[str]:
    """Router labels that declare themselves baselines (moebench/report/declarations.py)."""
    from moebench.report.declarations import declarations

    return declarations([meta for _, meta in data.runs], data.rows).baseline


def _summary(data: ReportData, out_dir: Path) -> str | None:
    """The verdict first (moebench/report/summary_section.py): load, best-for, headline figure."""
    from moebench.report.summary_section import summary_markdown

    return summary_markdown(data.rows, [meta for _, meta in data.runs], out_dir, PLOTS_DIR)


def _side_by_side(data: ReportData, out_dir: Path) -> str | None:
    """Route medians with one column per router (`moebench.report.route_pivot`); None without two
    timed routers."""
    table = data.tables.get("side_by_side")
    if table is None or table.empty:
        return None
    return "\n".join([
        "## Route time side by side", "",
        "Median ms of one route call and, in brackets, its ratio to the fastest non-baseline router "
        "of the case, all timed in one process on the same logits. Bold: the fastest, where its 95% "
        "CI overlaps no other router's (overlap is a tie); † a median whose CI is missing or wider "
        "than 25% of it.", "",
        side_by_side.markdown(table, hide=_hidden(data), references=_baselines(data)),
    ])
PLOTS_DIR = "plots"


def _plots(data: ReportData, out_dir: Path) -> str | None:
    """Every plot the data allow (see :mod:`moebench.report.plots`) as ``plots/*.png``, embedded;
    PNGs of an earlier report are removed by write_report first. None when nothing applies."""
    from moebench.report import plots  # matplotlib/seaborn only when a report draws

    plot_dir = out_dir / PLOTS_DIR
    drawn = plots.write_plots(data.rows, data.batches, data.loads, plot_dir)
    if not drawn:
        return None
    devices = data.rows["device"].nunique() if "device" in data.rows.columns else 1
    body = ["## Plots", "", "Router colours are the same in every figure."
            + (" Line styles tell the devices/runs apart." if data.combined or devices > 1 else "")]
    previous = None
    for plot in drawn:
        rel = plot.path.relative_to(out_dir).as_posix()
        alt = plot.title.replace("[", "(").replace("]", ")")
        body += ["", f"### {plot.title}", "", f"![{alt}]({rel})"]
        if plot.caption and plot.caption != previous:  # said once for a series of figures
            body += ["", plot.caption]
        previous = plot.caption
    return "\n".join(body)


def kind_sections(place: str) -> Section:
    """The report sections of every kind (moebench/core/kinds.py `Kind.section`) placed at
    ``place``: "lead" (after the summary: training, expert parallelism) or "inputs" (after the
    provenance: trace statistics), in kind order."""

    def sections(data: ReportData, out_dir: Path) -> str | None:
        parts = [text for kind in kinds.kinds().values()
                 if kind.section is not None and kind.section_at == place and (text := kind.section(data, out_dir))]
        return "\n\n".join(parts) or None

    return sections


SECTIONS: list[Section] = [
    _title,
    _summary,  # the verdict before everything else (issue #21)
    kind_sections("lead"),  # a kind's own sections lead its report: training curves, ranks (issue #21)
    _provenance,
    kind_sections("inputs"),
    table_section("balance", "Load balance",
                  "Per-expert loads after capacity (streams: mean over the batches)."),
    table_section("drops", "Dropped tokens",
                  "Capacity per expert (`-` = dropless), dropped assignments and tokens, losses."),
    table_section("throughput", "Throughput",
                  "Per phase: median and IQR of one call in ms, tokens/s at the median, peak MB "
                  "(where measurable). Timed on the first batch. A phase that was not timed reads "
                  "`skipped` or `error` (see Phases not timed). † a median whose 95% CI is missing (too "
                  "few rounds) or wider than 25% of it; a case whose fastest CI overlaps another "
                  "router's has no bold time (a tie)."),
    phase_status.section,
    _side_by_side,
    table_section("streams", "Streams",
                  "Per-batch trajectories over each stream: first, last, mean and worst batch."),
    table_section("scaling", "Scaling",
                  "Fitted exponent of median time against T (at fixed E) and against E (at fixed T): "
                  "the slope of log(ms) on log(axis); 1.0 is linear. `exponent` fits every point, "
                  "`exponent_top` the three largest, where every tensor is out of cache and "
                  "allocations of 32 MiB and more get fresh pages on each call."),
    _plots,
    table_section("skipped", "Skipped and failed rows"),
]


# ----------------------------------------------------------------------------- writing

def write_tables(data: ReportData, out_dir: Path) -> list[Path]:
    """One CSV per table (the OPTIONAL_TABLES only when they have rows); returns them."""
    written = []
    for name, table in data.tables.items():
        path = out_dir / f"{name}.csv"
        if table.empty and name in OPTIONAL_TABLES:
            path.unlink(missing_ok=True)  # a stale one from an earlier report
            continue
        table.to_csv(path, index=False)
        written.append(path)
    return written


def write_report(run_dirs: list[Path], reports_root: Path = Path("reports"),
                 sections: Sequence[Section] | None = None) -> Path:
    """Write report.md, report.html and the CSVs (and plots) of one run (or several, combined);
    return report.md's path.

    Goes to ``reports_root/<suite>/<run-id>/`` (several runs:
    ``reports_root/<suite>/combined-<id1>+<id2>/``). ``sections`` defaults to :data:`SECTIONS`.
    """
    data = build_data(run_dirs)
    out_dir = report_dir(data, reports_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(data, out_dir)
    plot_dir = out_dir / PLOTS_DIR
    for stale in plot_dir.glob("*.png") if plot_dir.is_dir() else ():  # an earlier report's
        stale.unlink()
    parts = [text for section in (SECTIONS if sections is None else sections)
             if (text := section(data, out_dir))]
    path = out_dir / REPORT
    markdown = "\n\n".join(parts) + "\n"
    path.write_text(markdown, encoding="utf-8")
    write_html(markdown, out_dir)
    return path

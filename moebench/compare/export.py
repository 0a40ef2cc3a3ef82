"""Export a run: a committed baseline, or the JSON that pytest-benchmark writes.

- ``baseline``: ``{"format": "moebench-baseline", "meta": meta, "rows": ok rows}``, rows sorted
  by (case_id, router), keys sorted, two-space indent, so re-exporting gives the same bytes and
  diffs stay readable. `moebench compare` reads it like a run folder. By default it keeps what
  the code decides and drops what the moment decides: no measured columns (times, memory,
  measured ratios), no run ids, dates, command line, machine or git state; so a refresh with
  unchanged code rewrites nothing and a diff shows exactly which metrics moved.
  ``with_timings=True`` keeps everything (meta ``timings_included`` says which it is).
- ``asv``: asv's results folder (`moebench.compare.asv_results`), for `asv publish`.
- ``pytest-benchmark``: the ``--benchmark-json`` / ``--benchmark-save`` format of pytest-benchmark
  (machine_info, commit_info, benchmarks, datetime, version), one benchmark per ok row x timed
  phase, times in seconds, so ``pytest-benchmark compare`` and tools built on it read our runs.
  Fields we do not measure are filled as documented in :func:`pytest_benchmark_stats`.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from moebench.core.case import case_axes
from moebench.core.errors import MoebenchError
from moebench.core.metrics import METRICS, PHASES, metric
from moebench.core.paths import write_output
from moebench.store.environment import cuda as cuda_of, environment, gpu_names, git as git_of, obj
from moebench.store.reader import sorted_ok
from moebench.compare.sides import load_side

FORMATS = ("baseline", "pytest-benchmark", "asv")
# meta keys a baseline keeps without timings: what the suite and the code decide (docs/ci.md)
BASELINE_META = ("suite", "suite_path", "suite_sha256", "suite_version", "description", "quick", "cases",
                 "routers", "seeds", "devices", "device_option", "timing", "status", "moebench_version")
BASELINE_FORMAT = "moebench-baseline"
# Written into `version` when pytest-benchmark is not installed (the schema of the 4.x/5.x line).
PYTEST_BENCHMARK_FALLBACK_VERSION = "5.1.0"


def _measured(column: str) -> bool:
    """A column a run measures rather than computes: varies from run to run with the same code."""
    found = metric(column)
    if found is not None:
        return not found.deterministic
    return column == "run_id" or column.endswith("_ms") or column.endswith("_bytes")


def baseline(meta: dict, rows: list[dict], with_timings: bool = False) -> dict:
    """The baseline document of a run: its meta and its ok rows, sorted; without timings
    (default) only the columns and meta keys that the code and the suite decide."""
    ok = sorted_ok(rows)
    if with_timings:
        return {"format": BASELINE_FORMAT, "meta": {**meta, "timings_included": True}, "rows": ok}
    kept = {k: meta[k] for k in BASELINE_META if k in meta}
    env = environment(meta)
    kept["environment"] = {k: env[k] for k in ("moebench", "torch", "numpy", "python") if k in env}
    kept["timings_included"] = False
    return {"format": BASELINE_FORMAT, "meta": kept,
            "rows": [{k: v for k, v in r.items() if not _measured(k)} for r in ok]}


def _f(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def pytest_benchmark_stats(row: dict, phase: str) -> dict | None:
    """pytest-benchmark's ``stats`` of one phase, in seconds (None when the phase was not timed).

    We keep summaries, not samples, so: q1/q3 fall back to median -/+ iqr/2 for rows made before
    they were recorded; stddev to iqr/1.349 (its value for a normal distribution);
    ld15iqr/hd15iqr are the Tukey fences clipped to [min, max]; the outlier counts are 0 (we do
    not know them); total = mean x rounds; ops = 1/mean; iterations = 1 (one call per round).
    """
    g = {k: _f(row.get(f"{phase}.{k}")) for k in
         ("median_ms", "mean_ms", "min_ms", "max_ms", "iqr_ms", "q1_ms", "q3_ms", "stdev_ms")}
    rounds = _f(row.get(f"{phase}.rounds"))
    if g["median_ms"] is None or not rounds or rounds < 1 or rounds > 1e12:
        return None
    median = g["median_ms"] / 1e3
    mean = (g["mean_ms"] if g["mean_ms"] is not None else g["median_ms"]) / 1e3
    lo = (g["min_ms"] if g["min_ms"] is not None else g["median_ms"]) / 1e3
    hi = (g["max_ms"] if g["max_ms"] is not None else g["median_ms"]) / 1e3
    iqr = (g["iqr_ms"] or 0.0) / 1e3
    q1 = g["q1_ms"] / 1e3 if g["q1_ms"] is not None else median - iqr / 2
    q3 = g["q3_ms"] / 1e3 if g["q3_ms"] is not None else median + iqr / 2
    stddev = g["stdev_ms"] / 1e3 if g["stdev_ms"] is not None else iqr / 1.349
    return {
        "min": lo, "max": hi, "mean": mean, "stddev": stddev, "rounds": int(rounds),
        "median": median, "iqr": q3 - q1, "q1": q1, "q3": q3,
        "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0",
        "ld15iqr": max(lo, q1 - 1.5 * (q3 - q1)), "hd15iqr": min(hi, q3 + 1.5 * (q3 - q1)),
        "ops": 1.0 / mean if mean > 0 else 0.0, "total": mean * int(rounds), "iterations": 1,
    }


def _machine_info(meta: dict) -> dict:
    env = environment(meta)
    cuda = cuda_of(env)
    return {
        "node": env.get("hostname"),
        "processor": env.get("cpu_model"),
        "machine": None,
        "python_compiler": None,
        "python_implementation": env.get("python_implementation"),
        "python_implementation_version": env.get("python"),
        "python_version": env.get("python"),
        "python_build": None,
        "release": None,
        "system": str(env.get("platform") or "").split("-")[0] or None,
        "cpu": {"brand_raw": env.get("cpu_model"), "count": env.get("logical_cores")},
        "moebench": {  # extra: what pytest-benchmark does not capture but our timings depend on
            "platform": env.get("platform"), "torch": env.get("torch"),
            "torch_num_threads": env.get("torch_num_threads"), "cpu_affinity": env.get("cpu_affinity"),
            "cuda_version": cuda.get("version"),
            "cuda_devices": gpu_names(env),
            "reference": meta.get("reference"),
        },
    }


def _commit_info(meta: dict) -> dict:
    git = git_of(meta)
    return {"id": git["commit"] or "unknown", "time": None, "author_time": None,
            "dirty": git["dirty"], "project": "moebench", "branch": "(unknown)"}


def _extra_info(row: dict, phase: str) -> dict:
    metrics = {m: row.get(m) for m, spec in METRICS.items() if spec.deterministic and m in row}
    axes = {k: row.get(k) for k in ("case_id", "router", "router_name", "router_params", *case_axes(),
                                    "capacity", "threads")}
    timing = {k: row.get(f"{phase}.{k}") for k in ("ci_low_ms", "ci_high_ms", "tokens_per_s", "peak_mem_bytes")}
    return {"phase": phase, **axes, **timing, **metrics}


def _pytest_benchmark_version() -> str:
    try:
        return version("pytest-benchmark")
    except PackageNotFoundError:
        return PYTEST_BENCHMARK_FALLBACK_VERSION


def pytest_benchmark(meta: dict, rows: list[dict]) -> dict:
    """The run as a pytest-benchmark JSON document.

    name ``<phase>[<case_id>-<router>]``; fullname ``moebench/<suite>::<name>``; group
    ``<phase> <case_id>`` (so a table compares the routers of one case and phase); params
    ``{"case_id", "router"}``; extra_info: the case axes, the phase's CI and tokens/s and every
    routing metric; options: the run's timing settings in pytest-benchmark's terms.
    """
    timing = obj(meta.get("timing"))
    devices = meta.get("devices") if isinstance(meta.get("devices"), list) else []
    options = {
        "disable_gc": False,
        "timer": "torch.cuda.Event" if any(str(d).startswith("cuda") for d in devices) else "perf_counter",
        "min_rounds": timing.get("min_rounds"),
        "max_time": None,
        "min_time": timing.get("min_time_s"),
        "warmup": bool(timing.get("warmup_rounds")),
    }
    suite = meta.get("suite", "moebench")
    benchmarks = []
    for row in sorted_ok(rows):
        for phase in PHASES:
            stats = pytest_benchmark_stats(row, phase)
            if stats is None:
                continue
            param = f"{row['case_id']}-{row['router']}"
            name = f"{phase}[{param}]"
            benchmarks.append({
                "group": f"{phase} {row['case_id']}", "name": name, "fullname": f"moebench/{suite}::{name}",
                "params": {"case_id": row["case_id"], "router": row["router"]}, "param": param,
                "extra_info": _extra_info(row, phase), "options": dict(options), "stats": stats,
            })
    return {
        "machine_info": _machine_info(meta), "commit_info": _commit_info(meta), "benchmarks": benchmarks,
        "datetime": meta.get("started_at"), "version": _pytest_benchmark_version(),
    }


def _finite(value):
    """JSON has no NaN/inf: null them anywhere in a document."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def export_runs_asv(run_dirs, out: str | Path, machine: str | None = None) -> int:
    """Write the runs into the asv results folder ``out`` (see `moebench.compare.asv_results`);
    returns how many results files were written."""
    from moebench.compare.asv_results import export_asv

    runs = []
    for run_dir in run_dirs:
        meta, rows = load_side(run_dir)
        runs.append((meta, sorted_ok(rows)))
    return export_asv(runs, out, machine)


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None,
               with_timings: bool = False) -> tuple[str, int]:
    """Export ``run_dir`` as ``fmt`` (baseline | pytest-benchmark); write it to ``out`` if given.
    Returns (the JSON text, how many rows or benchmarks it holds). ``with_timings``: a baseline
    keeps its measured columns and run metadata. (asv: :func:`export_runs_asv`.)"""
    if fmt not in FORMATS or fmt == "asv":
        raise MoebenchError(f"--format {fmt!r}: expected one of baseline, pytest-benchmark")
    meta, rows = load_side(run_dir)  # a run folder, or results/<suite>: its latest run
    doc = baseline(meta, rows, with_timings) if fmt == "baseline" else pytest_benchmark(meta, rows)
    text = json.dumps(_finite(doc), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    if out is not None:
        write_output(out, text, "--out", make_parents=True)  # whole or not at all; OSError -> one line
    return text, len(doc["rows"] if fmt == "baseline" else doc["benchmarks"])

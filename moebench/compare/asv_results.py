"""Runs as airspeed velocity (asv) results, so `asv publish` draws history pages over commits.

asv keeps, under its ``results_dir``: ``benchmarks.json`` (what each benchmark is: name, type,
unit, parameters), ``<machine>/machine.json`` (the machine), and one
``<machine>/<commit[:8]>-<env>.json`` per commit and environment (api version 2: per benchmark
a row of ``result_columns``: result, params, version, started_at, duration, stats_ci_99_a,
stats_ci_99_b, stats_q_25, stats_q_75, stats_number, stats_repeat). A run of one suite at one
commit becomes one results file:

- ``<suite>.time_<phase>`` (type ``time``, seconds): each row's ``<phase>.median_ms``;
  stats_q_25/q_75 from the row's quartiles, stats_repeat its rounds, stats_number 1.
  stats_ci_99_a/b stay empty: our interval is a 95% one, and asv reads those fields as 99%
  (so asv weights no point by its interval when it detects steps);
- ``<suite>.track_<metric>`` (type ``track``): every other metric column the rows carry
  (`moebench.core.metrics.metric`), ``.`` turned into ``_`` (``model.ep8.layer_ms`` ->
  ``track_model_ep8_layer_ms``), unit ``ms`` for times, else ``unit``.

Each benchmark takes the parameters ``case`` and ``router`` (asv writes parameter values as
Python reprs); cells a run does not have (a skipped router) are null, as asv writes a failed
one. ``benchmarks.json`` is merged with what the folder already holds, so exporting runs one
by one (nightly) grows one history. The commit's date comes from ``git`` where the commit is in
the current repository, else from the run's start (asv orders commits by the repository anyway).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

from moebench.core.errors import MoebenchError
from moebench.core.metrics import PHASES, metric
from moebench.core.paths import write_output
from moebench.store.environment import environment, git as git_of

RESULT_COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
                  "stats_q_25", "stats_q_75", "stats_number", "stats_repeat"]
PARAM_NAMES = ["case", "router"]
API_VERSION = 2  # asv's results and benchmarks.json format
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf") \
        else None


def _benchmark_columns(rows: list[dict]) -> dict[str, tuple[str, str, str]]:
    """{benchmark suffix: (row column, asv type, unit)} for every metric the rows carry."""
    out = {}
    columns = sorted({c for r in rows for c in r if metric(c) is not None})
    for column in columns:
        phase, _, field = column.partition(".")
        if phase in PHASES and field:
            if field == "median_ms":
                out[f"time_{phase}"] = (column, "time", "seconds")
            continue  # the other phase fields describe the median's spread: its stats
        unit = "ms" if column.endswith("_ms") else "unit"
        out["track_" + column.replace(".", "_")] = (column, "track", unit)
    return out


def _version(name: str, column: str) -> str:
    """asv drops results whose version differs from benchmarks.json's: tie it to the column."""
    return hashlib.sha256(f"moebench:{name}:{column}".encode()).hexdigest()


def _commit_date_ms(commit: str, meta: dict) -> int:
    try:
        done = subprocess.run(["git", "show", "-s", "--format=%ct", commit], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout.strip()) * 1000
    except OSError:
        pass
    try:
        return int(datetime.fromisoformat(str(meta.get("started_at"))).timestamp() * 1000)
    except ValueError:
        raise MoebenchError("meta.json: started_at: expected an ISO date (the run's start), "
                            f"got {meta.get('started_at')!r}") from None


def _machine(meta: dict, name: str | None) -> dict:
    env = environment(meta)
    machine = name or str(env.get("hostname") or "unknown")
    arch = re.search(r"x86_64|aarch64|arm64|ppc64le|s390x|i686", str(env.get("platform") or ""))
    return {"machine": _SAFE.sub("-", machine), "arch": arch.group(0) if arch else "", "cpu": str(env.get("cpu_model") or ""),
            "num_cpu": str(env.get("logical_cores") or ""), "os": str(env.get("platform") or ""), "ram": ""}


def _env_name(meta: dict) -> str:
    env = environment(meta)
    return _SAFE.sub("-", f"moebench-py{env.get('python', '?')}-torch{env.get('torch', '?')}")


def run_results(meta: dict, rows: list[dict], machine: str | None = None) -> tuple[dict, dict, dict, str]:
    """(benchmarks, machine.json, results document, its path under results_dir) of one run."""
    commit = git_of(meta)["commit"]
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        raise MoebenchError(f"meta.json: environment.git.commit: expected the run's git commit, got {commit!r} "
                            "(asv files results by commit)")
    suite = _SAFE.sub("_", str(meta.get("suite") or "moebench"))
    cases = sorted({str(r["case_id"]) for r in rows})
    routers = sorted({str(r["router"]) for r in rows})
    params = [[repr(c) for c in cases], [repr(r) for r in routers]]
    cell = {(str(r["case_id"]), str(r["router"])): r for r in rows}
    mach = _machine(meta, machine)
    env = environment(meta)
    benchmarks, results = {}, {}
    for suffix, (column, kind, unit) in _benchmark_columns(rows).items():
        name = f"{suite}.{suffix}"
        benchmarks[name] = {"name": name, "type": kind, "unit": unit, "params": params, "param_names": PARAM_NAMES,
                            "version": _version(name, column), "pretty_name": f"{suite}: {column}",
                            "code": f"moebench row column {column!r}: {metric(column).description}",
                            "timeout": 0, "number": 1, "repeat": 0, "min_run_count": 0}
        values, q25, q75, repeat = [], [], [], []
        for c in cases:
            for r in routers:
                row = cell.get((c, r), {})
                value = _num(row.get(column))
                if kind == "time":
                    phase = column.split(".")[0]
                    scale = lambda x: None if x is None else x / 1e3  # noqa: E731 (ms -> s)
                    values.append(scale(value))
                    q25.append(scale(_num(row.get(f"{phase}.q1_ms"))))
                    q75.append(scale(_num(row.get(f"{phase}.q3_ms"))))
                    rounds = _num(row.get(f"{phase}.rounds"))
                    repeat.append(None if rounds is None else int(rounds))
                else:
                    values.append(value)
        stats = [None, None, q25 or None, q75 or None, [1 if v is not None else None for v in values]
                 if kind == "time" else None, repeat or None]
        results[name] = [values, params, _version(name, column), None, None, *stats]
    doc = {"commit_hash": commit, "env_name": _env_name(meta), "date": _commit_date_ms(commit, meta),
           "params": {**mach, "python": str(env.get("python") or "")}, "python": str(env.get("python") or ""),
           "requirements": {"torch": str(env.get("torch") or "")}, "env_vars": {},
           "result_columns": RESULT_COLUMNS, "results": results, "durations": {}, "version": API_VERSION}
    machine_doc = {**mach, "version": 1}
    return benchmarks, machine_doc, doc, f"{mach['machine']}/{commit[:8]}-{doc['env_name']}.json"


def _merge(old: dict, new: dict) -> dict:
    """benchmarks.json entries of both, each benchmark's parameter values the union of both."""
    out = dict(old)
    for name, bench in new.items():
        if name in out and isinstance(out[name], dict) and out[name].get("params"):
            merged = [sorted(set(a) | set(b)) for a, b in zip(out[name]["params"], bench["params"])]
            bench = {**bench, "params": merged}
        out[name] = bench
    return out


def _write_json(path: Path, doc: dict) -> None:
    write_output(path, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n", "--out", make_parents=True)


def export_asv(runs: list[tuple[dict, list[dict]]], out_dir: str | Path, machine: str | None = None) -> int:
    """Write ``runs`` ((meta, ok rows) each) into the asv results folder ``out_dir``; returns
    how many results files were written. ``machine`` overrides the runs' hostname."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoebenchError(f"--out {out}: asv results go into a folder (asv's results_dir), not a file")
    index = out / "benchmarks.json"
    try:
        benchmarks = json.loads(index.read_text()) if index.exists() else {}
    except (OSError, ValueError) as exc:
        raise MoebenchError(f"{index}: not asv's benchmarks.json ({exc})") from None
    benchmarks.pop("version", None)
    for meta, rows in runs:
        new, machine_doc, doc, rel = run_results(meta, rows, machine)
        benchmarks = _merge(benchmarks, new)
        _write_json(out / machine_doc["machine"] / "machine.json", machine_doc)
        _write_json(out / rel, doc)
    _write_json(index, {**benchmarks, "version": API_VERSION})
    return len(runs)

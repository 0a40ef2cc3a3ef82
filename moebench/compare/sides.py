"""The two sides of a comparison: loading a run, baseline or results folder, and putting
times from two machines on one scale (per the reference kernel timed in each run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moebench.core.errors import MoebenchError
from moebench.core.rows import ROW_KEY
from moebench.store.environment import machine_identity, obj
from moebench.store.reader import latest_rows, read_regular
from moebench.store.runs import META, ROWS, RunDir

MODES = ("auto", "absolute", "relative")


MAX_BASELINE_BYTES = 256 << 20  # a baseline of 100 000 rows is ~200 MB


def _read_baseline(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a baseline file; every way it can be malformed is one MoebenchError."""
    data = read_regular(path, MAX_BASELINE_BYTES)  # a FIFO or device in its place: refused at once
    if data is None:
        raise MoebenchError(f"{path}: no such run folder or baseline file")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MoebenchError(f"{path}: not a baseline file (not UTF-8 text at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        detail = f"at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deep"
        raise MoebenchError(f"{path}: not a baseline file (invalid JSON {detail})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise MoebenchError(f"{path}: not a baseline file (expected a JSON object with 'meta' and 'rows')")
    meta = doc.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise MoebenchError(f"{path}: meta: expected a JSON object, got {type(meta).__name__}")
    for i, row in enumerate(doc["rows"]):
        if not isinstance(row, dict):
            raise MoebenchError(f"{path}: rows[{i}]: expected a JSON object (a row), got {type(row).__name__}")
        for key in ROW_KEY:
            if not isinstance(row.get(key), str):
                raise MoebenchError(f"{path}: rows[{i}].{key}: expected a string, got {type(row.get(key)).__name__}")
    return dict(meta or {}), latest_rows(doc["rows"], path)


def load_side(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a run folder, a baseline file ({"meta", "rows"}, from `moebench export`)
    or a folder of runs such as results/<suite> (its latest run)."""
    path = Path(path)
    if path.is_file():
        return _read_baseline(path)
    if path.exists() and not path.is_dir():
        raise MoebenchError(f"{path}: not a run folder or a baseline file (not a regular file)")
    if not path.is_dir():
        raise MoebenchError(f"{path}: no such run folder or baseline file")
    if not (path / META).exists():
        runs = sorted(p for p in path.iterdir() if (p / META).exists())
        if not runs:
            raise MoebenchError(f"{path}: not a moebench run (no {META}) and holds no runs")
        path = runs[-1]
    if not (path / ROWS).exists():
        raise MoebenchError(f"{path}: the run has no {ROWS}")
    run = RunDir(path)
    return run.meta(), run.rows()


def num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def reference(meta: dict, device: str | None = None) -> dict | None:
    """The reference kernel time for ``device`` (meta "reference_by_device"), else the run's."""
    by_device = obj(meta.get("reference_by_device"))
    ref = by_device.get(device) if isinstance(device, str) and device in by_device else meta.get("reference")
    ok = isinstance(ref, dict) and (num(ref.get("median_ms")) or 0) > 0
    return ref if ok else None


def resolve_mode(mode: str, meta_a: dict, meta_b: dict, notes: list[str]) -> str:
    if mode not in MODES:
        raise MoebenchError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    ref_a, ref_b = reference(meta_a), reference(meta_b)
    same_kernel = bool(ref_a and ref_b and ref_a.get("kernel") == ref_b.get("kernel"))
    differ = machine_identity(meta_a) != machine_identity(meta_b)
    if mode == "relative" and not same_kernel:
        raise MoebenchError("--relative: both runs need a meta.json 'reference' time of the same kernel")
    if mode == "auto":
        mode = "relative" if differ and same_kernel else "absolute"
        if differ and not same_kernel:
            notes.append("the runs come from different machines and do not both carry a reference kernel time: "
                         "times are compared raw and may reflect the machines, not the code")
    if mode == "relative":
        notes.append(f"times are relative to the reference kernel {ref_a.get('kernel')!r} "
                     f"(A: {ref_a['median_ms']:.4g} ms, B: {ref_b['median_ms']:.4g} ms): time / reference median")
    return mode


class Scale:
    """Turns one side's row values into compared values: raw, or per reference median."""

    def __init__(self, meta: dict, relative: bool, device: str | None):
        ref = reference(meta, device) if relative else None
        self.ref = ref["median_ms"] if ref else 1.0
        self.low = num(ref.get("ci_low_ms")) if ref else None
        self.high = num(ref.get("ci_high_ms")) if ref else None

    def value(self, metric: str, x: float | None) -> float | None:
        if x is None:
            return None
        if metric.endswith("_ms"):
            return x / self.ref
        return x * self.ref if metric.endswith(".tokens_per_s") else x

    def ci(self, row: dict, phase: str) -> tuple[float, float] | None:
        """CI of the scaled median; the reference's own CI widens it (conservative)."""
        low, high = num(row.get(f"{phase}.ci_low_ms")), num(row.get(f"{phase}.ci_high_ms"))
        if low is None or high is None:
            return None
        return low / (self.high or self.ref), high / (self.low or self.ref)

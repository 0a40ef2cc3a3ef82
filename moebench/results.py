"""Run storage: results/<suite>/<run-id>/ with rows.jsonl, batches.jsonl, loads.jsonl, meta.json
and suite.yaml.

Rows are appended one JSON line at a time and flushed to disk as each finishes, so Ctrl-C or
a kill loses nothing already measured; a torn last line (killed mid-write) is ignored on read.
meta.json is replaced atomically (write to a temporary file, then rename).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from moebench.errors import MoebenchError

ROWS = "rows.jsonl"
BATCHES = "batches.jsonl"
LOADS = "loads.jsonl"
META = "meta.json"
SUITE_COPY = "suite.yaml"


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable, unique: UTC timestamp plus 4 random hex digits."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value):
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _append_line(path: Path, record: dict) -> None:
    line = json.dumps({k: _clean(v) for k, v in record.items()}, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line of ``path`` (missing file: none; a torn final line is skipped)."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # interrupted while writing the last row
            raise MoebenchError(f"{path}: line {i + 1}: not valid JSON") from None
    return out


@dataclass
class RunDir:
    """One run's folder and the operations on it."""

    path: Path

    @property
    def rows_path(self) -> Path:
        return self.path / ROWS

    @property
    def batches_path(self) -> Path:
        return self.path / BATCHES

    @property
    def loads_path(self) -> Path:
        return self.path / LOADS

    @property
    def meta_path(self) -> Path:
        return self.path / META

    def create(self, meta: dict, suite_text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=False)
        (self.path / SUITE_COPY).write_text(suite_text, encoding="utf-8")
        write_json_atomic(self.meta_path, meta)

    def append_row(self, row: dict) -> None:
        _append_line(self.rows_path, row)

    def append_batches(self, records: list[dict]) -> None:
        for record in records:
            _append_line(self.batches_path, record)

    def append_loads(self, record: dict | None) -> None:
        """Per-expert loads of one row's first batch: {run_id, case_id, router, batch, loads}."""
        if record is not None:
            _append_line(self.loads_path, record)

    def meta(self) -> dict:
        if not self.meta_path.exists():
            raise MoebenchError(f"{self.path}: not a moebench run (no {META})")
        return json.loads(self.meta_path.read_text(encoding="utf-8"))

    def update_meta(self, **fields) -> None:
        meta = self.meta()
        meta.update(fields)
        write_json_atomic(self.meta_path, meta)

    def rows(self) -> list[dict]:
        return read_jsonl(self.rows_path)

    def batches(self) -> list[dict]:
        return read_jsonl(self.batches_path)

    def loads(self) -> list[dict]:
        return read_jsonl(self.loads_path)

    def finished_keys(self) -> set[tuple[str, str]]:
        """(case_id, router) of rows already on disk: what --resume skips."""
        return {(r["case_id"], r["router"]) for r in self.rows()}


def load_run(path: str | Path) -> RunDir:
    """Open an existing run folder (error if it is not one)."""
    run = RunDir(Path(path))
    run.meta()
    return run


def suite_yaml_copy(document: dict) -> str:
    return yaml.safe_dump(document, sort_keys=False)

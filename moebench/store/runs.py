"""Run storage: results/<suite>/<run-id>/ with rows.jsonl, batches.jsonl, loads.jsonl, meta.json,
suite.yaml and run.lock.

Durability (docs/architecture.md, Decisions):

- A record is one JSON line, written with one ``write`` on an ``O_APPEND`` descriptor and
  fsync'ed before the next; if the write fails or is interrupted the file is cut back to its
  length before it, so a failure of ours (a full disk, Ctrl-C, SIGTERM) never leaves half a
  line. Only a kill -9 or a crash of the machine mid-write can, and :meth:`RunDir.repair`
  (run by ``--resume`` under the run lock, before it appends) mends that tail: a tail that is
  a whole JSON object lacking its newline is terminated, anything else is cut off.
- Readers (all through :mod:`moebench.store.reader`) read regular files only, within size
  limits (a FIFO or /dev/zero in a file's place is refused in one line), and never fail on a
  line: a torn last line, a line that is not JSON (garbage, binary, nested too deep, too long)
  or not an object, and a row without ``case_id``/``router`` are skipped, each file's problems
  logged as ONE warning line naming the file and line numbers (the CLI prints it). A garbage
  line in the middle is not fatal: it holds no row, so ``--resume`` measures that pair again.
  A line that is a torn record followed by a whole one (what earlier versions wrote when they
  appended after a torn tail) yields the whole one.
- Duplicate (case_id, router) rows (two writers before the lock existed, or files joined by
  hand) are de-duplicated by :meth:`RunDir.rows`, the LAST one kept (as `compare` and `export`
  always did), with one warning. Batch and load records are de-duplicated the same way,
  silently: a kill between a router's batches and its row leaves records the resumed run
  writes again.
- meta.json is replaced atomically (temporary file, fsync, rename, fsync of the folder). It
  records the writer (``process``: pid, host, boot id, start time; ``heartbeat_at``), how the
  run ended (``status``, ``stopped_by``: SIGINT, SIGTERM or the error) and, after a resume,
  ``previous_status`` and the ``repairs`` made; :func:`effective_status` reads it.
- An OSError while writing (ENOSPC, EROFS, EACCES, EDQUOT) becomes one MoebenchError naming
  the path; nothing already on disk is touched, and ``--resume`` completes once it is fixed.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moebench.core.errors import MoebenchError
from moebench.core.rows import ROW_KEY
from moebench.store.durable import (  # noqa: F401 (re-exported: the storage API lives here)
    WriteError, append_line, repair_tail, write_error, write_json_atomic,
)
from moebench.store.reader import (  # noqa: F401 (re-exported likewise)
    MAX_JSON_BYTES, last_per_key, latest_rows, loads_json, read_jsonl, read_regular,
)
from moebench.store.lock import RunLock, describe, process_state

ROWS = "rows.jsonl"
BATCHES = "batches.jsonl"
LOADS = "loads.jsonl"
STEPS = "steps.jsonl"  # per-eval records of training runs (moebench/kinds/train/)
META = "meta.json"
SUITE_COPY = "suite.yaml"
KEY = ROW_KEY  # what every record of the three JSONL files must carry


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable, unique: UTC timestamp plus 4 random hex digits."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def effective_status(meta: dict) -> str:
    """The run's status as a reader should say it: meta's, except that a 'running' run whose
    process is gone is 'interrupted', and one on another host (or without a process record)
    stays 'running' only if meta says so and nothing proves otherwise ('unknown' for another
    host)."""
    status = str(meta.get("status") or "unknown")
    if status != "running" or not isinstance(meta.get("process"), dict):
        return status
    state = process_state(meta["process"])
    return {"alive": "running", "gone": "interrupted"}.get(state, "unknown")


@dataclass
class RunDir:
    """One run's folder and the operations on it. ``lock``: the RunLock a writer holds on it
    (set by session.open_run), None for readers."""

    path: Path
    lock: RunLock | None = field(default=None, repr=False, compare=False)

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
        try:
            self.path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise MoebenchError(f"{self.path}: already exists") from None
        except OSError as exc:
            raise write_error(self.path, exc, "cannot create the run folder") from None
        try:
            (self.path / SUITE_COPY).write_text(suite_text, encoding="utf-8")
        except OSError as exc:
            raise write_error(self.path / SUITE_COPY, exc) from None
        write_json_atomic(self.meta_path, meta)

    def append_row(self, row: dict) -> None:
        append_line(self.rows_path, row)

    def append_batches(self, records: list[dict]) -> None:
        for record in records:
            append_line(self.batches_path, record)

    @property
    def steps_path(self) -> Path:
        return self.path / STEPS

    def append_steps(self, records) -> None:
        """Per-evaluation records of a trained router: {run_id, case_id, router, seed, step, ...}."""
        for record in records:
            append_line(self.steps_path, record)

    def steps(self) -> list[dict]:
        return last_per_key(read_jsonl(self.steps_path), ("case_id", "router", "seed", "step"))[0]

    def append_loads(self, record: dict | None) -> None:
        """Per-expert loads of one row's first batch: {run_id, case_id, router, batch, loads}."""
        if record is not None:
            append_line(self.loads_path, record)

    def repair(self) -> list[str]:
        """Mend torn tails of the three JSONL files before appending (hold the run lock)."""
        notes = [repair_tail(p) for p in (self.rows_path, self.batches_path, self.loads_path, self.steps_path)]
        return [n for n in notes if n]

    def meta(self) -> dict:
        text = read_regular(self.meta_path, MAX_JSON_BYTES)  # a FIFO or device: one line, no wait
        if text is None:
            raise MoebenchError(f"{self.path}: not a moebench run (no {META})")
        try:
            meta = loads_json(text.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):  # nested [[[[... included
            raise MoebenchError(f"{self.meta_path}: not valid JSON (truncated or overwritten?)") from None
        if not isinstance(meta, dict):
            raise MoebenchError(f"{self.meta_path}: expected a JSON object, found {type(meta).__name__}")
        return meta

    def update_meta(self, **fields) -> None:
        meta = self.meta()
        meta.update(fields)
        write_json_atomic(self.meta_path, meta)

    def status(self) -> str:
        """meta's status, with a dead writer's 'running' read as 'interrupted' (effective_status)."""
        return effective_status(self.meta())

    def raw_rows(self) -> list[dict]:
        """Every readable row, duplicates included, in file order."""
        return read_jsonl(self.rows_path, required=KEY)

    def rows(self) -> list[dict]:
        """The rows, one per (case_id, router): a duplicate's last row wins (one warning)."""
        return latest_rows(self.raw_rows(), self.rows_path)

    def batches(self) -> list[dict]:
        return last_per_key(read_jsonl(self.batches_path, required=KEY), ("case_id", "router", "batch"))[0]

    def loads(self) -> list[dict]:
        return last_per_key(read_jsonl(self.loads_path, required=KEY), ("case_id", "router", "batch"))[0]

    def finished_keys(self) -> set[tuple[str, str]]:
        """(case_id, router) of rows already on disk: what --resume skips (an error row marked
        ``redo_on_resume``, e.g. a parallel case whose rank died, is run again)."""
        return {(r["case_id"], r["router"]) for r in self.raw_rows() if r.get("redo_on_resume") is not True}

    def holder(self) -> str:
        return describe(self.meta().get("process"))


def load_run(path: str | Path) -> RunDir:
    """Open an existing run folder (error if it is not one)."""
    run = RunDir(Path(path))
    run.meta()
    return run


def suite_yaml_copy(document: dict) -> str:
    return yaml.safe_dump(document, sort_keys=False)

"""A run from start to finish: plan the cases, open (or resume) the run folder, write every row
as it finishes, and record how the run ended. Prints nothing; `progress` wraps the case loop.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from moebench import __version__
from moebench.core import kinds
from moebench.core.case import Case, Suite
from moebench.run.isolation import worker_numba_layer
from moebench.run.machine import capture_environment, load_snapshot, numba_layer_in_use
from moebench.core.errors import MoebenchError, Terminated, sigterm_as_interrupt  # noqa: F401  (both still importable from here)
from moebench.run.reference_kernel import reference_meta
from moebench.core.paths import under
from moebench.store.runs import RunDir, load_run, new_run_id, suite_yaml_copy, utc_now
from moebench.store.lock import RunLock, describe, process_identity
from moebench.run.runner import cuda_available, quick_case, quick_timing, router_declarations

HEARTBEAT_S = 30.0  # meta.json heartbeat_at is refreshed at most this often (between cases)
log = logging.getLogger("moebench.run.session")


@dataclass(frozen=True)
class RunOptions:
    """results_root: where results/<suite>/<run-id>/ goes.  device: None (as the suite says),
    'cpu', 'cuda' or 'all' (cpu plus cuda where present).  quick: smoke-run sizes and timing.
    resume: an existing run folder to continue.  command: the command line, for the record.
    isolate: None (as the suite's ``timing.isolate`` says) or True/False overriding it
    (``moebench run --no-isolate``); meta.json ``overrides`` records an override."""

    results_root: Path = Path("results")
    device: str | None = None
    quick: bool = False
    resume: Path | None = None
    command: str = ""
    isolate: bool | None = None


def run_timing(suite: Suite, options: RunOptions):
    """The TimingSpec the run uses: the suite's (quick: `quick_timing` of it) with the
    options' overrides."""
    timing = quick_timing(suite.timing) if options.quick else suite.timing
    return timing if options.isolate is None else replace(timing, isolate=options.isolate)


def overrides(options: RunOptions) -> dict:
    """{"timing.isolate": value} for each suite field the options override (meta ``overrides``)."""
    return {} if options.isolate is None else {"timing.isolate": options.isolate}


def plan_cases(suite: Suite, device: str | None, quick: bool) -> list[Case]:
    """The suite's cases after the device override and quick mode, without duplicates."""
    cases: list[Case] = []
    for case in suite.cases:
        if device == "cpu":
            variants = [replace(case, device="cpu")]
        elif device == "cuda":
            variants = [replace(case, device="cuda")]
        elif device == "all":
            variants = [replace(case, device="cpu")] + ([replace(case, device="cuda")] if cuda_available() else [])
        else:
            variants = [case]
        cases.extend(quick_case(v) if quick else v for v in variants)
    unique = {c.case_id: c for c in cases}
    return list(unique.values())


def _meta(suite: Suite, options: RunOptions, run_id: str, cases: list[Case]) -> dict:
    devices = sorted({c.device for c in cases})
    kind = kinds.of(suite)
    return {
        "run_id": run_id,
        "suite": suite.name,
        "suite_version": suite.version,
        "suite_path": suite.path,
        "suite_sha256": suite.sha256,
        "description": suite.description,
        "moebench_version": __version__,
        "command": options.command or " ".join(sys.argv),
        "quick": options.quick,
        "device_option": options.device,
        "devices": devices,
        "seeds": sorted({c.seed for c in cases}),
        "cases": len(cases),
        "routers": [r.display for r in suite.routers],
        "router_declarations": router_declarations(suite.routers),  # baseline, case notes (reports)
        "load": {"start": load_snapshot()},  # the report says how busy the machine was
        **(kind.meta(suite, cases) if kind.meta is not None else {}),  # e.g. a train suite's planned_rows
        "timing": vars(run_timing(suite, options)),
        **({"overrides": overrides(options)} if overrides(options) else {}),
        "environment": capture_environment(devices),
        "started_at": utc_now(),
        "ended_at": None,
        "status": "running",
        "process": process_identity(),  # who writes: report and --resume tell a dead run by it
        "heartbeat_at": utc_now(),
    }


def open_run(suite: Suite, options: RunOptions, cases: list[Case]) -> RunDir:
    """A new run folder, or the one to resume (which must come from the same suite), locked for
    this process (``run.lock``; execute releases it). A resumed folder's torn tails are mended
    first. Raises MoebenchError if another process holds the folder."""
    if options.resume is not None:
        run = load_run(options.resume)
        run.lock = RunLock(run.path).acquire(started_at=utc_now())
        try:
            meta = run.meta()
            if meta.get("suite_sha256") != suite.sha256:
                raise MoebenchError(
                    f"{options.resume}: was made from a different version of suite {meta.get('suite')!r}; "
                    "resume needs the same suite file"
                )
            if bool(meta.get("quick")) != options.quick:
                raise MoebenchError(f"{options.resume}: quick={meta.get('quick')} there; pass the same --quick to resume")
            repairs = run.repair()
            for note in repairs:
                log.warning("%s", note)
            previous = str(meta.get("status") or "unknown")
            # we hold the lock, so no other process is writing: a 'running' here is a dead run
            if previous == "running":
                log.warning("%s: its writer (%s) ended without recording how (killed, or the disk was full or "
                            "read-only?); resuming an interrupted run", run.path, describe(meta.get("process")))
            run.update_meta(
                status="running", resumed_at=utc_now(), previous_status="interrupted" if previous == "running" else previous,
                repairs=list(meta.get("repairs") or []) + repairs, process=process_identity(), heartbeat_at=utc_now(),
                stopped_by=None,
                **({"resume_overrides": overrides(options)} if overrides(options) else {}),  # rows from now on
            )
        except BaseException:
            run.lock.release()
            raise
        return run
    run_id = new_run_id()
    run = RunDir(under(options.results_root, suite.name, run_id, what="suite"))  # never outside the root
    run.create(_meta(suite, options, run_id, cases), suite_yaml_copy(suite.document))
    run.lock = RunLock(run.path).acquire(started_at=utc_now())
    return run


def case_rows(suite: Suite, case: Case, timing, base_row: dict, skip: set[str], quick: bool = False) -> Iterable:
    """The RowResults of one case, one per router not in ``skip``: the suite's kind says how
    (`Kind.rows`, moebench/core/kinds.py: plain routing, training, expert parallelism, a
    plugin's). quick: the run is `--quick` (training shortens itself to a smoke run)."""
    kind = kinds.of(suite)
    rows = kind.rows if kind.rows is not None else kinds.get(kinds.ROUTING).rows
    return rows(suite, case, timing, base_row, skip, quick)


def execute(
    suite: Suite,
    options: RunOptions,
    progress: Callable[[Iterable[Case], int], Iterable[Case]] = lambda it, total: it,
    on_open: Callable[[RunDir], None] = lambda run: None,
) -> RunDir:
    """Run every router on every planned case, writing rows as they finish.

    An interrupt (Ctrl-C, or SIGTERM under :func:`sigterm_as_interrupt`) or a failed write (a
    full disk) marks the run `interrupted` (meta ``stopped_by`` says why) and re-raises: every
    finished row is already on disk, and `--resume` continues from there. The run folder is
    locked from open to end.
    """
    cases = plan_cases(suite, options.device, options.quick)
    run = open_run(suite, options, cases)
    status, stopped_by = "interrupted", None
    try:  # noqa: SIM105 (the finally records how the run ended and unlocks)
        on_open(run)
        if "reference" not in run.meta():
            run.update_meta(**reference_meta(cases, suite.timing.threads))
        done = run.finished_keys()
        timing = run_timing(suite, options)
        run_id = run.meta()["run_id"]
        beat = time.monotonic()
        for case in progress(cases, len(cases)):
            skip = {label for cid, label in done if cid == case.case_id}
            for result in case_rows(suite, case, timing, {"run_id": run_id, "suite": suite.name}, skip,
                                    options.quick):
                # the row goes last: it marks the router done for --resume
                run.append_batches(result.batches)
                run.append_loads(result.loads)
                run.append_steps(getattr(result, "steps", ()))  # training runs (moebench/kinds/train/)
                run.append_row(result.row)
            if time.monotonic() - beat > HEARTBEAT_S:
                run.update_meta(heartbeat_at=utc_now())
                beat = time.monotonic()
        status = "complete"
    except BaseException as exc:
        stopped_by = _stopped_by(exc)
        raise
    finally:
        try:
            run.update_meta(status=status, ended_at=utc_now(), heartbeat_at=utc_now(), stopped_by=stopped_by,
                            load={**(run.meta().get("load") or {}), "end": load_snapshot()},
                            numba_threading_layer=_numba_layer_used())
        except MoebenchError as exc:
            if stopped_by is None:  # the run itself went well: this is the error to report
                raise
            log.warning("could not record the end of the run in meta.json: %s", exc)
        finally:
            run.lock.release()
    return run


def _numba_layer_used() -> str | None:
    """The threading layer numba's kernels ran on in this run: in the isolated worker where one
    ran cases, else in this process; None where no numba parallel kernel ran."""
    return worker_numba_layer() or numba_layer_in_use()


def _stopped_by(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    first = (str(exc).splitlines() or [""])[0][:300]
    return f"error: {type(exc).__name__}: {first}"

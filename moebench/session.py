"""A run from start to finish: plan the cases, open (or resume) the run folder, write every row
as it finishes, and record how the run ended. Prints nothing; `progress` wraps the case loop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from moebench import __version__
from moebench.case import Case, Suite
from moebench.environment import capture_environment
from moebench.errors import MoebenchError
from moebench.reference import reference_meta
from moebench.results import RunDir, load_run, new_run_id, suite_yaml_copy, utc_now
from moebench.runner import CaseRunner, cuda_available, quick_case, quick_timing

DEVICE_CHOICES = ("cpu", "cuda", "all")


@dataclass(frozen=True)
class RunOptions:
    """results_root: where results/<suite>/<run-id>/ goes.  device: None (as the suite says),
    'cpu', 'cuda' or 'all' (cpu plus cuda where present).  quick: smoke-run sizes and timing.
    resume: an existing run folder to continue.  command: the command line, for the record."""

    results_root: Path = Path("results")
    device: str | None = None
    quick: bool = False
    resume: Path | None = None
    command: str = ""


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
        "timing": vars(quick_timing(suite.timing) if options.quick else suite.timing),
        "environment": capture_environment(devices),
        "started_at": utc_now(),
        "ended_at": None,
        "status": "running",
    }


def open_run(suite: Suite, options: RunOptions, cases: list[Case]) -> RunDir:
    """A new run folder, or the one to resume (which must come from the same suite)."""
    if options.resume is not None:
        run = load_run(options.resume)
        meta = run.meta()
        if meta.get("suite_sha256") != suite.sha256:
            raise MoebenchError(
                f"{options.resume}: was made from a different version of suite {meta.get('suite')!r}; "
                "resume needs the same suite file"
            )
        if bool(meta.get("quick")) != options.quick:
            raise MoebenchError(f"{options.resume}: quick={meta.get('quick')} there; pass the same --quick to resume")
        run.update_meta(status="running", resumed_at=utc_now())
        return run
    run_id = new_run_id()
    run = RunDir(Path(options.results_root) / suite.name / run_id)
    run.create(_meta(suite, options, run_id, cases), suite_yaml_copy(suite.document))
    return run


def case_rows(suite: Suite, case: Case, timing, base_row: dict, skip: set[str]) -> Iterable:
    """The RowResults of one case, one per router not in ``skip``: the one place where a new
    kind of case (isolated, trained, parallel) plugs into the run loop."""
    return CaseRunner(case, timing, base_row).rows(list(suite.routers), skip)


def execute(
    suite: Suite,
    options: RunOptions,
    progress: Callable[[Iterable[Case], int], Iterable[Case]] = lambda it, total: it,
    on_open: Callable[[RunDir], None] = lambda run: None,
) -> RunDir:
    """Run every router on every planned case, writing rows as they finish.

    An interrupt (Ctrl-C) marks the run `interrupted` and re-raises: every finished row is
    already on disk, and `--resume` continues from there.
    """
    cases = plan_cases(suite, options.device, options.quick)
    run = open_run(suite, options, cases)
    on_open(run)
    if "reference" not in run.meta():
        run.update_meta(**reference_meta(cases, suite.timing.threads))
    done = run.finished_keys()
    timing = quick_timing(suite.timing) if options.quick else suite.timing
    run_id = run.meta()["run_id"]
    status = "interrupted"
    try:  # noqa: SIM105 (the finally records how the run ended)
        for case in progress(cases, len(cases)):
            skip = {label for cid, label in done if cid == case.case_id}
            for result in case_rows(suite, case, timing, {"run_id": run_id, "suite": suite.name}, skip):
                # the row goes last: it marks the router done for --resume
                run.append_batches(result.batches)
                run.append_loads(result.loads)
                run.append_row(result.row)
        status = "complete"
    finally:
        run.update_meta(status=status, ended_at=utc_now())
    return run

"""`moebench ab`: open both sides, start their workers, time paired blocks, judge, write.

The steps, each in its own module: sides.py (worktrees), protocol.py and side_worker.py (the
workers), driver.py (the rounds and looks), stats.py (intervals and verdicts), outcome.py
(table, files, exit code). Worktrees and workers are removed however the command ends
(error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from moebench.compare.ab import DEFAULT_BUDGET_S
from moebench.compare.ab.driver import BLOCK_STATS, MODES, ROTATE, Driver, Settings, make_cells, make_groups
from moebench.compare.ab.outcome import Outcome, format_text, side_rows, write_ab_json, write_side
from moebench.compare.ab.protocol import LOAD_TIMEOUT_S, SideWorker, worker_env
from moebench.compare.ab.sides import assert_distinct, close_side, open_side, repository, side_paths
from moebench.compare.verdicts import compare_runs
from moebench.core.errors import MoebenchError, Terminated, sigterm_as_interrupt
from moebench.core.paths import output_problem, under, write_output
from moebench.core.rows import PHASES
from moebench.store.runs import new_run_id, utc_now

STOPPED = {"settled": "every verdict settled", "budget": "budget spent", "regression": "stopped at the first slower"}
WRITE_MARGIN_S = 5.0  # kept from the budget for the comparison and the files


@dataclass(frozen=True)
class ABOptions:
    """What `moebench ab` takes (the CLI's flags). base/head: git revisions (head None: the
    working tree); base_python/head_python: an interpreter for that side (without a revision:
    its own moebench and routers). budget_s: wall time of the whole command."""

    suite: str
    base: str | None = None
    head: str | None = None
    base_python: str | None = None
    head_python: str | None = None
    budget_s: float = DEFAULT_BUDGET_S
    min_effect: float = 0.02
    alpha: float = 0.05
    mode: str = "interleaved"
    block_ms: float = 5.0
    warmup: int = 1
    quick: bool = False
    device: str | None = None
    threads: int | None = None
    seed: int | None = None
    results: str = "results"
    details: bool = False
    block_stat: str = "median"
    fail_fast: bool = False
    phases: str | None = None  # comma-separated subset of PHASES (None: all)
    rotate: str = "auto"
    relayout: bool = True
    json: str | None = None  # also write ab.json's content here
    command: str = ""


def phases_of(o: ABOptions) -> tuple[str, ...]:
    """The phases to time: ``--phases`` checked against PHASES (in PHASES' order)."""
    if o.phases is None:
        return PHASES
    asked = [p.strip() for p in o.phases.split(",") if p.strip()]
    wrong = [p for p in asked if p not in PHASES]
    if wrong or not asked:
        raise MoebenchError(f"ab: --phases {o.phases!r}: expected a comma-separated list of {', '.join(PHASES)}")
    return tuple(p for p in PHASES if p in asked)


def check_options(o: ABOptions) -> None:
    phases_of(o)
    if o.base is None and o.base_python is None:
        raise MoebenchError("ab: --base REF (a git revision) or --base-python PY is required")
    if o.block_stat not in BLOCK_STATS:
        raise MoebenchError(f"ab: --block-stat {o.block_stat!r}: expected one of {', '.join(BLOCK_STATS)}")
    if o.rotate not in ROTATE:
        raise MoebenchError(f"ab: --rotate {o.rotate!r}: expected one of {', '.join(ROTATE)}")
    if o.mode not in MODES:
        raise MoebenchError(f"ab: --mode {o.mode!r}: expected one of {', '.join(MODES)}")
    for flag, value, low, high in (("--min-effect", o.min_effect, 0.0, 1.0), ("--alpha", o.alpha, 1e-9, 0.5),
                                   ("--budget-s", o.budget_s, 1.0, 1e6), ("--block-ms", o.block_ms, 0.01, 1e5)):
        if not (low <= value <= high):
            raise MoebenchError(f"ab: {flag} {value}: expected a number in [{low:g}, {high:g}]")
    problem = output_problem(o.json) if o.json else None
    if problem:
        raise MoebenchError(f"ab: --json {o.json}: {problem}")
    if not Path(o.suite).is_file():
        raise MoebenchError(f"ab: {o.suite}: no such suite file")


def run_ab(o: ABOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the A/B gate; prints the summary to ``out``; returns the exit code (0 pass,
    1 regression, 2 error; an error is raised as MoebenchError for the CLI to print)."""
    check_options(o)
    try:
        return _run(o, out, err)
    except KeyboardInterrupt as exc:  # workers and worktrees are gone already (_run's handler)
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"moebench: ab {what}; its worktrees and workers are removed", file=err)
        return code


def _run(o: ABOptions, out: TextIO, err: TextIO) -> int:
    started, wall0 = utc_now(), time.monotonic()
    deadline = wall0 + o.budget_s - WRITE_MARGIN_S
    suite_path = Path(o.suite).resolve()
    suite_text = suite_path.read_text(encoding="utf-8")
    repo = None
    if o.base is not None or o.head is not None or o.head_python is None:
        repo = repository(Path.cwd())
    sides, workers = [], []
    with sigterm_as_interrupt():
        try:
            sides.append(open_side("A", repo, o.base, o.base_python, "base"))
            sides.append(open_side("B", repo, o.head, o.head_python, "head"))
            assert_distinct(*sides)
            duet = o.mode == "duet"
            cores = None
            extra = {}
            if duet:
                avail = sorted(os.sched_getaffinity(0))
                if len(avail) < 2:
                    raise MoebenchError("ab: --mode duet needs two cores this process may use")
                cores = (avail[0], avail[1])
                extra = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            env = worker_env(extra)
            for s in sides:
                workers.append(SideWorker(s.label, s.python, side_paths(s), s.tree, env))
            ab_id = new_run_id()
            run_ids = [f"{ab_id}-{s.label}" for s in sides]
            print(f"ab: A = {sides[0].describe()}, moebench from {workers[0].info['moebench']}", file=err)
            print(f"ab: B = {sides[1].describe()}, moebench from {workers[1].info['moebench']}", file=err)
            for w, run_id in zip(workers, run_ids):  # both load at once: routing and preparing in parallel
                w.send({"op": "load", "suite": str(suite_path), "quick": o.quick, "device": o.device,
                        "threads": 1 if duet else o.threads, "run_id": run_id})
            loaded = [w.receive(LOAD_TIMEOUT_S, "load") for w in workers]
            seed = o.seed if o.seed is not None else secrets.randbelow(2**31)  # recorded: a run can be replayed
            rng = random.Random(seed)
            phases = phases_of(o)
            cells = [c for c in make_cells(loaded[0]["cells"], loaded[1]["cells"], o.block_ms, rng) if c.phase in phases]
            groups = make_groups(cells)
            settings = Settings(o.mode, o.alpha, o.min_effect, o.block_ms, o.warmup, seed=seed,
                                block_stat=o.block_stat, fail_fast=o.fail_fast, rotate=o.rotate,
                                relayout=o.relayout)
            driver = Driver((workers[0], workers[1]), groups, settings, cores,
                            progress=lambda text: print(text, file=err))
            print(f"ab: {len(cells)} cells ({len(groups)} router-phases) timed {o.mode}, "
                  f"{max(0.0, deadline - time.monotonic()):.0f} s left for pairs", file=err)
            driver.run(deadline)
            print(f"ab: blocks of {driver.block_ms:.2g} ms (+{driver.overhead_ms or 0:.2g} ms a block to "
                  "reach the worker)" + ("; one case per router-phase and round (rotating)"
                                         if any(g.rotating for g in groups) else ""), file=err)
        except BaseException:
            for w in workers:
                w.kill()
            for s in sides:
                close_side(s, repo)
            raise
        for w in workers:
            w.stop()
        for s in sides:
            close_side(s, repo)

    metas = [{**ld["meta"], "run_id": rid, "ab": {"id": ab_id, **s.record()}} for ld, rid, s in zip(loaded, run_ids, sides)]
    rows = [side_rows(ld["rows"], cells, i, ld["cells"]) for i, ld in enumerate(loaded)]
    deterministic = compare_runs((metas[0], rows[0]), (metas[1], rows[1]), metrics="deterministic")
    notes = []
    missing = [c for c in loaded[0]["cells"] if c.get("status") == "ok" and c["phase"] in phases]
    if len(missing) != len(cells):
        notes.append(f"{len(missing) - len(cells)} cells timed on A only (skipped or missing on B)")
    if driver.stopped_by == "budget" and driver.active():
        notes.append(f"the budget ({o.budget_s:g} s) ended the pairs; --budget-s longer settles more")
    outcome = Outcome(groups, cells, deterministic, o.alpha, o.min_effect, driver.rounds, notes)
    folder = under(Path(o.results), "ab", metas[1].get("suite") or "suite", ab_id, what="suite")
    for meta, side_rows_, s in zip(metas, rows, sides):
        meta.update(command=o.command, quick=o.quick, device_option=o.device, started_at=started,
                    ab_mode=o.mode)
        write_side(folder / s.label, meta, side_rows_, suite_text)
    wall = time.monotonic() - wall0
    record = {"id": ab_id, "suite": metas[1].get("suite"), "suite_path": str(suite_path), "mode": o.mode,
              "sides": [s.record() for s in sides], "runs": {s.label: str(folder / s.label) for s in sides},
              "started_at": started, "ended_at": utc_now(), "wall_s": wall, "budget_s": o.budget_s,
              "stopped_by": driver.stopped_by, "looks": driver.looks, "block_ms": driver.block_ms,
              "block_ms_asked": o.block_ms, "block_overhead_ms": driver.overhead_ms, "warmup": o.warmup,
              "seed": seed, "phases": list(phases), "rotated": any(g.rotating for g in groups),
              "relayout": o.relayout,
              "command": o.command}
    write_ab_json(folder / "ab.json", outcome, record)
    if o.json:
        write_output(o.json, (folder / "ab.json").read_text(encoding="utf-8"), "--json")
    header = [f"moebench ab {metas[1].get('suite')}: A = {sides[0].describe()}, B = {sides[1].describe()}; "
              f"{len(cells)} cells, {driver.rounds} pairs {o.mode}"
              f"{' (rotating: one case per router-phase a round)' if any(g.rotating for g in groups) else ''}, "
              f"{wall:.0f} s "
              f"({STOPPED[driver.stopped_by]})"]
    out.write(format_text(outcome, header, o.details))
    out.write(f"ab: {folder / 'ab.json'} (runs {folder / 'A'} and {folder / 'B'})\n")
    return outcome.exit_code

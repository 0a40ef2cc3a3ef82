"""The `moebench` command: thin — parse, call, print. Exit codes: 0 ok, 2 bad input (and a
failed write: full disk, read-only folder), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path

from moebench import __version__
from moebench.core import kinds
from moebench.core.errors import MoebenchError
from moebench.core.paths import output_problem, write_output


def _cmd_run(args) -> int:
    from moebench.suite.load import load_suite

    # a suite refused for what the file is (binary, huge, not YAML) or for a field (a wrong type,
    # a number out of range, an unknown name) is refused before torch loads (#23)
    suite = load_suite(args.suite)
    from tqdm import tqdm

    from moebench.store.runs import WriteError
    from moebench.run.session import RunOptions, Terminated, execute, sigterm_as_interrupt

    shard = None
    if args.shard:  # one job of several (Slurm array, CI matrix): moebench/run/shards.py
        from moebench.run.shards import parse_shard, shard_suite

        shard = parse_shard(args.shard)
        suite = shard_suite(suite, *shard)
    if args.resume:  # a run is resumed only as the shard it was started as (#23)
        from moebench.run.shards import check_resume_shard

        check_resume_shard(Path(args.resume), shard)
    launch = kinds.of(suite).launch  # a kind that starts processes of its own (moebench/core/kinds.py)
    if launch is not None:  # under torchrun, ranks other than 0 only follow rank 0
        code = launch.follow(suite)
        if code is not None:
            return code
    options = RunOptions(
        results_root=Path(args.results),
        device=args.device,
        quick=args.quick,
        resume=Path(args.resume) if args.resume else None,
        command="moebench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        isolate=False if args.no_isolate else None,
    )
    if launch is None and not shard:  # torchrun: the ranks split the cases (one GPU each)
        from moebench.run.shards import torchrun_sweep, under_torchrun

        if under_torchrun():
            return torchrun_sweep(suite, options, args.no_report, Path(args.reports))
    opened = {}

    def on_open(run):
        opened.setdefault("run", run)
        if shard:
            run.update_meta(shard=f"{shard[0]}/{shard[1]}")

    def progress(cases, total):
        return tqdm(cases, total=total, desc=suite.name, unit="case", file=sys.stderr)

    try:
        with sigterm_as_interrupt():
            run = execute(suite, options, progress=progress, on_open=on_open)
    except KeyboardInterrupt as exc:
        run = opened.get("run")
        where = f" in {run.path}; continue with --resume {run.path}" if run else ""
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"moebench: {what}; every finished row is on disk{where}", file=sys.stderr)
        return code
    except WriteError as exc:
        run = opened.get("run")
        where = f"; every finished row is on disk: --resume {run.path} once that is fixed" if run else ""
        print(f"moebench: error: {exc}{where}", file=sys.stderr)
        return 2
    finally:
        if launch is not None:
            launch.release(suite)
    rows = run.rows()
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"results: {run.path} ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors)")
    if not args.no_report:
        from moebench.report.build import write_report

        print(f"report: {write_report([run.path], Path(args.reports))}")
    return 0


def _cmd_merge(args) -> int:
    from moebench.run.shards import merge_runs

    run = merge_runs([Path(p) for p in args.runs], Path(args.results), allow_mixed=args.allow_mixed)
    print(f"results: {run.path} ({len(run.rows())} rows from {len(args.runs)} runs)")
    if not args.no_report:
        from moebench.report.build import write_report

        print(f"report: {write_report([run.path], Path(args.reports))}")
    return 0


def _cmd_report(args) -> int:
    from moebench.report.build import write_report

    print(f"report: {write_report([Path(p) for p in args.runs], Path(args.reports))}")
    return 0


def _cmd_validate(args) -> int:
    from moebench.suite.files import read_suite_file

    failed = 0
    for path in args.suites:
        try:
            # read (size, file kind, YAML limits) before importing the validator and torch, so
            # a file refused for what it is is refused at once
            document, origins = read_suite_file(Path(path), str(path))
            from moebench.suite.load import validate_document

            suite = validate_document(document, str(path), origins)
        except MoebenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok: {path}: {len(suite.cases)} cases x {len(suite.routers)} routers")
    return 2 if failed else 0


def _cmd_list(args) -> int:
    from moebench.core.drop_policies import DROP_POLICIES
    from moebench.core.registry import options_of
    from moebench.routers.registry import ROUTERS
    from moebench.core.workloads import WORKLOADS

    def options(cls) -> str:
        return ", ".join(f"{o.name}={o.default!r}" for o in options_of(cls).values())

    print("routers:")
    for name, cls in ROUTERS.classes().items():
        print(f"  {name:<16} {cls.paper}  [{options(cls)}]")
    print("workloads:")
    for name, cls in WORKLOADS.classes().items():
        print(f"  {name:<16} {cls.description}  [{options(cls)}]")
    print("drop policies:")
    for name, fn in DROP_POLICIES.items():
        print(f"  {name:<16} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _cmd_schema(args) -> int:
    from moebench.suite.schema import suite_json_schema

    text = json.dumps(suite_json_schema(), indent=2) + "\n"
    if args.out:
        write_output(args.out, text, "--out")
        print(f"schema: {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_compare(args) -> int:
    from moebench.compare.verdicts import NoiseRule, compare_runs, format_text, parse_threshold

    _check_output(args.json, "--json")  # before the comparison, not after it
    for flag, value, low, high in (("--min-diff-ms", args.min_diff_ms, 0.0, math.inf),
                                   ("--consistency", args.consistency, 0.0, 1.0)):
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise MoebenchError(f"{flag} {value}: expected a number in [{low:g}, {high:g}]")
    noise = NoiseRule(
        threshold=parse_threshold(args.threshold.rstrip("%") + "%", "--threshold")[0]
        if args.threshold else NoiseRule.threshold,
        min_diff_ms=NoiseRule.min_diff_ms if args.min_diff_ms is None else args.min_diff_ms,
        consistency=NoiseRule.consistency if args.consistency is None else args.consistency,
    )
    mode = "absolute" if args.absolute else "relative" if args.relative else "auto"
    result = compare_runs(args.a, args.b, fail_on=args.fail_on, metrics=args.metrics, mode=mode, noise=noise)
    sys.stdout.write(format_text(result, details=args.details))
    if args.json:
        write_output(args.json, json.dumps(result.to_dict(), indent=2, default=str) + "\n", "--json")
        print(f"comparison: {args.json}")
    return result.exit_code


def _cmd_export(args) -> int:
    from moebench.compare.export import export_run, export_runs_asv

    if args.format == "asv":  # a results folder for `asv publish`, from one or more runs
        if not args.out:
            raise MoebenchError("--format asv: --out DIR is required (asv's results_dir)")
        count = export_runs_asv(args.run, args.out, args.machine)
        print(f"asv: {args.out} ({count} results files; then: asv publish)")
        return 0
    if len(args.run) != 1:
        raise MoebenchError(f"--format {args.format}: exports one run, got {len(args.run)}")
    _check_output(args.out, "--out", make_parents=True)
    text, count = export_run(args.run[0], args.format, args.out, with_timings=args.with_timings)
    if args.out:
        print(f"{args.format}: {args.out} ({count} {'rows' if args.format == 'baseline' else 'benchmarks'})")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_ab(args) -> int:
    from moebench.compare.ab.command import ABOptions, run_ab  # lazy: the A/B gate (docs/ci.md)

    fields = {k: v for k, v in vars(args).items() if k in ABOptions.__dataclass_fields__ and k != "command" and v is not None}
    return run_ab(ABOptions(**fields, command="moebench " + " ".join(shlex.quote(a) for a in sys.argv[1:])))


def _check_output(path: str | None, flag: str, make_parents: bool = False) -> None:
    problem = output_problem(path, make_parents) if path else None
    if problem:
        raise MoebenchError(f"{flag} {path}: {problem}")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the usage block and the error."""

    def error(self, message: str):
        message = " ".join(message.split())
        if len(message) > 300:
            message = message[:297] + "..."
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moebench", description="Benchmark Mixture-of-Experts routers.")
    parser.add_argument("--version", action="version", version=f"moebench {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an unexpected error (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite: results/<suite>/<run-id>/ and a report")
    run.add_argument("suite", help="suite YAML file")
    run.add_argument("--results", default="results", help="results root (default: results)")
    run.add_argument("--reports", default="reports", help="reports root (default: reports)")
    run.add_argument("--device", choices=("cpu", "cuda", "all"), help="override the suite's devices")
    run.add_argument("--quick", action="store_true", help="smoke run: small sizes, few timing rounds")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run without redoing rows")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    run.add_argument("--no-isolate", action="store_true",
                     help="run the routers in this process, overriding the suite's timing.isolate (no crash/hang isolation)")
    run.add_argument("--shard", metavar="I/N", help="run only shard I of N (0 <= I < N) of the cases; join with merge")
    run.set_defaults(fn=_cmd_run)

    merge = sub.add_parser("merge", help="join the run folders of a suite's shards into one run")
    merge.add_argument("runs", nargs="+", metavar="RUN_DIR")
    merge.add_argument("--results", default="results", help="results root (default: results)")
    merge.add_argument("--reports", default="reports", help="reports root (default: reports)")
    merge.add_argument("--no-report", action="store_true", help="skip the report of the merged run")
    merge.add_argument("--allow-mixed", action="store_true",
                       help="merge shards made by different moebench versions or git commits (warns)")
    merge.set_defaults(fn=_cmd_merge)

    report = sub.add_parser("report", help="write the report of one or more runs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--reports", default="reports", help="reports root (default: reports)")
    report.set_defaults(fn=_cmd_report)

    validate = sub.add_parser("validate", help="check suites without running them")
    validate.add_argument("suites", nargs="+", metavar="SUITE")
    validate.set_defaults(fn=_cmd_validate)

    lst = sub.add_parser("list", help="list routers, workloads and drop policies")
    lst.set_defaults(fn=_cmd_list)

    cmp = sub.add_parser("compare", help="compare a candidate run B against a reference A (exit 1 on regression)")
    cmp.add_argument("a", metavar="A", help="reference: run folder, results/<suite> (its latest run) or baseline file")
    cmp.add_argument("b", metavar="B", help="candidate: run folder, results/<suite> (its latest run) or baseline file")
    cmp.add_argument("--fail-on", action="append", default=[], metavar="METRIC:THRESHOLD",
                     help="gate on METRIC worse by more than THRESHOLD (10%%: relative, 0.5: absolute); repeatable")
    cmp.add_argument("--metrics", choices=("deterministic", "time", "all"), default="all",
                     help="which metrics to compare (default: all)")
    scale = cmp.add_mutually_exclusive_group()
    scale.add_argument("--absolute", action="store_true", help="compare raw times even across machines")
    scale.add_argument("--relative", action="store_true", help="compare times relative to the reference kernel")
    cmp.add_argument("--threshold", metavar="PCT", help="noise rule: percent change a median must exceed (default 10)")
    cmp.add_argument("--min-diff-ms", type=float, metavar="MS",
                     help="noise rule: absolute change a median must exceed (default 0.01)")
    cmp.add_argument("--consistency", type=float, metavar="SHARE",
                     help="noise rule: share of a router's cases that must agree (default 0.667; 0: judge each row alone)")
    cmp.add_argument("--details", action="store_true", help="after the summary, one line per changed case and metric")
    cmp.add_argument("--json", metavar="FILE", help="write the full per-row, per-metric comparison")
    cmp.set_defaults(fn=_cmd_compare)

    export = sub.add_parser("export", help="export a run as a baseline, pytest-benchmark JSON or asv results")
    export.add_argument("run", metavar="RUN_DIR", nargs="+", help="the run (asv: one or more runs)")
    export.add_argument("--format", choices=("baseline", "pytest-benchmark", "asv"), default="baseline")
    export.add_argument("--out", metavar="FILE", help="write here (default: stdout; asv: the results folder)")
    export.add_argument("--with-timings", action="store_true",
                        help="baseline: keep times, run ids and machine details (default: only what the code decides)")
    export.add_argument("--machine", metavar="NAME", help="asv: the machine name (default: the run's hostname)")
    export.set_defaults(fn=_cmd_export)

    from moebench.compare.ab.cli import add_parser as add_ab_parser  # argparse only

    add_ab_parser(sub, _cmd_ab)

    schema = sub.add_parser("schema", help="print the JSON Schema of suite files")
    schema.add_argument("--out", help="write it to this file")
    schema.set_defaults(fn=_cmd_schema)

    for kind in kinds.kinds().values():  # the kinds' own subcommands (`trace`)
        if kind.commands is not None:
            kind.commands(sub)
    return parser


class _Notices(logging.Handler):
    """The library's warnings (torn lines, duplicate rows, repairs): one line each on stderr,
    each once per command."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        if message not in self.seen:
            self.seen.add(message)
            print(f"moebench: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # before anything imports torch or numba: numba on an OpenMP pool and a short OpenMP spin, so
    # torch's and numba's pools do not take each other's cores (moebench/run/threads.py); the
    # user's own thread variables win, and meta.json records which applied
    from moebench.run.threads import settle, thread_count_problem

    settle()
    if thread_count_problem():  # before numba or OpenMP start that many threads (#23)
        print(f"moebench: error: {thread_count_problem()}", file=sys.stderr)
        return 2
    try:
        parser = build_parser()
    except MoebenchError as exc:  # a kind plugin that fails to load: one line, not a traceback
        print(f"moebench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    notices, logger = _Notices(), logging.getLogger("moebench")
    logger.addHandler(notices)
    try:
        return args.fn(args)
    except MoebenchError as exc:
        print(f"moebench: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, always
        return 2
    except BrokenPipeError:  # the reader went away (`moebench list | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except FileNotFoundError as exc:
        print(f"moebench: error: {exc.filename}: no such file", file=sys.stderr)
        return 2
    except OSError as exc:  # the backstop for a read or write no command turned into a message
        where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"moebench: error: {where + ': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # last backstop: hostile input we did not foresee is one line, not a traceback
        if args.traceback:
            raise
        text = " ".join(str(exc).split())[:300]
        print(f"moebench: error: unexpected {type(exc).__name__}: {text} "
              "(a bug or unreadable input; --traceback shows where)", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(notices)

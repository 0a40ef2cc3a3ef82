"""The `moebench` command: thin — parse, call, print. Exit codes: 0 ok, 2 bad input, 130 interrupted."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from moebench import __version__
from moebench.errors import MoebenchError


def _cmd_run(args) -> int:
    from tqdm import tqdm

    from moebench.session import RunOptions, execute
    from moebench.suite import load_suite

    suite = load_suite(args.suite)
    options = RunOptions(
        results_root=Path(args.results),
        device=args.device,
        quick=args.quick,
        resume=Path(args.resume) if args.resume else None,
        command="moebench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    opened = {}

    def progress(cases, total):
        return tqdm(cases, total=total, desc=suite.name, unit="case", file=sys.stderr)

    try:
        run = execute(suite, options, progress=progress, on_open=lambda r: opened.setdefault("run", r))
    except KeyboardInterrupt:
        run = opened.get("run")
        where = f" in {run.path}; continue with --resume {run.path}" if run else ""
        print(f"moebench: interrupted; every finished row is on disk{where}", file=sys.stderr)
        return 130
    rows = run.rows()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"results: {run.path} ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors)")
    if not args.no_report:
        from moebench.report import write_report

        print(f"report: {write_report([run.path], Path(args.reports))}")
    return 0


def _cmd_report(args) -> int:
    from moebench.report import write_report

    print(f"report: {write_report([Path(p) for p in args.runs], Path(args.reports))}")
    return 0


def _cmd_validate(args) -> int:
    from moebench.suite import load_suite

    failed = 0
    for path in args.suites:
        try:
            suite = load_suite(path)
        except MoebenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok: {path}: {len(suite.cases)} cases x {len(suite.routers)} routers")
    return 2 if failed else 0


def _cmd_list(args) -> int:
    from moebench.drop_policies import DROP_POLICIES
    from moebench.registry import options_of
    from moebench.routers.registry import ROUTERS
    from moebench.workloads import WORKLOADS

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
    from moebench.schema import suite_json_schema

    text = json.dumps(suite_json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"schema: {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_compare(args) -> int:
    from moebench.compare import NoiseRule, compare_runs, format_text, parse_threshold

    noise = NoiseRule(
        threshold=parse_threshold(args.threshold.rstrip("%") + "%", "--threshold")[0]
        if args.threshold else NoiseRule.threshold,
        min_diff_ms=NoiseRule.min_diff_ms if args.min_diff_ms is None else args.min_diff_ms,
        consistency=NoiseRule.consistency if args.consistency is None else args.consistency,
    )
    mode = "absolute" if args.absolute else "relative" if args.relative else "auto"
    result = compare_runs(args.a, args.b, fail_on=args.fail_on, metrics=args.metrics, mode=mode, noise=noise)
    sys.stdout.write(format_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        print(f"comparison: {args.json}")
    return result.exit_code


def _cmd_export(args) -> int:
    from moebench.export import export_run

    text, count = export_run(args.run, args.format, args.out)
    if args.out:
        print(f"{args.format}: {args.out} ({count} {'rows' if args.format == 'baseline' else 'benchmarks'})")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moebench", description="Benchmark Mixture-of-Experts routers.")
    parser.add_argument("--version", action="version", version=f"moebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite: results/<suite>/<run-id>/ and a report")
    run.add_argument("suite", help="suite YAML file")
    run.add_argument("--results", default="results", help="results root (default: results)")
    run.add_argument("--reports", default="reports", help="reports root (default: reports)")
    run.add_argument("--device", choices=("cpu", "cuda", "all"), help="override the suite's devices")
    run.add_argument("--quick", action="store_true", help="smoke run: small sizes, few timing rounds")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run without redoing rows")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    run.set_defaults(fn=_cmd_run)

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
    cmp.add_argument("--json", metavar="FILE", help="write the full per-row, per-metric comparison")
    cmp.set_defaults(fn=_cmd_compare)

    export = sub.add_parser("export", help="export a run as a baseline or pytest-benchmark JSON")
    export.add_argument("run", metavar="RUN_DIR")
    export.add_argument("--format", choices=("baseline", "pytest-benchmark"), default="baseline")
    export.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    export.set_defaults(fn=_cmd_export)

    schema = sub.add_parser("schema", help="print the JSON Schema of suite files")
    schema.add_argument("--out", help="write it to this file")
    schema.set_defaults(fn=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MoebenchError as exc:
        print(f"moebench: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"moebench: error: {exc.filename}: no such file", file=sys.stderr)
        return 2

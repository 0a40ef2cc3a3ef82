"""What `moebench compare` prints: a summary per router and metric first, details behind a flag.

The summary has one line per (router, metric) (phase medians: per router, phase and device):
how many cases, the median over cases of B/A (for a deterministic metric: over the cases where
it moved), the interval of that ratio where the runs have
one (the median over cases of each end of a case's interval, from the two 95% CIs of the
medians: the interval of a typical case), the verdict and its reason. Lines are sorted by
severity (REGRESSION, worse, changed, better, unchanged, not judged, info), then by the metrics
people gate on (imbalance, token_drop_rate, rank_imbalance, drop_rate, then the phase medians,
then the rest), then by how far the ratio is from 1. Deterministic metrics unchanged on every
case collapse into one line. ``details=True`` adds one line per changed cell, as before.

Works on a `moebench.compare.verdicts.Comparison` by its attributes (no import of it: the
verdicts module imports this one).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

NOT_ENOUGH_ROUNDS = "not enough rounds"
SEVERITY = ("REGRESSION", "worse", "changed", "better", "unchanged", "not judged", "info")
GATED_FIRST = ("imbalance", "token_drop_rate", "rank_imbalance", "drop_rate")
WORDS = {"worse": "worse", "better": "better", "changed": "moved"}


@dataclass
class Group:
    """One summary line. ``ratio``: median over cases of B/A (None where undefined, e.g. A is 0);
    ``interval``: of the ratio, where the runs carry CIs; ``verdict``: one of SEVERITY;
    ``gated``: whether the metric can fail the comparison; ``regression``: whether it does."""

    router: str
    metric: str
    device: str | None
    cases: int
    ratio: float | None
    interval: tuple[float, float] | None
    verdict: str
    reason: str
    regression: bool = False
    gated: bool = False


def _rank(g: Group) -> tuple:
    if g.metric in GATED_FIRST:
        kind = GATED_FIRST.index(g.metric)
    elif g.metric.endswith(".median_ms"):
        kind = len(GATED_FIRST)
    else:
        kind = len(GATED_FIRST) + 1
    size = abs(math.log(g.ratio)) if g.ratio and g.ratio > 0 else 0.0
    return SEVERITY.index(g.verdict), kind, -size, g.router, g.metric


def _pct(change: float) -> str:
    """+6.7%; small changes keep their digits (+0.0012%) rather than print as +0.0%."""
    return f"{change:+.1%}" if abs(change) >= 1e-3 else f"{change * 100:+.2g}%"


def _largest(vs: list, verdict: str) -> str:
    changes = [v.change for v in vs if v.verdict == verdict and v.change is not None]
    return f" (largest {_pct(max(changes, key=abs))})" if changes else ""


def _cases(k: int, n: int) -> str:
    return f"{k} of {n} case{'s' * (n != 1)}"


def _metric_group(router: str, name: str, vs: list) -> Group:
    """A deterministic or measured (info) metric's line from its cells."""
    # B/A over the cases that moved (most cases of a changed metric often stay put: the median
    # over all of them would read 1.000 beside "worse on 4 of 12 cases")
    moved = [v for v in vs if v.verdict in ("worse", "better", "changed")]
    ratios = [v.ratio for v in (moved or vs) if v.ratio is not None]
    same_zero = 0 if moved else sum(v.a == 0 and v.b == 0 for v in vs)
    ratio = statistics.median(ratios + [1.0] * same_zero) if ratios or same_zero else None
    regression, gated, n = any(v.regression for v in vs), any(v.gated for v in vs), len(vs)
    count = {k: sum(v.verdict == k for v in vs) for k in ("worse", "better", "changed", "info")}
    if count["info"] == n:
        return Group(router, name, None, n, ratio, None, "info", "measured without an interval: not judged",
                     False, False)
    verdict = next((k for k in ("worse", "changed", "better") if count[k]), "unchanged")
    if verdict == "unchanged":
        reason = f"same on {n} case{'s' * (n != 1)}"
    else:
        reason = f"{WORDS[verdict]} on {_cases(count[verdict], n)}{_largest(vs, verdict)}"
        if verdict == "worse" and count["better"]:
            reason += f", better on {count['better']}"
        if verdict == "changed":
            missing = sum(v.detail == "missing on one side" for v in vs)
            reason += "; missing on one side" if missing else "; no direction: not gated"
        elif verdict == "worse" and not regression:
            reason += "; not gated"
    return Group(router, name, None, n, ratio, None, "REGRESSION" if regression else verdict, reason,
                 regression, gated)


def summarize(c: Any) -> list[Group]:
    """The summary lines of a Comparison, sorted (see the module docstring)."""
    cells: dict[tuple[str, str], list] = defaultdict(list)
    for r in c.rows:
        for v in r.verdicts:
            if v.metric.endswith(".median_ms"):
                continue  # judged per router: c.time_groups
            if "." in v.metric and v.metric.split(".")[0] in ("route", "dispatch", "combine"):
                continue  # the other phase columns describe the median's spread
            cells[(r.router, v.metric)].append(v)
    groups = [_metric_group(router, name, vs) for (router, name), vs in cells.items()]
    groups += list(c.time_groups)
    judged = {(g.router, g.metric, g.device) for g in c.time_groups}
    unjudged: dict[tuple, list] = defaultdict(list)
    for r in c.rows:
        for v in r.verdicts:
            if v.verdict == NOT_ENOUGH_ROUNDS and (r.router, v.metric, str(r.device)) not in judged:
                unjudged[(r.router, v.metric, str(r.device))].append(v)
    for (router, name, device), vs in unjudged.items():
        ratios = [v.ratio for v in vs if v.ratio is not None]
        groups.append(Group(router, name, device, len(vs), statistics.median(ratios) if ratios else None, None,
                            "not judged", f"too few rounds on {len(vs)} cases for a 95% CI of the median"))
    return sorted(groups, key=_rank)


def _num(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else "missing" if x is None else str(x)


def _line(tag: str, v: Any) -> str:
    if v.change is not None:
        how = f" ({_pct(v.change)})"
    elif isinstance(v.a, float) and isinstance(v.b, float):
        how = f" ({v.b - v.a:+.6g})"
    else:
        how = f" ({v.detail})" if v.detail else ""
    return f"{tag} {v.case_id} {v.router} {v.metric}: {_num(v.a)} -> {_num(v.b)}{how}"


def _table(groups: list[Group], devices: int) -> list[str]:
    def label(g: Group) -> str:
        return f"{g.router} ({g.device})" if devices > 1 and g.device else g.router

    def ratio(g: Group) -> str:
        if g.ratio is None:
            return "-"
        return f"{g.ratio:.6f}" if g.ratio != 1 and abs(g.ratio - 1) < 5e-4 else f"{g.ratio:.3f}"

    def interval(g: Group) -> str:
        return "-" if g.interval is None else f"{g.interval[0]:.3f}-{g.interval[1]:.3f}"

    head = ("verdict", "router", "metric", "cases", "B/A", "interval", "reason")
    body = [(g.verdict, label(g), g.metric, str(g.cases), ratio(g), interval(g), g.reason) for g in groups]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head) - 1)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
            for row in [head, *body]]


def format_text(c: Any, details: bool = False) -> str:
    """Plain text: the count line, the verdict, the summary table, notes, then (``details``) one
    line per regressed, improved, worse-but-not-gating and changed cell."""
    groups = summarize(c)
    quiet = [g for g in groups if g.verdict == "unchanged" and not g.metric.endswith(".median_ms")]
    shown = [g for g in groups if g not in quiet]
    lines = [
        f"{c.matched} rows compared, {len(c.regressions)} regressions, {len(c.improvements)} improvements "
        f"({c.unmatched['only_in_a']} rows only in A, {c.unmatched['only_in_b']} only in B; "
        f"metrics: {c.metrics}; {'' if c.metrics == 'deterministic' else f'times: {c.mode}; '}"
        f"gate: {', '.join(map(str, c.gates)) or 'default'})"
    ]
    if c.matched == 0:
        lines.append("nothing compared: no (case_id, router) is ok in both")
    failed = len({(g.router, g.metric, g.device) for g in groups if g.regression})
    lines.append(f"FAIL: {failed} router/metric lines regressed" + (f", {len(c.failing)} rows now fail"
                 if c.failing else "") if c.exit_code == 1 else "PASS" if c.exit_code == 0 else "NOTHING COMPARED")
    for v in c.failing:
        lines.append(f"  ERROR  {v.case_id} {v.router}: ok in A, error in B: {v.detail}")
    if shown:
        lines += _table(shown, len({g.device for g in groups if g.device}))
    if quiet:
        metrics = sorted({g.metric for g in quiet})
        lines.append(f"  and {len(quiet)} more lines unchanged on every case ({len(metrics)} metric{'s' * (len(metrics) != 1)}: "
                     f"{', '.join(metrics[:6])}{', ...' if len(metrics) > 6 else ''})")
    lines += [f"note: {n}" for n in c.notes]
    if details:
        everything = [v for r in c.rows for v in r.verdicts]
        lines += [_line("REGRESSION", v) for v in c.regressions]
        lines += [_line("IMPROVEMENT", v) for v in c.improvements]
        lines += [_line("WORSE (not gating)", v) for v in everything if v.verdict == "worse" and not v.regression]
        lines += [_line("CHANGED", v) for v in everything if v.verdict == "changed"]
    elif c.regressions or c.improvements or any(g.verdict in ("worse", "changed") for g in groups):
        lines.append("(one line per case: --details; everything: --json FILE)")
    return "\n".join(lines) + "\n"

"""Compare two runs (or baselines) row by row: a verdict per metric, the regressions, an exit code.

A is the reference (old), B the candidate (new); rows match on (case_id, router) where both are
`ok`. Verdicts: `better`/`worse`/`unchanged` by the metric's direction (`metrics.METRICS`),
`changed` for metrics without one, `info` for time columns other than the median.

- Deterministic metrics: equal within rel 1e-6 / abs 1e-9 is `unchanged`, else better or worse.
- `<phase>.median_ms`: `not enough rounds` (never a regression) when either side timed too few
  rounds for a 95% CI of the median (n <= 5: even min-max covers less, 93.8% at n = 5, 75% at
  n = 3); else the noise rule (`NoiseRule`, reasons in docs/ci.md). A median is `worse`
  when (1) B/A > 1 + threshold, (2) the 95% CIs of the medians do not overlap, (3) B - A >
  min_diff_ms, and (4) at least `consistency` of the router's cases (same phase and device) pass
  (1)-(3), a share that beats the share among all other medians of the device by `margin`: a
  slower router is slower on most of its cases and stands out, while a busy machine slows
  random rows of every router. `better` mirrors it.
- Runs from different machines (CPU model, hostname or CUDA devices differ) that both carry
  `meta["reference"]` (a fixed kernel timed in the same process) compare time / reference
  median (mode `auto`); `absolute` and `relative` force one or the other.

Gate: without `fail_on`, any deterministic metric `worse` or `changed` (a metric with no
direction that moved: the routing changed) or median `worse` is a regression; with it,
only those metrics gate, each by its threshold (for a median it replaces (1)). A row `ok` in A
and `error` in B is always a regression. Exit codes: 0 pass, 1 regression, 2 nothing compared.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from moebench.compare.sides import MODES, Scale, load_side, num, resolve_mode  # noqa: F401 (load_side: API)
from moebench.core.errors import MoebenchError, did_you_mean
from moebench.core.metrics import METRICS
from moebench.core.timing_stats import median_ci_ranks, order_statistic_coverage

METRIC_SETS = ("deterministic", "time", "all")
REL_TOL, ABS_TOL = 1e-6, 1e-9
CONFIDENCE = 0.95  # of the CIs of the medians the noise rule compares
NOT_ENOUGH_ROUNDS = "not enough rounds"
MIN_CI_ROUNDS = next(n for n in range(1, 100) if median_ci_ranks(n, CONFIDENCE) is not None)  # 6


def order_coverage(n: int) -> float:
    """The most coverage any order-statistic interval of the median of n samples has: (min, max)."""
    return order_statistic_coverage(n, 1, n) if n > 1 else 0.0


@dataclass(frozen=True)
class NoiseRule:
    """When a median time counts as changed: beyond ``threshold`` (relative), 95% CIs apart,
    more than ``min_diff_ms`` apart (timer resolution), and the same on at least a
    ``consistency`` share of the router's cases, ``margin`` above the share among all other
    medians of the device (``consistency`` 0 judges every row alone, without the margin)."""

    threshold: float = 0.10
    min_diff_ms: float = 0.01
    consistency: float = 2 / 3
    margin: float = 0.5


@dataclass(frozen=True)
class Gate:
    """``--fail-on METRIC:THRESHOLD``: fail when ``metric`` is worse by more than ``threshold``
    (a fraction of A's value when ``relative``, else in the metric's unit; medians: in A's ms)."""

    metric: str
    threshold: float
    relative: bool

    def __str__(self) -> str:
        return f"{self.metric}:{self.threshold * 100:g}%" if self.relative else f"{self.metric}:{self.threshold:g}"


@dataclass
class Verdict:
    """One metric of one matched row. ``a``/``b`` as compared (reference-relative in relative
    mode); ``change`` = (b - a)/|a| (None when a is 0 or missing); ``gated``: whether this
    metric can fail the comparison; ``regression``: whether it does."""

    case_id: str
    router: str
    metric: str
    a: Any
    b: Any
    verdict: str
    change: float | None = None
    regression: bool = False
    gated: bool = False
    detail: str = ""


@dataclass
class RowComparison:
    case_id: str
    router: str
    device: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)


@dataclass
class Comparison:
    """What :func:`compare_runs` found. ``failing``: rows ok in A and an error in B."""

    a: str
    b: str
    mode: str
    metrics: str
    noise: NoiseRule
    gates: list[Gate]
    rows: list[RowComparison]
    matched: int
    unmatched: dict
    failing: list[Verdict]
    notes: list[str]

    def _all(self) -> list[Verdict]:
        return [v for r in self.rows for v in r.verdicts]

    @property
    def regressions(self) -> list[Verdict]:
        return self.failing + [v for v in self._all() if v.regression]

    @property
    def improvements(self) -> list[Verdict]:
        return [v for v in self._all() if v.verdict == "better"]

    @property
    def exit_code(self) -> int:
        if self.regressions:
            return 1
        return 2 if self.matched == 0 else 0

    def to_dict(self) -> dict:
        """Everything, JSON-ready: per row, per metric a, b, verdict, change, regression, detail."""
        drop = ("case_id", "router", "metric")
        return {
            "a": self.a, "b": self.b, "mode": self.mode, "metrics": self.metrics,
            "noise_rule": asdict(self.noise), "gates": [str(g) for g in self.gates],
            "matched": self.matched, "unmatched": self.unmatched, "notes": self.notes,
            "regressions": len(self.regressions), "improvements": len(self.improvements),
            "exit_code": self.exit_code, "failing": [asdict(v) for v in self.failing],
            "rows": [{"case_id": r.case_id, "router": r.router, "device": r.device,
                      "metrics": {v.metric: {k: x for k, x in asdict(v).items() if k not in drop} for v in r.verdicts}}
                     for r in self.rows],
        }


def parse_threshold(text: str, what: str) -> tuple[float, bool]:
    """``10%`` -> (0.10, relative); ``0.5`` -> (0.5, absolute). Must be a number >= 0."""
    relative = text.strip().endswith("%")
    try:
        number = float(text.strip().rstrip("%"))
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise MoebenchError(f"{what}: threshold must be a number >= 0, optionally with %")
    return (number / 100 if relative else number), relative


def parse_gate(spec: str) -> Gate:
    """``METRIC:THRESHOLD`` -> Gate; unknown metric names raise MoebenchError with a did-you-mean."""
    metric, sep, value = spec.rpartition(":")
    if not sep or not metric:
        raise MoebenchError(f"--fail-on {spec!r}: expected METRIC:THRESHOLD, e.g. route.median_ms:10% or drop_rate:0")
    if metric not in METRICS:
        raise MoebenchError(f"--fail-on {spec!r}: unknown metric {metric!r}{did_you_mean(metric, list(METRICS))}")
    return Gate(metric, *parse_threshold(value, f"--fail-on {spec!r}"))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def _change(a: float | None, b: float | None) -> float | None:
    return (b - a) / abs(a) if a is not None and b is not None and a != 0 else None


def _worse_by(metric: str, a: float, b: float, relative: bool) -> float:
    """How much worse b is than a in the metric's direction (negative: better)."""
    d = METRICS[metric].direction
    delta = b - a if d == "lower" else a - b if d == "higher" else abs(b - a)
    if not relative:
        return delta
    return delta / abs(a) if a != 0 else (math.inf if delta > 0 else 0.0)


def _deterministic(v: Verdict) -> None:
    a, b = v.a, v.b
    if a is None or b is None:
        v.verdict = "unchanged" if a is None and b is None else "changed"
        v.detail = "" if a is None and b is None else "missing on one side"
    elif _close(a, b):
        v.verdict = "unchanged"
    elif METRICS[v.metric].direction == "none":
        v.verdict = "changed"
    else:
        v.verdict = "worse" if _worse_by(v.metric, a, b, False) > 0 else "better"


def _too_few_rounds(row: dict, phase: str) -> int | None:
    """The row's rounds when they are too few for the 95% CI of the median the noise rule
    compares (n <= 5: no order-statistic interval reaches 95%), else None."""
    rounds = num(row.get(f"{phase}.rounds"))
    if rounds is None or rounds < 1:  # no count: judged by its CI, if it has one
        return None
    return int(rounds) if median_ci_ranks(int(rounds), CONFIDENCE) is None else None


def _median(v: Verdict, row_a: dict, row_b: dict, sa: Scale, sb: Scale, noise: NoiseRule, gate: Gate | None):
    """Conditions (1)-(3) of the noise rule for one row; (4) is :func:`_consistency`."""
    phase, a, b = v.metric.split(".")[0], v.a, v.b
    few = {side: _too_few_rounds(row, phase) for side, row in (("A", row_a), ("B", row_b))}
    if a is not None and b is not None and any(n is not None for n in few.values()):
        v.verdict = NOT_ENOUGH_ROUNDS  # never a regression: the interval it would rest on does not exist
        v.detail = ", ".join(f"{side} has {n} rounds (covers {order_coverage(n):.1%} at best)"
                             for side, n in few.items() if n is not None) + \
            f"; a {CONFIDENCE:.0%} CI of the median needs >= {MIN_CI_ROUNDS}"
        return
    ci_a, ci_b = sa.ci(row_a, phase), sb.ci(row_b, phase)
    v.verdict = "unchanged"
    if a is None or b is None or ci_a is None or ci_b is None or a <= 0 or b <= 0:
        v.detail = "no time or CI on one side"
        return
    diff_ms = abs(b - a) * sa.ref  # in A's milliseconds
    slower, faster = ci_b[0] > ci_a[1], ci_b[1] < ci_a[0]
    if not (slower or faster):
        v.detail = "95% CIs overlap"
    elif diff_ms <= noise.min_diff_ms:
        v.detail = f"differs by less than {noise.min_diff_ms:g} ms"
    elif slower and b / a > 1 + noise.threshold:
        v.verdict = "worse"
    elif faster and a / b > 1 + noise.threshold:
        v.verdict = "better"
    else:
        v.detail = f"within {noise.threshold:.0%}"
    if gate is not None:  # the gate's threshold replaces (1); absolute ones are in A's ms
        worse = (b / a - 1) if gate.relative else (b - a) * sa.ref
        v.regression = slower and diff_ms > noise.min_diff_ms and worse > gate.threshold


def _consistency(rows: list[RowComparison], noise: NoiseRule, notes: list[str]) -> None:
    """Condition (4): keep a median's worse/better/regression only where at least
    ``noise.consistency`` of the router's cases (same phase and device) agree and that share
    exceeds the share among all other medians of the device by ``noise.margin``."""
    if noise.consistency <= 0:
        return
    groups: dict[tuple, list[Verdict]] = defaultdict(list)
    for r in rows:
        for v in r.verdicts:
            if v.metric.endswith(".median_ms") and v.a is not None and v.b is not None and v.verdict != NOT_ENOUGH_ROUNDS:
                groups[(r.router, r.device, v.metric)].append(v)
    kinds = {"slower": lambda v: v.verdict == "worse", "faster": lambda v: v.verdict == "better",
             "regressed": lambda v: v.regression}
    total: dict[tuple, int] = defaultdict(int)  # (device, kind) -> hits; (device, None) -> medians
    for (_, device, _), vs in groups.items():
        total[device, None] += len(vs)
        for kind, test in kinds.items():
            total[device, kind] += sum(map(test, vs))
    for (router, device, _), vs in groups.items():
        n, rest = len(vs), total[device, None] - len(vs)
        for kind, test in kinds.items():
            hits = sum(map(test, vs))
            background = (total[device, kind] - hits) / rest if rest else 0.0
            if hits and (hits < noise.consistency * n or hits / n - background < noise.margin):
                for v in filter(test, vs):
                    v.detail = (f"noise: {hits} of {n} cases of {router} {kind}, "
                                f"{background:.0%} of the other medians too")
                    if kind == "regressed":
                        v.regression = False
                    else:
                        v.verdict = "unchanged"
    for (device, kind), hits in sorted(total.items(), key=str):
        if kind in ("slower", "faster") and hits >= noise.margin * total[device, None]:
            notes.append(f"{device}: {hits} of {total[device, None]} medians are {kind} in B (CIs apart, "
                         f"> {noise.threshold:.0%}): a {'busier' if kind == 'slower' else 'quieter'} machine "
                         "than for A, or a change that affects every router; times are judged only where a "
                         "router stands out from that")


def _compare_row(key, row_a, row_b, names, sa: Scale, sb: Scale, noise, gates) -> RowComparison:
    """Verdicts of every metric in ``names`` that either row carries."""
    out = RowComparison(key[0], key[1], row_a.get("device"))
    for metric in names:
        if metric not in row_a and metric not in row_b:
            continue
        info, gate = METRICS[metric], gates.get(metric)
        is_median = metric.endswith(".median_ms")
        a, b = sa.value(metric, num(row_a.get(metric))), sb.value(metric, num(row_b.get(metric)))
        gated = gate is not None if gates else (info.deterministic or is_median)
        v = Verdict(key[0], key[1], metric, a, b, "info", _change(a, b), gated=gated)
        if info.deterministic:
            _deterministic(v)
        elif is_median:
            _median(v, row_a, row_b, sa, sb, noise, gate)
        if gate is None:  # default gate: a deterministic metric may not move at all, even sideways
            v.regression = gated and (v.verdict == "worse" or (info.deterministic and v.verdict == "changed"))
        elif not is_median:
            if a is None or b is None:
                v.regression = (a is None) != (b is None)
            else:
                v.regression = not _close(a, b) and _worse_by(metric, a, b, gate.relative) > gate.threshold
        out.verdicts.append(v)
    return out


def _metric_names(metrics: str) -> list[str]:
    if metrics not in METRIC_SETS:
        raise MoebenchError(f"--metrics {metrics!r}: expected one of {', '.join(METRIC_SETS)}")
    keep = {"deterministic": lambda m: m.deterministic, "time": lambda m: not m.deterministic}.get(metrics)
    return [name for name, m in METRICS.items() if keep is None or keep(m)]


def compare_runs(a, b, fail_on=(), metrics: str = "all", mode: str = "auto",
                 noise: NoiseRule = NoiseRule()) -> Comparison:
    """Compare B (candidate) against A (reference).

    a, b: paths (run folder, results/<suite>, baseline file) or ``(meta, rows)`` pairs.
    fail_on: Gate objects or ``METRIC:THRESHOLD`` strings. metrics: deterministic | time | all.
    mode: auto | absolute | relative (how times from two machines are compared).
    Raises MoebenchError on bad input (unknown metric, unreadable side, --relative without
    reference times).
    """
    (meta_a, rows_a), (meta_b, rows_b) = (x if isinstance(x, tuple) else load_side(x) for x in (a, b))
    gate_list = [g if isinstance(g, Gate) else parse_gate(g) for g in fail_on]
    names = _metric_names(metrics)
    outside = [str(g) for g in gate_list if g.metric not in names]
    if outside:
        raise MoebenchError(f"--fail-on {', '.join(outside)}: not among the compared metrics (--metrics {metrics})")
    notes: list[str] = []
    mode = "absolute" if metrics == "deterministic" else resolve_mode(mode, meta_a, meta_b, notes)
    for key, what in (("suite_sha256", "suite file"), ("quick", "--quick setting"), ("timing", "timing settings")):
        if key in meta_a and key in meta_b and meta_a[key] != meta_b[key]:
            notes.append(f"the runs differ in {what} ({key})")
    index_a = {(r.get("case_id"), r.get("router")): r for r in rows_a}  # last wins (resumed runs)
    index_b = {(r.get("case_id"), r.get("router")): r for r in rows_b}
    ok_a = {k for k, r in index_a.items() if r.get("status") == "ok"}
    ok_b = {k for k, r in index_b.items() if r.get("status") == "ok"}
    failing = [
        Verdict(k[0], k[1], "status", "ok", "error", "worse", regression=True, gated=True,
                detail=str(index_b[k].get("reason") or ""))
        for k in sorted(ok_a - ok_b) if index_b.get(k, {}).get("status") == "error"
    ]
    matched = sorted(ok_a & ok_b)
    gates = {g.metric: g for g in gate_list}
    relative = mode == "relative"
    rows = []
    for key in matched:
        device = index_a[key].get("device")
        sa, sb = Scale(meta_a, relative, device), Scale(meta_b, relative, device)
        rows.append(_compare_row(key, index_a[key], index_b[key], names, sa, sb, noise, gates))
    _consistency(rows, noise, notes)
    unjudged = [v for r in rows for v in r.verdicts if v.verdict == NOT_ENOUGH_ROUNDS]
    if unjudged:
        notes.append(f"{len(unjudged)} medians not judged: too few rounds on one side for a {CONFIDENCE:.0%} CI of "
                     f"the median (needs >= {MIN_CI_ROUNDS}; e.g. {unjudged[0].detail.split(';')[0]}); "
                     "time them with more rounds (not --quick) to compare speed")
    return Comparison(
        a="A" if isinstance(a, tuple) else str(a), b="B" if isinstance(b, tuple) else str(b),
        mode=mode, metrics=metrics, noise=noise, gates=gate_list, rows=rows, matched=len(matched),
        unmatched={"only_in_a": len(ok_a - ok_b) - len(failing), "only_in_b": len(ok_b - ok_a)},
        failing=failing, notes=notes,
    )


def _line(tag: str, v: Verdict) -> str:
    def show(x: Any) -> str:
        return f"{x:.6g}" if isinstance(x, float) else "missing" if x is None else str(x)

    if v.change is not None:
        how = f" ({v.change:+.1%})"
    elif isinstance(v.a, float) and isinstance(v.b, float):
        how = f" ({v.b - v.a:+.6g})"
    else:
        how = f" ({v.detail})" if v.detail else ""
    return f"{tag} {v.case_id} {v.router} {v.metric}: {show(v.a)} -> {show(v.b)}{how}"


def format_text(c: Comparison) -> str:
    """Plain text: the summary line, notes, then regressions, improvements, other changes."""
    lines = [
        f"{c.matched} rows compared, {len(c.regressions)} regressions, {len(c.improvements)} improvements "
        f"({c.unmatched['only_in_a']} rows only in A, {c.unmatched['only_in_b']} only in B; "
        f"metrics: {c.metrics}; {'' if c.metrics == 'deterministic' else f'times: {c.mode}; '}"
        f"gate: {', '.join(map(str, c.gates)) or 'default'})"
    ]
    if c.matched == 0:
        lines.append("nothing compared: no (case_id, router) is ok in both")
    lines += [f"note: {n}" for n in c.notes]
    lines += [_line("REGRESSION", v) for v in c.regressions]
    lines += [_line("IMPROVEMENT", v) for v in c.improvements]
    lines += [_line("WORSE (not gating)", v) for v in c._all() if v.verdict == "worse" and not v.regression]
    lines += [_line("CHANGED", v) for v in c._all() if v.verdict == "changed"]
    return "\n".join(lines) + "\n"

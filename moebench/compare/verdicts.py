"""Compare two runs (or baselines) row by row: a verdict per metric, one per router, an exit code.

A is the reference (old), B the candidate (new); rows match on (case_id, router) where both are
`ok`. Every column either row carries that `moebench.core.metrics.metric()` knows is compared:
routing, training, per-phase and parallel metrics. Verdicts: `better`/`worse`/`unchanged` by
the metric's direction, `changed` for metrics without one (never a regression: they describe,
they do not rank), `info` for measured columns other than the phase medians.

- Deterministic metrics: equal within rel 1e-6 / abs 1e-9 is `unchanged`, else better or worse.
- `<phase>.median_ms`: `not enough rounds` (never a regression) when either side timed too few
  rounds for a 95% CI of the median (n <= 5: even min-max covers less, 93.8% at n = 5, 75% at
  n = 3); else the noise rule (`NoiseRule`, reasons in docs/ci.md), judged per router (same
  phase and device), not per cell: a router is `worse` when (1) the median over its cases of
  B/A exceeds 1 + threshold, (2) on at least `consistency` of its cases the 95% CIs of the two
  medians lie apart, B slower, by more than min_diff_ms, (3) that share beats the share among
  all other medians of the device by `margin`, and (4) it has at least `min_cases` cases. A
  slowed router is slower on most of its cases and stands out, while a busy machine slows
  random cells of every router, and one noisy cell can not decide a router. `better` mirrors it.
- Runs from different machines (CPU model, hostname or CUDA devices differ) that both carry
  `meta["reference"]` (a fixed kernel timed in the same process) compare time / reference
  median (mode `auto`); `absolute` and `relative` force one or the other.

Gate: without `fail_on`, any deterministic metric `worse` or a router's median `worse` is a
regression; with it, only those metrics gate, each by its threshold (for a median it replaces
(1): the router's median ratio must exceed it). A row `ok` in A and `error` in B is always a
regression. Exit codes: 0 pass, 1 regression, 2 nothing compared. The summary and the text
output are in `moebench.compare.summary`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from moebench.compare.sides import MODES, Scale, load_side, num, resolve_mode  # noqa: F401 (load_side: API)
from moebench.compare.summary import NOT_ENOUGH_ROUNDS, Group, format_text, summarize  # noqa: F401 (API)
from moebench.compare.times import judge_times
from moebench.core.errors import MoebenchError, did_you_mean
from moebench.compare.tolerance import tolerate_training
from moebench.core.metrics import Metric, all_metrics, metric as metric_of
from moebench.core.rows import is_ok
from moebench.core.timing_stats import median_ci_ranks, order_statistic_coverage

METRIC_SETS = ("deterministic", "time", "all")
REL_TOL, ABS_TOL = 1e-6, 1e-9
CONFIDENCE = 0.95  # of the CIs of the medians the noise rule compares
MIN_CI_ROUNDS = next(n for n in range(1, 100) if median_ci_ranks(n, CONFIDENCE) is not None)  # 6


def order_coverage(n: int) -> float:
    """The most coverage any order-statistic interval of the median of n samples has: (min, max)."""
    return order_statistic_coverage(n, 1, n) if n > 1 else 0.0


@dataclass(frozen=True)
class NoiseRule:
    """When a router's median time counts as changed: the median over its cases of B/A beyond
    ``threshold`` (relative); 95% CIs apart by more than ``min_diff_ms`` (timer resolution) on
    at least a ``consistency`` share of its cases, ``margin`` above the share among all other
    medians of the device; at least ``min_cases`` cases (``consistency`` 0 judges every row
    alone: its own ratio, CIs and difference)."""

    threshold: float = 0.10
    min_diff_ms: float = 0.01
    consistency: float = 2 / 3
    margin: float = 0.5
    min_cases: int = 2


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
    mode); ``change`` = (b - a)/|a| (None when a is 0 or missing); ``ratio`` = b/a and, for a
    median with CIs on both sides, ``interval`` = (B's CI low / A's CI high, B's high / A's low);
    ``apart``: "slower"/"faster" where those CIs lie apart by more than min_diff_ms;
    ``gated``: whether this metric can fail the comparison; ``regression``: whether it does."""

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
    ratio: float | None = None
    interval: tuple[float, float] | None = None
    apart: str | None = None
    diff_ms: float | None = None


@dataclass
class RowComparison:
    case_id: str
    router: str
    device: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)


@dataclass
class Comparison:
    """What :func:`compare_runs` found. ``failing``: rows ok in A and an error in B;
    ``time_groups``: the verdict of each router's medians (per phase and device)."""

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
    time_groups: list[Group] = field(default_factory=list)

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

    def summary(self) -> list[Group]:
        """One line per router and metric (phase medians: per router, phase and device), most
        severe first, gated-on metrics first (see `moebench.compare.summary`)."""
        return summarize(self)

    def to_dict(self) -> dict:
        """Everything, JSON-ready: the summary, then per row, per metric a, b, verdict, change,
        ratio, interval, regression, detail."""
        drop = ("case_id", "router", "metric")
        return {
            "a": self.a, "b": self.b, "mode": self.mode, "metrics": self.metrics,
            "noise_rule": asdict(self.noise), "gates": [str(g) for g in self.gates],
            "matched": self.matched, "unmatched": self.unmatched, "notes": self.notes,
            "regressions": len(self.regressions), "improvements": len(self.improvements),
            "exit_code": self.exit_code, "failing": [asdict(v) for v in self.failing],
            "summary": [asdict(g) for g in self.summary()],
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
    name, sep, value = spec.rpartition(":")
    if not sep or not name:
        raise MoebenchError(f"--fail-on {spec!r}: expected METRIC:THRESHOLD, e.g. route.median_ms:10% or drop_rate:0")
    found = metric_of(name)
    if found is None:
        raise MoebenchError(f"--fail-on {spec!r}: unknown metric {name!r}{did_you_mean(name, list(all_metrics()))}")
    if found.direction == "none":
        raise MoebenchError(f"--fail-on {spec!r}: {name} has no direction (neither higher nor lower is better), "
                            "so it cannot fail a comparison; it is reported as changed")
    return Gate(name, *parse_threshold(value, f"--fail-on {spec!r}"))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def _change(a: float | None, b: float | None) -> float | None:
    return (b - a) / abs(a) if a is not None and b is not None and a != 0 else None


def _worse_by(name: str, a: float, b: float, relative: bool) -> float:
    """How much worse b is than a in the metric's direction (negative: better)."""
    d = metric_of(name).direction
    delta = b - a if d == "lower" else a - b if d == "higher" else abs(b - a)
    if not relative:
        return delta
    return delta / abs(a) if a != 0 else (math.inf if delta > 0 else 0.0)


def _deterministic(v: Verdict, info: Metric) -> None:
    a, b = v.a, v.b
    if a is None or b is None:
        v.verdict = "unchanged" if a is None and b is None else "changed"
        v.detail = "" if a is None and b is None else "missing on one side"
    elif _close(a, b):
        v.verdict = "unchanged"
    elif info.direction == "none":
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


def _median(v: Verdict, row_a: dict, row_b: dict, sa: Scale, sb: Scale, noise: NoiseRule) -> None:
    """One row's part of the noise rule: its ratio, its interval, whether its CIs lie apart.
    The verdict is the router's (`moebench.compare.times.judge_times`)."""
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
    if a is None or b is None or ci_a is None or ci_b is None or a <= 0 or b <= 0 or ci_a[0] <= 0 or ci_b[0] <= 0:
        v.detail = "no time or CI on one side"
        return
    v.interval = (ci_b[0] / ci_a[1], ci_b[1] / ci_a[0])
    if not (ci_b[0] > ci_a[1] or ci_b[1] < ci_a[0]):
        v.detail = "95% CIs overlap"
    elif abs(b - a) * sa.ref <= noise.min_diff_ms:  # in A's milliseconds
        v.detail = f"differs by less than {noise.min_diff_ms:g} ms"
    else:
        v.apart = "slower" if ci_b[0] > ci_a[1] else "faster"


def _compare_row(key, row_a, row_b, names, sa: Scale, sb: Scale, noise, gates) -> RowComparison:
    """Verdicts of every metric in ``names`` that either row carries."""
    out = RowComparison(key[0], key[1], row_a.get("device"))
    for name in names:
        if name not in row_a and name not in row_b:
            continue
        info, gate = metric_of(name), gates.get(name)
        is_median = name.endswith(".median_ms")
        a, b = sa.value(name, num(row_a.get(name))), sb.value(name, num(row_b.get(name)))
        gated = gate is not None if gates else (info.deterministic and info.direction != "none") or is_median
        v = Verdict(key[0], key[1], name, a, b, "info", _change(a, b), gated=gated)
        if a is not None and b is not None and a != 0 and b / a > 0:
            v.ratio = b / a
        if info.deterministic:
            _deterministic(v, info)
            tolerate_training(v, row_a, row_b)  # cross-machine rule for trained rows (compare/tolerance.py)
        elif is_median:
            _median(v, row_a, row_b, sa, sb, noise)
            if v.ratio is not None:
                v.diff_ms = (b - a) * sa.ref  # in A's milliseconds
        if is_median:
            pass  # judged per router: moebench.compare.times.judge_times
        elif gate is None:  # default: a directional deterministic metric may not get worse at all
            v.regression = gated and v.verdict == "worse"
        elif info.direction != "none":
            if a is None or b is None:
                v.regression = (a is None) != (b is None)
            else:
                v.regression = not _close(a, b) and _worse_by(name, a, b, gate.relative) > gate.threshold
        out.verdicts.append(v)
    return out


def _metric_names(metrics: str, rows: list[dict]) -> list[str]:
    """The metric columns any of ``rows`` carries, in the order of ``all_metrics()`` (then
    per-EP model columns by EP size), kept to the ``metrics`` set."""
    if metrics not in METRIC_SETS:
        raise MoebenchError(f"--metrics {metrics!r}: expected one of {', '.join(METRIC_SETS)}")
    keep = {"deterministic": lambda m: m.deterministic, "time": lambda m: not m.deterministic}.get(metrics)
    known = list(all_metrics())
    present = {c for r in rows for c in r if metric_of(c) is not None}
    order = {n: i for i, n in enumerate(known)}

    def key(c: str):  # columns of a family (model.ep8.layer_ms) after the named ones, numbers by value
        parts = re.split(r"(\d+)", c)
        return (order.get(c, len(order)), [int(p) if p.isdigit() else 0 for p in parts[1::2]], c)

    return [c for c in sorted(present, key=key) if keep is None or keep(metric_of(c))]


def _timing_differences(a: Any, b: Any) -> str:
    """``min_rounds 5 -> 30, threads 1 -> 2``: the timing keys whose values differ."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"{a!r} -> {b!r}"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k, 'unset')} -> {b.get(k, 'unset')}" for k in keys)


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
    if metrics not in METRIC_SETS:
        raise MoebenchError(f"--metrics {metrics!r}: expected one of {', '.join(METRIC_SETS)}")
    notes: list[str] = []
    bare = [side for side, meta in (("A", meta_a), ("B", meta_b)) if meta.get("timings_included") is False]
    if bare and metrics != "deterministic":  # a baseline exported without --with-timings
        notes.append(f"{' and '.join(bare)} carries no timings (a baseline without --with-timings): "
                     "deterministic metrics only")
        metrics = "deterministic"
    keep = {"deterministic": lambda m: m.deterministic, "time": lambda m: not m.deterministic}.get(metrics)
    outside = [str(g) for g in gate_list if keep is not None and not keep(metric_of(g.metric))]
    if outside:
        raise MoebenchError(f"--fail-on {', '.join(outside)}: not among the compared metrics (--metrics {metrics})")
    mode = "absolute" if metrics == "deterministic" else resolve_mode(mode, meta_a, meta_b, notes)
    for key, what in (("suite_sha256", "suite file"), ("quick", "--quick setting")):
        if key in meta_a and key in meta_b and meta_a[key] != meta_b[key]:
            notes.append(f"the runs differ in {what} ({key})")
    if "timing" in meta_a and "timing" in meta_b and meta_a["timing"] != meta_b["timing"]:
        notes.append(f"the runs differ in timing settings: {_timing_differences(meta_a['timing'], meta_b['timing'])}")
    index_a = {(r.get("case_id"), r.get("router")): r for r in rows_a}  # last wins (resumed runs)
    index_b = {(r.get("case_id"), r.get("router")): r for r in rows_b}
    ok_a = {k for k, r in index_a.items() if is_ok(r)}
    ok_b = {k for k, r in index_b.items() if is_ok(r)}
    failing = [
        Verdict(k[0], k[1], "status", "ok", "error", "worse", regression=True, gated=True,
                detail=str(index_b[k].get("reason") or ""))
        for k in sorted(ok_a - ok_b) if index_b.get(k, {}).get("status") == "error"
    ]
    matched = sorted(ok_a & ok_b)
    names = _metric_names(metrics, [index_a[k] for k in matched] + [index_b[k] for k in matched])
    gates = {g.metric: g for g in gate_list}
    relative = mode == "relative"
    rows = []
    for key in matched:
        device = index_a[key].get("device")
        sa, sb = Scale(meta_a, relative, device), Scale(meta_b, relative, device)
        rows.append(_compare_row(key, index_a[key], index_b[key], names, sa, sb, noise, gates))
    time_groups = judge_times(rows, noise, gates, notes)
    unjudged = [v for r in rows for v in r.verdicts if v.verdict == NOT_ENOUGH_ROUNDS]
    if unjudged:
        notes.append(f"{len(unjudged)} medians not judged: too few rounds on one side for a {CONFIDENCE:.0%} CI of "
                     f"the median (needs >= {MIN_CI_ROUNDS}; e.g. {unjudged[0].detail.split(';')[0]}); "
                     "time them with more rounds (not --quick) to compare speed")
    return Comparison(
        a="A" if isinstance(a, tuple) else str(a), b="B" if isinstance(b, tuple) else str(b),
        mode=mode, metrics=metrics, noise=noise, gates=gate_list, rows=rows, matched=len(matched),
        unmatched={"only_in_a": len(ok_a - ok_b) - len(failing), "only_in_b": len(ok_b - ok_a)},
        failing=failing, notes=notes, time_groups=time_groups,
    )

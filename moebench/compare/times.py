"""The noise rule for phase medians, judged per router (docs/ci.md, "The noise rule").

One cell (a case's median) can be slowed by a burst of other work on the machine; a code change
slows a router on most of its cases. So a router's median times (per phase and device) get one
verdict from all its cases: the median over its cases of B/A must exceed the threshold (the
gate's, else the rule's), the 95% CIs of the two medians must lie apart (B slower, by more than
min_diff_ms) on at least ``consistency`` of its cases, that share must beat the share among all
other medians of the device by ``margin`` (a busier machine slows every router) -- or, where the
others moved too, the router's median ratio divided by the 90th percentile of the others' ratios
(10th, for faster) must itself exceed the threshold (a busier machine scales every time by about
one factor, give or take its noise; a router 10x slower on a machine 1.5x busier still stands
out) -- and it needs ``min_cases`` cases (a single noisy cell decides nothing). ``better``
mirrors it. The rows of a
``worse`` router whose CIs lie apart carry its verdict (and the regression, where gated); the
other rows whose CIs lie apart say why they were taken for noise.

Input: the RowComparisons of `moebench.compare.verdicts`, whose median Verdicts already carry
``ratio`` (B/A), ``interval`` (of the ratio, from the two CIs), ``apart`` and ``diff_ms``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from moebench.compare.summary import NOT_ENOUGH_ROUNDS, Group


def _share(x: float) -> str:
    return "2/3" if abs(x - 2 / 3) < 1e-9 else f"{x:.0%}"


def _limit(gate, noise, up: bool) -> str:
    if up and gate is not None and not gate.relative:
        return f"{gate.threshold:g} ms"
    return f"{(gate.threshold if up and gate is not None else noise.threshold):.0%}"


def _beyond(gate, noise, ratio: float, diff_ms: float, up: bool) -> bool:
    """Whether a change (ratio B/A, difference in A's ms) exceeds the gate's threshold (slower
    only), else the rule's."""
    if not up:
        return 1 / ratio > 1 + noise.threshold
    if gate is not None and not gate.relative:
        return diff_ms > gate.threshold
    return ratio > 1 + (gate.threshold if gate is not None else noise.threshold)


def _stands_out(gate, noise, relative: float, up: bool) -> bool:
    """Whether a router's ratio relative to the others' (``relative``) exceeds the relative
    threshold: the gate's where it is relative, else the rule's (an absolute ms gate says nothing
    about how much of a difference a busier machine explains)."""
    t = gate.threshold if up and gate is not None and gate.relative else noise.threshold
    return relative > 1 + t if up else 1 / relative > 1 + t


def _each_alone(vs, gate, noise, gated: bool) -> tuple[str, str]:
    """``consistency`` 0: every row judged by its own ratio, CIs and difference."""
    for v in vs:
        if v.apart == "slower" and _beyond(gate, noise, v.ratio, v.diff_ms, True):
            v.verdict, v.regression = "worse", gated
        elif v.apart == "faster" and _beyond(gate, noise, v.ratio, v.diff_ms, False):
            v.verdict = "better"
    worse, better = sum(v.verdict == "worse" for v in vs), sum(v.verdict == "better" for v in vs)
    verdict = "worse" if worse else "better" if better else "unchanged"
    return verdict, f"{worse or better} of {len(vs)} cases {'faster' if better and not worse else 'slower'}, each judged alone"


def _as_router(vs, gate, noise, gated: bool, total: dict, device, edges: tuple | None) -> tuple[str, str]:
    """The router's verdict from all its cases (the module docstring); sets its rows'.
    ``edges``: the (10th, 90th) percentiles of B/A over every other median of the device
    (None: there is none); slower is judged against the 90th, faster against the 10th."""
    n, rest = len(vs), total[device, None] - len(vs)
    ratio = statistics.median(v.ratio for v in vs)
    diff_ms = statistics.median(v.diff_ms for v in vs)
    reasons = []
    for kind, up in (("slower", True), ("faster", False)):
        others = edges[up] if edges else None
        hits = [v for v in vs if v.apart == kind]
        if not hits:
            continue
        background = (total[device, kind] - len(hits)) / rest if rest else 0.0
        why = f"{len(hits)} of {n} case{'s' * (n != 1)} {kind} (95% CIs apart)"
        if n < noise.min_cases:
            reasons.append(f"{why}; a router needs >= {noise.min_cases} cases to tell it from a noisy cell")
        elif len(hits) < noise.consistency * n:
            reasons.append(f"{why}, below {_share(noise.consistency)}")
        elif len(hits) / n - background < noise.margin and not (
                others and _stands_out(gate, noise, ratio / others, up)):
            reasons.append(f"{why}, and {background:.0%} of the other medians too"
                           + (f" (median ratio {ratio:.3g}, their {'90th' if up else '10th'} percentile {others:.3g})"
                              if others else ""))
        elif not _beyond(gate, noise, ratio, diff_ms, up):
            reasons.append(f"{why}, median ratio {ratio:.3g} within {_limit(gate, noise, up)}")
        else:
            verdict = "worse" if up else "better"
            for v in hits:
                v.verdict, v.regression = verdict, up and gated
            return verdict, f"{why}, median ratio {ratio:.3g} beyond {_limit(gate, noise, up)}"
    reason = "; ".join(reasons) or f"no case with 95% CIs apart ({n} cases)"
    for v in vs:
        if v.apart:
            v.detail = f"noise: {reason}"
    return "unchanged", reason


def judge_times(rows, noise, gates: dict, notes: list[str]) -> list[Group]:
    """The verdict of each router's ``<phase>.median_ms`` (per device), set on its rows too;
    appends a note per device where most medians moved the same way (a busier machine)."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        for v in r.verdicts:
            if v.metric.endswith(".median_ms") and v.ratio is not None and v.verdict != NOT_ENOUGH_ROUNDS \
                    and v.diff_ms is not None:
                groups[(r.router, str(r.device), v.metric)].append(v)
    total: dict[tuple, int] = defaultdict(int)  # (device, kind) -> cells; (device, None) -> medians
    ratios: dict[str, list[tuple[tuple, float]]] = defaultdict(list)  # device -> (group, B/A) per cell
    for key, vs in groups.items():
        ratios[key[1]].extend((key, v.ratio) for v in vs)
    for (_, device, _), vs in groups.items():
        total[device, None] += len(vs)
        for kind in ("slower", "faster"):
            total[device, kind] += sum(v.apart == kind for v in vs)
    out = []
    for (router, device, name), vs in sorted(groups.items()):
        gate = gates.get(name)
        gated = not gates or gate is not None
        if noise.consistency <= 0:
            verdict, reason = _each_alone(vs, gate, noise, gated)
        else:
            rest = sorted(x for k, x in ratios[device] if k != (router, device, name))
            # the others' edges: a router stands out from most of them, not from their middle
            edges = (rest[int(0.1 * len(rest))], rest[min(len(rest) - 1, int(0.9 * len(rest)))]) if rest else None
            verdict, reason = _as_router(vs, gate, noise, gated, total, device, edges)
        lows = [v.interval[0] for v in vs if v.interval]
        highs = [v.interval[1] for v in vs if v.interval]
        regression = any(v.regression for v in vs)
        out.append(Group(router=router, metric=name, device=device, cases=len(vs),
                         ratio=statistics.median(v.ratio for v in vs),
                         interval=(statistics.median(lows), statistics.median(highs)) if lows else None,
                         verdict="REGRESSION" if regression else verdict, reason=reason,
                         regression=regression, gated=gated))
    for (device, kind), hits in sorted(total.items(), key=str):
        if kind in ("slower", "faster") and hits >= noise.margin * total[device, None]:
            notes.append(f"{device}: {hits} of {total[device, None]} medians are {kind} in B (CIs apart, "
                         f"> {noise.min_diff_ms:g} ms): a {'busier' if kind == 'slower' else 'quieter'} machine "
                         "than for A, or a change that affects every router; times are judged only where a "
                         "router stands out from that")
    return out

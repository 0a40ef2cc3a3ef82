"""The timed part of `moebench ab`: paired blocks of A and B, round after round, looked at on a
schedule and stopped once every verdict is settled or the time budget is spent.

A *cell* is one (case, router, phase) that both sides could time; a *group* is one (router,
phase, device) over the cases. One round times every cell of every group not yet settled
once on each side, in a fresh random order of cells:

- interleaved (default): A's block and B's block of a cell back to back, the side that goes
  first alternating from round to round from a random start (ABBA...), the idle side's worker
  waiting on its pipe. A block builds the cell's phase again (fresh buffers behind a heap
  spacer of random size: each process's memory layout otherwise stays fixed for the run, a
  bias of up to 10% between two workers of identical code on a 50 us combine), then makes
  ``warmup`` untimed calls and ``calls`` timed ones, each with the side's own clock (`moebench
  run`'s), its value the median of the calls.
- duet: A and B run the cell's block at the same time, each worker pinned to a core of its
  own with one thread; the two cores are swapped every round (ABBA over the cores).

A suite with many cases (quickstart: 32 per router-phase) could not give a budget more than a
handful of such rounds, too few for any interval. Then the driver *rotates*: a round times one
case per group, the next case of the group's shuffled cycle, and each pair is one value of the
group (``--rotate``: auto, on or off; auto rotates when full rounds would not reach TARGET_LOOKS
looks in the budget). Under identical code every case's log(B/A) is symmetric about 0, so the
signed-rank test of the pooled values keeps its level; a slowdown shifts them all.

A group's round value is the mean over its cases of log(B/A) (rotating: the one case's); its
verdict comes from the
Hodges-Lehmann shift of those values and their signed-rank interval at the level that
`stats.look_alpha` allows at that look (Bonferroni over the groups; half of alpha spent over the
interim looks as alpha/2/(k(k+1)) at look k, half kept for the look when the budget ends):
a group settled at a look (slower, faster or same) keeps that verdict and leaves the schedule.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from moebench.compare.ab.protocol import SideWorker
from moebench.compare.ab.stats import Interval, look_alpha, look_schedule, min_pairs, shift_interval, verdict

MODES = ("interleaved", "duet")
ROTATE = ("auto", "on", "off")
MAX_CALLS = 10_000
TARGET_LOOKS = 3  # the budget should allow this many looks; blocks shrink (to MIN_BLOCK_MS) until it does
MIN_BLOCK_MS = 1.0
# a block's value: its median call, or its fastest (less noise from a preempted call, blind to
# a slowdown of a few calls of the block)
BLOCK_STATS = {"median": statistics.median, "min": min}


@dataclass
class Cell:
    """One (case, router, phase) both sides time: where each side holds it, calls per block,
    and the pairs: (A's block median ms, B's block median ms, which went first / which core A had)."""

    key: str
    case_id: str
    router: str
    phase: str
    device: str
    index: tuple[int, int]
    est_ms: tuple[float, float]
    calls: int
    start: int  # 0: A first (interleaved) or A on the first core (duet) in even rounds
    pairs: list[tuple[float, float, int]] = field(default_factory=list)
    fastest: list[tuple[float, float]] = field(default_factory=list)  # each block's fastest call (A, B), kept in ab.json
    blocks: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    def log_ratios(self) -> list[float]:
        return [math.log(b / a) if a > 0 and b > 0 else math.nan for a, b, _ in self.pairs]


@dataclass
class Group:
    """One (router, phase, device) over its cases; ``interval``/``verdict`` as last looked at
    (frozen once settled), ``settled_at``: the pairs it had when it settled."""

    router: str
    phase: str
    device: str
    cells: list[Cell]
    interval: Interval | None = None
    verdict: str = "undecided"
    settled_at: int | None = None
    look: int | None = None

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    rotating: bool = False
    turn: int = 0  # rotating: the next case of ``cells`` (shuffled once) to time
    values: list[float] = field(default_factory=list)  # rotating: log(B/A) of each pair, in order

    def round_values(self) -> list[float]:
        """Per round, the mean over the cases of log(B/A) (rotating: the pair's own)."""
        if self.rotating:
            return list(self.values)
        per_cell = [c.log_ratios() for c in self.cells]
        n = min(len(r) for r in per_cell)
        return [statistics.fmean(r[i] for r in per_cell) for i in range(n)]


@dataclass
class Settings:
    mode: str = "interleaved"
    alpha: float = 0.05
    min_effect: float = 0.02
    block_ms: float = 5.0
    warmup: int = 1
    first_look: int | None = None  # None: the fewest pairs the first look's level allows
    growth: float = 1.4
    seed: int | None = None
    block_stat: str = "median"
    fail_fast: bool = False  # stop at the first look with a slower verdict
    rotate: str = "auto"  # one case per group and round: "on", "off", or "auto" (when full rounds do not fit)
    relayout: bool = True  # each block builds its phase again (fresh buffers): layout bias becomes noise


def make_cells(cells_a: list[dict], cells_b: list[dict], block_ms: float, rng: random.Random) -> list[Cell]:
    """The cells both sides prepared; calls per block so that the faster side's block takes
    about ``block_ms`` (both sides time the same number of calls)."""
    by_key = {c["key"]: c for c in cells_b if c.get("status") == "ok"}
    out = []
    for a in cells_a:
        b = by_key.get(a["key"])
        if a.get("status") != "ok" or b is None:
            continue
        est = (float(a["est_ms"]), float(b["est_ms"]))
        calls = calls_for(block_ms, est)
        out.append(Cell(a["key"], a["case_id"], a["router"], a["phase"], a["device"], (a["index"], b["index"]),
                        est, calls, rng.randrange(2)))
    return out


def calls_for(block_ms: float, est_ms) -> int:
    """Calls per block so that the faster side's block takes about ``block_ms``."""
    fastest = max(min(est_ms), 1e-6)
    return max(1, min(MAX_CALLS, math.ceil(block_ms / fastest)))


def make_groups(cells: list[Cell]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for c in cells:
        groups.setdefault((c.router, c.phase, c.device), Group(c.router, c.phase, c.device, [])).cells.append(c)
    return list(groups.values())


class Driver:
    """Runs the rounds (see the module docstring) with workers A and B."""

    def __init__(self, workers: tuple[SideWorker, SideWorker], groups: list[Group], settings: Settings,
                 cores: tuple[int, int] | None = None, progress: Callable[[str], None] | None = None):
        self.a, self.b = workers
        self.groups = groups
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.cores = cores
        self.core_start = self.rng.randrange(2)
        self.rounds = 0
        self.looks: list[dict] = []
        self.progress = progress or (lambda text: print(text, file=sys.stderr))
        first = settings.first_look or min_pairs(look_alpha(settings.alpha, 1, max(1, len(groups))))
        self.schedule = look_schedule(first, settings.growth)
        self.stopped_by = "budget"
        self.block_ms = settings.block_ms  # as calibrated (`calibrate`)
        self.overhead_ms: float | None = None

    def active(self) -> list[Group]:
        return [g for g in self.groups if not g.settled]

    def run(self, deadline: float) -> None:
        """Rounds until every group is settled or the next round would pass ``deadline``
        (time.monotonic); a last look at the end."""
        self.calibrate(deadline)
        last_round_s = 0.0
        while self.active():
            if time.monotonic() + last_round_s > deadline:
                break
            started = time.monotonic()
            self._round()
            last_round_s = time.monotonic() - started
            if self.rounds in self.schedule:
                self.look()
                self.progress(f"ab: {self.rounds} pairs, {len(self.active())} of {len(self.groups)} router-phases "
                              f"unsettled, {max(0.0, deadline - time.monotonic()):.0f} s left")
                if self.s.fail_fast and any(g.verdict == "slower" for g in self.groups):
                    self.stopped_by = "regression"
                    break
        else:
            self.stopped_by = "settled"
        if self.active() and self.rounds:
            self.look(final=True)

    def calibrate(self, deadline: float, calls: int = 3) -> None:
        """Size each cell's blocks from ``calls`` calls per side timed now, one side at a time
        (the workers' own estimates were taken while both were busy loading); not recorded.

        Blocks are ``block_ms`` long unless the budget left would then give fewer than
        TARGET_LOOKS looks' worth of rounds (many cells, short budget): then shorter, down to
        MIN_BLOCK_MS, since more pairs of noisier blocks beat too few pairs for any interval."""
        cells = [c for g in self.groups for c in g.cells]
        if time.monotonic() >= deadline:  # the set-up spent the budget: no pairs, nothing to size
            return
        started = time.monotonic()
        work_ms = 0.0
        for cell in cells:
            req = {"op": "block", "calls": calls, "warmup": self.s.warmup}
            est = [statistics.median(w.request({**req, "cell": cell.index[i]})["ms"])
                   for i, w in enumerate((self.a, self.b))]
            cell.est_ms = (est[0], est[1])
            work_ms += (calls + self.s.warmup) * (est[0] + est[1])
        if not cells:
            return
        # what a block costs beyond its calls: the round trip to the worker, the warm-up call
        overhead_ms = max(0.0, ((time.monotonic() - started) * 1e3 - work_ms) / (2 * len(cells)))
        rounds = self.schedule[min(TARGET_LOOKS, len(self.schedule)) - 1]
        left_ms = max(0.0, deadline - time.monotonic()) * 1e3
        fits = left_ms / (rounds * 2 * len(cells)) - overhead_ms
        self.block_ms = max(MIN_BLOCK_MS, min(self.s.block_ms, fits))
        self.overhead_ms = overhead_ms
        for cell in cells:
            cell.calls = calls_for(self.block_ms, cell.est_ms)
        full_round_ms = sum(2 * overhead_ms + c.calls * (c.est_ms[0] + c.est_ms[1]) for c in cells)
        rotate = self.s.rotate == "on" or (self.s.rotate == "auto" and full_round_ms * rounds > left_ms)
        if rotate:  # blocks back to block_ms: a round is now one case per group
            self.block_ms = self.s.block_ms
            for g in self.groups:
                g.rotating = len(g.cells) > 1
                self.rng.shuffle(g.cells)
                for cell in g.cells:
                    cell.calls = calls_for(self.block_ms, cell.est_ms)

    def _round(self) -> None:
        cells, owner = [], {}
        for g in self.active():
            mine = [g.cells[g.turn % len(g.cells)]] if g.rotating else g.cells
            g.turn += g.rotating
            cells += mine
            owner.update({id(c): g for c in mine})
        self.rng.shuffle(cells)
        duet = self.s.mode == "duet"
        flip = (self.rounds + self.core_start) % 2
        if duet:  # A on the first core in even rounds (from a random start), swapped in odd ones
            ca, cb = self.cores if not flip else self.cores[::-1]
            self.a.request({"op": "pin", "cores": [ca]})
            self.b.request({"op": "pin", "cores": [cb]})
        for cell in cells:
            # 0: A first; alternating over the cell's own pairs (a rotating cell skips rounds)
            first = (cell.start + len(cell.pairs)) % 2
            req = [{"op": "block", "cell": cell.index[i], "calls": cell.calls, "warmup": self.s.warmup,
                    "relayout": self.s.relayout} for i in (0, 1)]
            if duet:
                self.a.send(req[0])
                self.b.send(req[1])
                ms_a, ms_b = self.a.receive(300, "block")["ms"], self.b.receive(300, "block")["ms"]
            elif first == 0:
                ms_a = self.a.request(req[0])["ms"]
                ms_b = self.b.request(req[1])["ms"]
            else:
                ms_b = self.b.request(req[1])["ms"]
                ms_a = self.a.request(req[0])["ms"]
            stat = BLOCK_STATS[self.s.block_stat]
            med_a, med_b = stat(ms_a), stat(ms_b)
            cell.pairs.append((med_a, med_b, flip if duet else first))
            if owner[id(cell)].rotating:
                owner[id(cell)].values.append(math.log(med_b / med_a) if med_a > 0 and med_b > 0 else math.nan)
            cell.fastest.append((min(ms_a), min(ms_b)))
            cell.blocks[0].append(med_a)
            cell.blocks[1].append(med_b)
        self.rounds += 1

    def look(self, final: bool = False) -> None:
        """Judge every unsettled group at this look's level (``final``: the look at the end,
        with the share of alpha kept for it); settled ones leave the schedule."""
        k = len(self.looks) + 1
        level = look_alpha(self.s.alpha, k, len(self.groups), final)
        settled = 0
        for g in self.active():
            g.interval = shift_interval(g.round_values(), level)
            g.verdict = verdict(g.interval, self.s.min_effect)
            g.look = k
            if g.verdict != "undecided":
                g.settled_at = self.rounds
                settled += 1
        self.looks.append({"look": k, "pairs": self.rounds, "alpha_per_test": level, "settled": settled,
                           "final": final})

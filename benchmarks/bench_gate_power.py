"""Power of the speed gates: how often each one flags a plugin router slowed by a known
fraction of its own time, how often it flags routers that did not change, and its wall time.

    python benchmarks/bench_gate_power.py --trials 20 --out power.md             # quiet machine
    python benchmarks/bench_gate_power.py --trials 20 --load --out power-load.md  # one core busy

One scratch git repository (a temporary folder) holds a quickstart-sized suite (4 cases:
uniform, zipf, hot-experts and clustered traffic at T=4096, E=64, k=2, capacity 1.25; the
suite's default timing) and the test plugin of tests/fixtures/ab_plugin: one router class
`abplug` used under one label per fraction (``slow0``, ``slow2``, ... ``slow20``), beside the
built-in `topk` and `gshard`. Commit A has no slowdown; commit B makes each ``slowN`` busy-wait
N% of its own route time (``slow0`` stays at 0%: same code, other commit), so one trial tests
every fraction at once. Per trial and method:

- ``compare``: today's two-run gate: `moebench run` of A's tree, then of B's, then
  `moebench compare A B --metrics time` (default noise rule); a router is flagged when any of
  its medians is a regression.
- ``ab``: `moebench ab --base A --head B` (default settings, interleaved); flagged when any of
  its router-phases is `slower`.
- ``duet`` (with ``--methods ...,duet``): `moebench ab --mode duet`.
- ``ab-min`` (with ``--methods ...,ab-min``): `moebench ab --block-stat min` (a block's fastest
  call instead of its median: less noise from preempted calls).

The Markdown table (``--out``; docs/ci.md shows it) has one row per method and fraction: the
share of trials in which the slowed router was flagged (at 0% that is a false alarm), the
false alarms on the untouched routers (`topk`, `gshard`, all phases: flagged router-trials of
all router-trials), and the median wall time of a trial. ``--load`` runs a busy loop pinned to
one core for the whole benchmark (a shared CI runner).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "ab_plugin"
FRACTIONS = (0.0, 0.02, 0.05, 0.10, 0.20)
UNTOUCHED = ("topk", "gshard")  # built-in top-2 routers (switch is top-1 only: no cells at k=2)
METHODS = ("compare", "ab", "duet", "ab-min")


def label(fraction: float) -> str:
    return f"slow{round(fraction * 100)}"


def suite_text(fractions) -> str:
    plugins = "\n".join(f"  - {{name: abplug, params: {{slot: {label(f)}}}, label: {label(f)}}}" for f in fractions)
    return f"""# bench_gate_power.py: quickstart-sized cases, two built-in routers and the slowed plugin routers
name: gatepower
version: 1
defaults: {{hidden: 64, dtype: float32, device: cpu, seed: 0, drop_policy: position}}
grid:
  workload: [uniform, {{name: zipf, params: {{s: 1.2}}}}, {{name: hot_experts, params: {{hot: 2, fraction: 0.5}}}}, clustered]
  tokens: 4096
  experts: [64]
  top_k: [2]
  capacity_factor: [1.25]
routers:
  - topk
  - gshard
{plugins}
timing: {{warmup_rounds: 2, min_rounds: 5, max_rounds: 50, min_time_s: 0.01, threads: 2}}
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def make_repo(folder: Path, fractions) -> tuple[Path, str, str]:
    """The scratch repository and its commits A (no slowdown) and B (each slowN slowed N%)."""
    repo = folder / "repo"
    shutil.copytree(FIXTURE, repo, ignore=shutil.ignore_patterns("__pycache__", "suite.yaml"))
    (repo / "suite.yaml").write_text(suite_text(fractions))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "A: no slowdown")
    a = git(repo, "rev-parse", "HEAD")
    (repo / "abplug" / "slowdown.json").write_text(json.dumps({label(f): f for f in fractions}))
    (repo / "abplug" / "VERSION").write_text("2\n")
    git(repo, "commit", "-qam", "B: slowN busy-waits N% of its route time")
    return repo, a, git(repo, "rev-parse", "HEAD")


def moebench(*args: str, cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    # cwd first on sys.path (python -m): the tree's plugin and its .dist-info entry points
    return subprocess.run([sys.executable, "-m", "moebench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def trial_compare(trees: dict[str, Path], results: Path, quick: bool) -> tuple[dict, float]:
    """Two runs one after the other, then `compare --metrics time`: {router: flagged}."""
    start = time.monotonic()
    runs = {}
    for side in ("A", "B"):
        out = results / side
        done = moebench("run", "suite.yaml", "--no-report", "--results", str(out), *(["--quick"] if quick else []),
                        cwd=trees[side])
        if done.returncode != 0:
            raise RuntimeError(f"moebench run ({side}) failed: {done.stderr[-500:]}")
        runs[side] = next((out / "gatepower").iterdir())
    report = results / "compare.json"
    done = moebench("compare", str(runs["A"]), str(runs["B"]), "--metrics", "time", "--json", str(report), cwd=results)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"moebench compare failed: {done.stderr[-500:]}")
    flagged = defaultdict(bool)
    for row in json.loads(report.read_text())["rows"]:
        flagged[row["router"]] |= False  # measured: counted even when not flagged
        for v in row["metrics"].values():
            flagged[row["router"]] |= bool(v.get("regression"))
    return flagged, time.monotonic() - start


def trial_ab(repo: Path, a: str, b: str, results: Path, mode: str, budget: float | None,
             quick: bool, extra: tuple[str, ...] = ()) -> tuple[dict, float]:
    start = time.monotonic()
    args = ["ab", "suite.yaml", "--base", a, "--head", b, "--results", str(results), "--mode", mode, *extra]
    args += (["--budget-s", str(budget)] if budget else []) + (["--quick"] if quick else [])
    done = moebench(*args, cwd=repo)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"moebench ab failed: {done.stderr[-800:]}")
    doc = json.loads(next(results.glob("ab/gatepower/*/ab.json")).read_text())
    flagged = defaultdict(bool)
    for row in doc["summary"]:
        flagged[row["router"]] |= row["verdict"] == "slower"
    print(f"  ab: {doc['pairs']} pairs, stopped by {doc['stopped_by']}, blocks of {doc['block_ms']:.2g} ms, "
          f"{doc['wall_s']:.0f} s", file=sys.stderr)
    return flagged, time.monotonic() - start


def busy_loop() -> subprocess.Popen:
    """A process spinning on one core (the last one this process may use) for the whole run."""
    core = sorted(os.sched_getaffinity(0))[-1]
    code = f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def table(results: dict, trials: int, fractions, load: bool) -> str:
    lines = ["| method | load | injected slowdown | trials | slowed router flagged | untouched routers flagged "
             "| wall per trial (median) |", "|---|---|---|---|---|---|---|"]
    where = "busy loop on 1 core" if load else "none added"
    for method, per in results.items():
        walls = per["wall"]
        wall = f"{statistics.median(walls):.0f} s" if walls else "-"
        untouched = sum(per["untouched"])
        for f in fractions:
            hits = per["hits"][f]
            what = " (false alarm)" if f == 0 else ""
            lines.append(f"| {method} | {where} | {f:.0%} | {len(hits)} | {sum(hits)} of {len(hits)}{what} "
                         f"| {untouched} of {len(per['untouched'])} | {wall} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                   help="slowdowns as fractions, comma-separated (default 0,0.02,0.05,0.1,0.2)")
    p.add_argument("--methods", default="compare,ab", help=f"comma-separated of {', '.join(METHODS)}")
    p.add_argument("--load", action="store_true", help="a busy loop on one core during the whole benchmark")
    p.add_argument("--budget-s", type=float, help="moebench ab --budget-s (default: ab's own)")
    p.add_argument("--quick", action="store_true", help="--quick sizes in every run (smoke test of this script)")
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--keep", help="copy each ab trial's ab.json into this folder (t<N>-<method>.json)")
    args = p.parse_args(argv)
    fractions = tuple(float(x) for x in args.fractions.split(","))
    if 0.0 not in fractions:
        fractions = (0.0, *fractions)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))}")
    loader = busy_loop() if args.load else None
    results = {m: {"hits": defaultdict(list), "untouched": [], "wall": []} for m in methods}
    try:
        with tempfile.TemporaryDirectory(prefix="gate-power-") as tmp:
            tmp = Path(tmp)
            repo, a, b = make_repo(tmp, fractions)
            trees = {}
            for side, commit in (("A", a), ("B", b)):
                trees[side] = tmp / f"tree-{side}"
                git(repo, "worktree", "add", "--detach", str(trees[side]), commit)
            for t in range(args.trials):
                for method in methods:
                    out = tmp / f"t{t}-{method}"
                    out.mkdir()
                    if method == "compare":
                        flagged, wall = trial_compare(trees, out, args.quick)
                    else:
                        mode = "duet" if method == "duet" else "interleaved"
                        extra = ("--block-stat", "min") if method == "ab-min" else ()
                        flagged, wall = trial_ab(repo, a, b, out, mode, args.budget_s, args.quick, extra)
                        if args.keep:
                            Path(args.keep).mkdir(parents=True, exist_ok=True)
                            shutil.copy(next(out.glob("ab/gatepower/*/ab.json")), Path(args.keep) / f"t{t}-{method}.json")
                    r = results[method]
                    for f in fractions:
                        r["hits"][f].append(bool(flagged[label(f)]))
                    missing = [u for u in UNTOUCHED if u not in flagged]
                    if missing:
                        raise RuntimeError(f"{method}: untouched router(s) {missing} were not measured")
                    r["untouched"].extend(bool(flagged[u]) for u in UNTOUCHED)
                    r["wall"].append(wall)
                    shown = ", ".join(k for k, v in sorted(flagged.items()) if v) or "nothing"
                    print(f"trial {t + 1}/{args.trials} {method}: {wall:.0f} s, flagged {shown}", file=sys.stderr)
                if args.out:  # after every trial: a benchmark stopped early keeps what it measured
                    Path(args.out).write_text(table(results, t + 1, fractions, args.load))
    finally:
        if loader is not None:
            loader.kill()
            loader.wait()
    text = table(results, args.trials, fractions, args.load)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long a refused suite takes to refuse, and whether the refusal imported torch (#23 item 12).

The refused suites are the suite files of the hostile corpus that tests/test_hostile_inputs.py
generates (its `CORPUS`, imported, not copied: every probe that is ``validate FILE``), a
spread sample of them (``--limit``, default 40, taken at an even stride so every sort of
refusal is in it: bad YAML, binary and special files, includes, every field's wrong type and
range, unknown names). Each file goes through ``moebench validate F`` and
``moebench run F --results TMP --no-report`` as a fresh subprocess (what a user waits for:
interpreter start included), once per tree, the trees alternating in order file by file.

Each subprocess runs the CLI through a wrapper that afterwards writes, to a side file, which of
torch / scipy / numba / pandas were in ``sys.modules``: a refusal "imported torch" when torch
was. Printed per tree and command: refusals (exit 2), median / p90 / max seconds, and how many
imported torch; then how many (file, command) pairs gave the same exit code and stderr in
every tree.

    python benchmarks/bench_refusals.py                                # this tree
    git worktree add /tmp/refusal-before HEAD
    python benchmarks/bench_refusals.py --rev-path /tmp/refusal-before --rev-path .   # before | after

``--blocks`` takes instead the ``train:`` / ``parallel:`` refusals of the same file's extended
corpus (its `EXTENDED` probes train.*, parallel.*, model.* that validate one suite file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "numba", "pandas")
WRAPPER = (
    "import sys, json\n"
    "from moebench.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[2:])\n"
    "finally:\n"
    "    open(sys.argv[1], 'w').write(json.dumps([m for m in %r if m in sys.modules]))\n"
    "raise SystemExit(code)\n" % (HEAVY,)
)


def refused_suites(workdir: Path, limit: int, blocks: bool = False) -> list[tuple[str, str]]:
    """(probe id, file) of the corpus's suite probes, ``limit`` of them at an even stride;
    blocks: the extended corpus's train:/parallel: probes instead."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import test_hostile_inputs as hostile  # the generator, not a copy of it

    found = []
    if blocks:
        for pid, make in hostile.EXTENDED:
            if pid.split(".")[0] in ("train", "parallel", "model") and pid.endswith(".validate"):
                argv, _ = make(workdir)
                found.append((pid, argv[1]))
    for pid, make in [] if blocks else hostile.CORPUS:
        argv = make(workdir)
        if len(argv) == 2 and argv[0] == "validate" and "\x00" not in argv[1]:
            found.append((pid, argv[1]))
    if limit and len(found) > limit:
        step = len(found) / limit
        found = [found[int(i * step)] for i in range(limit)]
    return found


def one(tree: Path, argv: list[str], scratch: Path, timeout: float) -> dict:
    side = scratch / "heavy.json"
    side.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(side), *argv], cwd=scratch, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=timeout)
        code, err = proc.returncode, proc.stderr.strip()
    except subprocess.TimeoutExpired:
        code, err = "timeout", ""
    seconds = time.perf_counter() - start
    heavy = json.loads(side.read_text()) if side.exists() else None
    return {"code": code, "err": err, "seconds": seconds, "heavy": heavy}


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev-path", action="append", metavar="PATH",
                        help="a source tree to time (repeatable; default: this one)")
    parser.add_argument("--limit", type=int, default=40, help="how many refused suites (0: all; default 40)")
    parser.add_argument("--blocks", action="store_true",
                        help="the train:/parallel: refusals of the extended corpus instead")
    parser.add_argument("--commands", default="validate,run", help="which commands (default validate,run)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    args = parser.parse_args()
    trees = [Path(p).resolve() for p in (args.rev_path or [str(ROOT)])]
    commands = args.commands.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-refusals-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        suites = refused_suites(tmp / "corpus", args.limit, args.blocks)
        print(f"{len(suites)} refused suite files from tests/test_hostile_inputs.py"
              f"{' (train:/parallel: blocks)' if args.blocks else ''}; trees: "
              + ", ".join(str(t) for t in trees), flush=True)
        results: dict[tuple[str, str, str], dict] = {}
        for i, (pid, path) in enumerate(suites):
            for cmd in commands:
                argv = ["validate", path] if cmd == "validate" else \
                       ["run", path, "--results", str(tmp / "results"), "--no-report"]
                order = trees if i % 2 == 0 else trees[::-1]  # alternate which tree goes first
                for tree in order:
                    results[(str(tree), cmd, pid)] = one(tree, argv, tmp, args.timeout)
        print(f"\n{'tree':<34} {'command':<9} {'refused':>8} {'median s':>9} {'p90 s':>7} {'max s':>7} {'torch':>7}")
        for tree in trees:
            for cmd in commands:
                rows = [results[(str(tree), cmd, pid)] for pid, _ in suites]
                refused = [r for r in rows if r["code"] == 2]
                times = [r["seconds"] for r in refused] or [float("nan")]
                torch_ = sum(1 for r in refused if r["heavy"] and "torch" in r["heavy"])
                print(f"{str(tree)[-34:]:<34} {cmd:<9} {len(refused):>4}/{len(rows):<3} {statistics.median(times):>9.2f} "
                      f"{quantile(times, 0.9):>7.2f} {max(times):>7.2f} {torch_:>3}/{len(refused):<3}")
        if len(trees) > 1:
            same = [(pid, cmd) for pid, _ in suites for cmd in commands
                    if len({(results[(str(t), cmd, pid)]["code"], results[(str(t), cmd, pid)]["err"]) for t in trees}) == 1]
            print(f"\nsame exit code and stderr in every tree: {len(same)}/{len(suites) * len(commands)}")
            for pid, _ in suites:
                for cmd in commands:
                    if (pid, cmd) not in same:
                        print(f"  differs: {cmd} {pid}: " + " | ".join(
                            f"{results[(str(t), cmd, pid)]['code']} {results[(str(t), cmd, pid)]['err'][-160:]!r}" for t in trees))
        if args.json:
            Path(args.json).write_text(json.dumps([{"tree": t, "command": c, "probe": p, **r}
                                                   for (t, c, p), r in results.items()], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

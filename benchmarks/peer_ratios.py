"""How many times longer each peer's route takes than moebench's on the same semantics (#22).

Reads the rows of runs of suites/peers.yaml or suites/peers_decode.yaml (one process each: both
routers of a pair routed the same logits of the same case) and prints, per pair and per T, the
smallest, median and largest ratio peer route median / moebench route median over the cases
where both ran, and how many cells miss the issue's target (3x for Megatron-Core and HF, 2x for
Sinkhorn). Several runs (say before and after a change) are printed one under another:

    python benchmarks/peer_ratios.py before=results/peers_decode/RUN_A after=results/peers_decode/RUN_B

A RUN is a run folder or a results folder (its latest run), as `moebench compare` reads them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from moebench.compare.sides import load_side, num
from moebench.core.rows import ok_only

# (moebench router label, peer router label, the target ratio, what the pair shares)
PAIRS = (
    ("topk", "peer.megatron.topk_pre_softmax", 3.0, "softmax then top-k, raw weights"),
    ("topk_mixtral", "peer:megatron.topk", 3.0, "top-k of the logits, softmax over k (Megatron's default)"),
    ("topk_renorm", "peer:hf.mixtral", 3.0, "softmax, top-k, renormalised; dropless"),
    ("sinkhorn", "peer:megatron.sinkhorn", 2.0, "Sinkhorn selection, same tol"),
    ("topk", "peer:deepspeed.topkgating", None, "top-k of the softmax (DeepSpeed renormalises kept weights)"),
    ("switch", "peer:deepspeed.top1gating", None, "top-1 of the softmax"),
)


def route_medians(path: Path) -> dict[tuple[str, str], tuple[int, float]]:
    """(case_id, router) -> (tokens, route median ms) over the ok rows with a route time."""
    _, rows = load_side(path)  # a run folder, or a results folder: its latest run
    out = {}
    for row in ok_only(rows):
        ms = num(row.get("route.median_ms"))
        if ms and ms > 0:
            out[(row["case_id"], row["router"])] = (int(row["tokens"]), ms)
    return out


def pair_table(label: str, medians: dict) -> list[str]:
    lines = [f"### {label}", "",
             "| moebench | peer | T | cells | min | median | max | below target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    cases = {case for case, _ in medians}
    for ours, peer, target, _ in PAIRS:
        by_t: dict[int, list[float]] = {}
        for case in cases:
            a, b = medians.get((case, ours)), medians.get((case, peer))
            if a and b:
                by_t.setdefault(a[0], []).append(b[1] / a[1])
        for t in sorted(by_t):
            r = by_t[t]
            below = "-" if target is None else f"{sum(x < target for x in r)} (target {target:g}x)"
            lines.append(f"| {ours} | {peer} | {t} | {len(r)} | {min(r):.2f}x | {statistics.median(r):.2f}x | "
                         f"{max(r):.2f}x | {below} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="[LABEL=]RUN: a run folder, or a results folder (its latest run)")
    args = ap.parse_args(argv)
    out = ["Ratio = peer's route median / moebench's route median in the same case (higher: moebench faster).", ""]
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        out += pair_table(label or path, route_medians(Path(path)))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

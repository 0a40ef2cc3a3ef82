"""Conformance of moebench's routers with the peer systems' code, on identical logits.

    python -m moebench.run.peer_conformance [--tokens N] [--experts E] [--capacity-factor CF]
                                         [--workloads uniform,zipf] [--no-timing | --timing-only]
                                         [--out FILE]

For each pair (a moebench router, a peer adapter) whose semantics match, both route the same
logits with the same capacity and drop policy; the Markdown tables say how far they agree:

- ``selection``: fraction of tokens that chose the same set of experts (before capacity);
- ``kept``: |K_ours ∩ K_peer| / |K_ours ∪ K_peer| over kept (token, expert) assignments;
- ``drops``: dropped assignments of each, and whether the per-expert drop counts are equal;
- ``max |Δw|``: largest combine-weight difference over assignments both kept;
- ``peer convention``: the documented convention of the peer, and ``replayed``: whether
  moebench's capacity code (`keep_within_capacity`) with that convention's priority, applied to
  the peer's own selection, keeps exactly what the peer kept ("n/a" where the peer's order is
  random or implementation-defined: then only the per-expert drop counts can agree).

Then the capacity each system's formula gives for a few shapes, and (unless --no-timing) the
median time of moebench's ``route`` against the peer's own routing call (conversion to a
Routing excluded), measured in this one process with moebench.run.timing.measure.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.case import TimingSpec
from moebench.core.drop_policies import keep_within_capacity, stable_rank
from moebench.core.errors import MoebenchError
from moebench.peers.base import PeerSkip, library_problem
from moebench.routers.base import RouteContext, RouteInputs
from moebench.routers.registry import ROUTERS
from moebench.core.routing import Routing
from moebench.run.timing import CpuClock, measure, pinned_threads
from moebench.core.workloads import WORKLOADS, BatchShape, generator

ROUTER_STREAM = 1_000_000  # the runner's router stream: the same seeds a suite run uses

# How a peer ranks assignments for capacity (the `replayed` column): a priority over the peer's
# own assignments (flattened choice-major, as Routing is), lower served first; None: not replayable.
CONVENTIONS: dict[str, str] = {
    "weight": "highest combine weight first (Megatron: the renormalised top-k probability)",
    "raw_prob": "highest raw softmax probability first (DeepSpeed topkgating), weights renormalised after",
    "token_order": "token order within an expert, 1st and 2nd choices mixed (DeepSpeed topkgating position)",
    "choice_major": "all 1st choices in token order, then 2nd choices (GShard; DeepSpeed top2gating)",
    "topk_ties": "torch.topk(sorted=False) over a 0/1 map picks among tied tokens: implementation-defined",
    "rts": "Random Token Selection: uniform noise from torch's global RNG (not moebench's stream)",
    "dropless": "no capacity",
}


def replay_priority(routing: Routing, convention: str) -> torch.Tensor | None:
    """<int64>[A]: the priority the convention gives the routing's assignments, or None."""
    a = routing.expert_index.numel()
    if convention == "weight":
        return stable_rank(-routing.weight.float())
    if convention == "raw_prob":
        return stable_rank(-routing.probs[routing.token_index, routing.expert_index].float())
    if convention == "token_order":
        return routing.token_index * routing.top_k + routing.choice
    if convention == "choice_major":
        return torch.arange(a, device=routing.expert_index.device)
    return None


def replayed_kept(routing: Routing, convention: str) -> torch.Tensor | None:
    """<bool>[A]: what moebench's capacity code keeps of the routing's assignments under the convention."""
    if routing.capacity is None:
        return torch.ones_like(routing.kept)
    priority = replay_priority(routing, convention)
    if priority is None:
        return None
    return keep_within_capacity(routing.expert_index, priority, routing.capacity, routing.num_experts)


def _map(routing: Routing, which: torch.Tensor) -> torch.Tensor:
    """<bool>[T, E]: the (token, expert) pairs of the assignments selected by ``which``."""
    out = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.bool, device=routing.kept.device)
    out[routing.token_index[which], routing.expert_index[which]] = True
    return out


def _weights(routing: Routing) -> torch.Tensor:
    out = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.float32, device=routing.kept.device)
    out[routing.token_index[routing.kept], routing.expert_index[routing.kept]] = routing.weight[routing.kept].float()
    return out


def compare(ours: Routing, peer: Routing, convention: str | None = None) -> dict:
    """How far two routings of the same logits agree (see the module docstring)."""
    all_ours = torch.ones_like(ours.kept)
    all_peer = torch.ones_like(peer.kept)
    sel_ours, sel_peer = _map(ours, all_ours), _map(peer, all_peer)
    kept_ours, kept_peer = _map(ours, ours.kept), _map(peer, peer.kept)
    both = kept_ours & kept_peer
    union = int((kept_ours | kept_peer).sum())
    drops_ours = ours.demand() - ours.load()
    drops_peer = peer.demand() - peer.load()
    dw = (_weights(ours) - _weights(peer)).abs()[both]
    out = {
        "selection": float((sel_ours == sel_peer).all(dim=1).float().mean()),
        "kept": (int(both.sum()) / union) if union else 1.0,
        "only_ours": int((kept_ours & ~kept_peer).sum()),
        "only_peer": int((kept_peer & ~kept_ours).sum()),
        "drops_ours": int(drops_ours.sum()),
        "drops_peer": int(drops_peer.sum()),
        "per_expert_drops_equal": bool(torch.equal(drops_ours, drops_peer)),
        "max_dw": float(dw.max()) if dw.numel() else 0.0,
        "capacity_ours": ours.capacity,
        "capacity_peer": peer.capacity,
    }
    if convention is not None:
        replay = replayed_kept(peer, convention)
        out["replayed"] = None if replay is None else bool(torch.equal(replay, peer.kept))
    return out


@dataclass(frozen=True)
class Pair:
    """A moebench router and a peer adapter that implement the same routing.

    conventions: drop policy -> the peer's convention under it (CONVENTIONS key); a policy
    missing here is not run for this pair. ``None`` (dropless) is always run.
    note: what differs between the two besides the drop ranking.
    """

    label: str
    ours: tuple[str, dict]
    peer: tuple[str, dict]
    top_k: int
    conventions: dict[str, str] = field(default_factory=dict)
    note: str = ""
    dropless: bool = True


PAIRS: tuple[Pair, ...] = (
    Pair("megatron topk (softmax after top-k)", ("topk", {"softmax_after_topk": True}), ("peer:megatron.topk", {}), 2,
         {"probs": "weight", "position": "topk_ties"},
         "Megatron ranks `probs` drops by the renormalised weight, as moebench does"),
    Pair("megatron topk (pre-softmax)", ("topk", {}), ("peer:megatron.topk", {"use_pre_softmax": True}), 2,
         {"probs": "weight"}, "weights are the raw softmax probabilities in both", dropless=False),
    Pair("megatron topk (sigmoid)", ("topk", {"score": "sigmoid", "renormalize": True}),
         ("peer:megatron.topk", {"score_function": "sigmoid"}), 2, {"probs": "weight"},
         "sigmoid scores renormalised over the top-k", dropless=False),
    Pair("megatron sinkhorn", ("sinkhorn", {}), ("peer:megatron.sinkhorn", {}), 2, {"probs": "weight"},
         "Megatron's Sinkhorn runs in fp32 without a row shift; moebench's shifts each row by its max, "
         "stores exp in fp32 and iterates in fp64"),
    Pair("deepspeed topkgating vs topk renormalised",
         ("topk", {"renormalize": True, "renormalize_after_drop": True}), ("peer:deepspeed.topkgating", {}), 2,
         {"probs": "raw_prob", "position": "token_order"},
         "DeepSpeed ranks `probs` by the raw probability, moebench by the (renormalised) weight; "
         "DeepSpeed's `position` is token order, moebench's is choice-major; both renormalise the "
         "weights over the kept routes (moebench: renormalize_after_drop)"),
    Pair("deepspeed topkgating vs topk raw", ("topk", {}), ("peer:deepspeed.topkgating", {}), 2,
         {"probs": "raw_prob"}, "both rank by the raw probability; DeepSpeed's weights are renormalised over kept routes",
         dropless=False),
    Pair("deepspeed top2gating vs gshard", ("gshard", {"second_expert_sampling": False, "renormalize_after_drop": True}),
         ("peer:deepspeed.top2gating", {}), 2, {"position": "choice_major"},
         "both GShard top-2 without sampling; both renormalise the gates over the kept routes "
         "(moebench: renormalize_after_drop)"),
    Pair("deepspeed top1gating vs switch", ("switch", {}), ("peer:deepspeed.top1gating", {}), 1,
         {"position": "topk_ties", "random": "rts"},
         "without RTS DeepSpeed keeps whichever tied tokens torch.topk returns; with RTS its noise is its own"),
    Pair("hf mixtral vs topk renormalised", ("topk", {"renormalize": True}), ("peer:hf.mixtral", {}), 2, {},
         "dropless; HF takes the top-k of the fp32 softmax and renormalises, as moebench does"),
)


def _inputs(workload: str, tokens: int, experts: int, seed: int) -> RouteInputs:
    name, params = (workload, {}) if workload != "zipf" else ("zipf", {"s": 1.2})
    return WORKLOADS.create(name, params).batch(BatchShape(tokens, experts, 16, "cpu", torch.float32), seed, 0)


def _ctx(top_k: int, capacity: int | None, policy: str, seed: int) -> RouteContext:
    return RouteContext(top_k, capacity, policy, generator("cpu", seed, ROUTER_STREAM))


def _router(name: str, params: dict):
    try:
        router = ROUTERS.create(name, params)
    except MoebenchError as exc:
        return None, str(exc)
    return router, None


def pair_rows(pair: Pair, tokens: int, experts: int, capacity_factor: float, workloads: list[str],
              seed: int = 0) -> list[dict]:
    """One row per (workload, policy) of the pair: compare() plus the case and the convention."""
    ours, problem = _router(*pair.ours)
    peer, peer_problem = _router(*pair.peer)
    problem = problem or peer_problem
    if problem is None:
        problem = ours.applicable(pair.top_k, experts) or peer.applicable(pair.top_k, experts)
    settings = [(p, c) for p, c in pair.conventions.items()] + ([(None, "dropless")] if pair.dropless else [])
    rows = []
    for workload in workloads:
        inputs = _inputs(workload, tokens, experts, seed)
        for policy, convention in settings:
            cf = None if policy is None else capacity_factor
            capacity = expert_capacity(CapacitySpec(cf), tokens, experts, pair.top_k)
            row = {"pair": pair.label, "workload": workload, "policy": policy or "dropless",
                   "convention": convention, "note": pair.note}
            if problem:
                rows.append({**row, "status": f"skipped: {problem}"})
                continue
            ctx_policy = policy or "position"
            try:
                a = ours.route(inputs, _ctx(pair.top_k, capacity, ctx_policy, seed))
                b = peer.route(inputs, _ctx(pair.top_k, capacity, ctx_policy, seed))
            except PeerSkip as exc:
                rows.append({**row, "status": f"skipped: {exc}"})
                continue
            rows.append({**row, "status": "ok", **compare(a, b, convention)})
    return rows


def capacity_rows(shapes=((65536, 64, 2, 1.25), (4096, 64, 2, 1.1), (1000, 10, 1, 1.1), (1000, 10, 2, 1.1),
                          (100, 64, 1, 1.0), (2048, 64, 1, 0.1))) -> list[dict]:
    """Capacity per expert under each system's formula, for (T, E, k, cf)."""
    mu = sm = None
    if library_problem("megatron.core.transformer.moe.router", "megatron-core") is None:
        from megatron.core.transformer.moe import moe_utils as mu
    if library_problem("deepspeed.moe.sharded_moe", "deepspeed") is None:
        from deepspeed.moe import sharded_moe as sm
    from moebench.peers.deepspeed_moe import deepspeed_capacity
    from moebench.peers.megatron_core import megatron_capacity

    rows = []
    for t, e, k, cf in shapes:
        row = {"T": t, "E": e, "k": k, "cf": cf,
               "moebench ceil(cf·k·T/E)": expert_capacity(CapacitySpec(cf), t, e, k),
               "exact cf·k·T/E": f"{cf * k * t / e:g}"}
        row["Megatron get_capacity(T·k, E, cf)"] = megatron_capacity(mu, t, e, k, cf) if mu else "n/a"
        if sm:
            row["DeepSpeed _capacity(cf·k), min 0"] = deepspeed_capacity(sm, t, e, cf * k, 0)
            row["DeepSpeed, TopKGate min_capacity=8"] = deepspeed_capacity(sm, t, e, cf * k, 8)
        else:
            row["DeepSpeed _capacity(cf·k), min 0"] = row["DeepSpeed, TopKGate min_capacity=8"] = "n/a"
        rows.append(row)
    return rows


DEFAULT_TIMING = TimingSpec(warmup_rounds=1, min_rounds=5, max_rounds=20, min_time_s=0.2, threads=2)


def _alternating(ours, peer, timing: TimingSpec, clock, blocks: int) -> tuple[float, float, str]:
    """Median of ``blocks`` block medians of each, measured ours, peer, ours, peer, ... so that a
    change of machine load during the measurement hits both sides alike."""
    ours_medians, peer_medians, rounds = [], [], [0, 0]
    for _ in range(blocks):
        a, b = measure(ours, timing, clock), measure(peer, timing, clock)
        ours_medians.append(a.median)
        peer_medians.append(b.median)
        rounds[0] += a.rounds
        rounds[1] += b.rounds
    return statistics.median(ours_medians), statistics.median(peer_medians), f"{blocks}x: {rounds[0]}/{rounds[1]}"


def time_rows(pairs: tuple[Pair, ...], tokens: int, experts: int, capacity_factor: float,
              timing: TimingSpec = DEFAULT_TIMING, seed: int = 0, workload: str = "uniform", blocks: int = 3) -> list[dict]:
    """Median route time of moebench vs the peer's routing call, same logits, same process,
    in ``blocks`` alternating blocks (see _alternating)."""
    clock = CpuClock()
    rows = []
    inputs = _inputs(workload, tokens, experts, seed)
    with pinned_threads(timing.threads):
        for pair in pairs:
            ours, p1 = _router(*pair.ours)
            peer, p2 = _router(*pair.peer)
            problem = p1 or p2 or ours.applicable(pair.top_k, experts) or peer.applicable(pair.top_k, experts)
            policy = next(iter(pair.conventions), None)
            cf = None if policy is None else capacity_factor
            capacity = expert_capacity(CapacitySpec(cf), tokens, experts, pair.top_k)
            row = {"pair": pair.label, "policy": policy or "dropless", "T": tokens, "E": experts, "k": pair.top_k}
            if problem:
                rows.append({**row, "status": f"skipped: {problem}"})
                continue
            ctx = _ctx(pair.top_k, capacity, policy or "position", seed)
            try:
                peer_call = peer.native(inputs, ctx)
            except PeerSkip as exc:
                rows.append({**row, "status": f"skipped: {exc}"})
                continue
            ours_ms, peer_ms, rounds = _alternating(lambda: ours.route(inputs, ctx), peer_call, timing, clock, blocks)
            rows.append({**row, "status": "ok", "moebench_ms": ours_ms, "peer_ms": peer_ms,
                         "peer/moebench": peer_ms / ours_ms if ours_ms > 0 else math.nan, "rounds": rounds})
        if any(p.peer[0] == "peer:hf.mixtral" for p in pairs) and library_problem(
                "transformers.models.mixtral.modeling_mixtral", "transformers") is None:
            eye = torch.eye(experts)
            gate = measure(lambda: torch.nn.functional.linear(inputs.logits, eye), timing, clock)
            rows.append({"pair": "(HF identity gate matmul alone)", "policy": "dropless", "T": tokens, "E": experts,
                         "k": "", "status": "ok", "moebench_ms": math.nan, "peer_ms": gate.median,
                         "peer/moebench": math.nan, "rounds": f"1x: -/{gate.rounds}"})
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, heading) columns; a skipped row spans its reason."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row.get("status", "ok") != "ok":
            cells = [_fmt(row.get(k, "")) for k, _ in columns[:3]] + [row["status"]] + [""] * (len(columns) - 4)
        else:
            cells = [_fmt(row.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


CONFORMANCE_COLUMNS = [
    ("pair", "pair"), ("workload", "workload"), ("policy", "policy"), ("selection", "same selection"),
    ("kept", "kept agree"), ("only_ours", "only moebench"), ("only_peer", "only peer"),
    ("drops_ours", "drops moebench"), ("drops_peer", "drops peer"), ("per_expert_drops_equal", "per-expert drops equal"),
    ("max_dw", "max |Δw|"), ("capacity_ours", "C"), ("convention", "peer convention"), ("replayed", "replayed"),
]
TIME_COLUMNS = [("pair", "pair"), ("policy", "policy"), ("T", "T"), ("status", "status"), ("moebench_ms", "moebench ms"),
                ("peer_ms", "peer ms"), ("peer/moebench", "peer / moebench"), ("rounds", "rounds")]


def report(tokens: int, experts: int, capacity_factor: float, workloads: list[str], timing: bool, seed: int = 0,
           stream=None, conformance: bool = True) -> None:
    """Print every table (conformance, conventions, capacities, and times) to ``stream`` (stdout)."""
    w = (stream or sys.stdout).write
    w(f"# moebench vs peers: T={tokens}, E={experts}, cf={capacity_factor}, seed={seed}\n\n")
    if conformance:
        _conformance_tables(w, tokens, experts, capacity_factor, workloads, seed)
    if timing:
        w("## Route time, one process (moebench.run.timing.measure in 3 alternating blocks, "
          f"{DEFAULT_TIMING.threads} threads, uniform workload)\n\n")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        rows = time_rows(PAIRS, tokens, experts, capacity_factor, seed=seed)
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        w(markdown(rows, TIME_COLUMNS) + "\n\n")
        w(f"Medians in ms of `route` (moebench) and of the peer's own routing call (no conversion); "
          f"1-min load average {load:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.\n")


def _conformance_tables(w, tokens, experts, capacity_factor, workloads, seed) -> None:
    w("## Conformance on identical logits (same capacity C, same drop policy)\n\n")
    rows = [r for pair in PAIRS for r in pair_rows(pair, tokens, experts, capacity_factor, workloads, seed)]
    w(markdown(rows, CONFORMANCE_COLUMNS) + "\n\n")
    w("Peer conventions:\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in CONVENTIONS.items()) + "\n\n")
    w("Pair notes:\n\n" + "\n".join(f"- {p.label}: {p.note}" for p in PAIRS if p.note) + "\n\n")
    w("## Capacity per expert by formula\n\n")
    cap = capacity_rows()
    w(markdown(cap, [(k, k) for k in cap[0]]) + "\n\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moebench.run.peer_conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--workloads", default="uniform,zipf", help="comma-separated: uniform, zipf (s=1.2), ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-timing", action="store_true", help="skip the time-ratio table")
    parser.add_argument("--timing-only", action="store_true", help="only the time-ratio table")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if args.out:
        import io

        buf = io.StringIO()
        report(args.tokens, args.experts, args.capacity_factor, workloads, not args.no_timing, args.seed, buf,
               conformance=not args.timing_only)
        sys.stdout.write(buf.getvalue())
        with open(args.out, "w") as fh:
            fh.write(buf.getvalue())
    else:
        report(args.tokens, args.experts, args.capacity_factor, workloads, not args.no_timing, args.seed,
               conformance=not args.timing_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rows of parallel cases: one flat row per case x router, from the engine or the cost model.

Engine rows (``parallel.mode: engine``) hold what the ranks measured on the stream's last
batch: ``byte_matrix`` (JSON [ep][ep], dispatch bytes from rank i to rank j), ``tokens_per_rank``
(JSON, rows each rank's experts processed), ``rank_imbalance`` (max / mean of those; beside it
``rank_imbalance_contiguous``, the same routing on the contiguous layout: the "before" of EPLB),
``straggler_ratio`` (slowest rank's layer time / mean), per-phase times (max over ranks of each
rank's median), and ``exchange_matches_routing`` (the counts the ranks exchanged equal the ones
recomputed here from their Routings). Routing metrics are the runner's, over the shards'
Routings joined into one. Model rows (``mode: model``) hold ``model.ep<N>.*`` predictions.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Iterator

import torch

from moebench.core.case import Case
from moebench.core.routing_check import check_routing
from moebench.core.metrics import expert_loads, mean_over_batches, routing_metrics
from moebench.kinds.parallel import costmodel
from moebench.kinds.parallel.memory import memory_problem
from moebench.kinds.parallel.layer import concat_routings, global_batches, route_shard
from moebench.kinds.parallel.placement import Placement, contiguous, make_placement, rank_imbalance
from moebench.kinds.parallel.plan import rank_plan, shard_bounds
from moebench.kinds.parallel.spec import ELEMENT_BYTES, ParallelSpec
from moebench.routers.registry import ROUTERS
from moebench.run.runner import RowResult, exit_reason

BYTE_MATRIX_MAX_EP = 64  # larger matrices are left out of rows (an EP-1024 matrix has 1M entries)


def parallel_rows(suite, case: Case, timing, base_row: dict, skip: set[str]) -> Iterable[RowResult]:
    """The session's hook (`moebench.run.session.case_rows`) for suites with a ``parallel:`` block."""
    spec: ParallelSpec = suite.parallel
    base = {**base_row, **case.axes(), **spec.as_row()}
    routers = [r for r in suite.routers if r.display not in skip]
    if spec.mode == "model":
        return model_rows(case, spec, routers, base)
    rounds = timing.min_rounds if timing.enabled else 0
    return fitting_engine_rows(case, spec, routers, base, timing.threads, timing.warmup_rounds if rounds else 0, rounds)


def fitting_engine_rows(case: Case, spec: ParallelSpec, routers, base: dict, threads=None, warmup: int = 2,
                        rounds: int = 5) -> Iterator[RowResult]:
    """`engine_rows` for the routers whose memory estimate fits (memory.py: the sum over the
    local ranks), checked before any rank starts; the others are skipped rows saying why."""
    problems = {r.display: memory_problem(case, spec, r, routers=len(routers)) for r in routers}
    fitting = [r for r in routers if not problems[r.display]]
    ran = iter(engine_rows(case, spec, fitting, base, threads, warmup, rounds) if fitting else ())
    for named in routers:  # rows in the suite's router order
        if problems[named.display]:
            yield RowResult({**_row(base, named), "status": "skipped", "reason": problems[named.display]}, [])
        else:
            row = next(ran, None)
            if row is not None:
                yield row
    yield from ran


def _row(base: dict, named) -> dict:
    return {**base, "router": named.display, "router_name": named.name, "router_params": named.params_json(),
            "status": "ok", "reason": None}


def _inter_node(rows: torch.Tensor, per_node: int) -> float:
    """Share of the rows <int>[ep, ep] that cross nodes of ``per_node`` ranks."""
    node = torch.arange(rows.shape[0]) // per_node
    total = int(rows.sum())
    return float(rows[node[:, None] != node[None, :]].sum()) / total if total else 0.0


def _ratio(x: torch.Tensor) -> float:
    mean = float(x.double().mean())
    return float(x.max()) / mean if mean > 0 else math.nan


# ------------------------------------------------------------------------------- engine

def engine_rows(case: Case, spec: ParallelSpec, routers, base: dict, threads=None, warmup: int = 2,
                rounds: int = 5, fault: dict | None = None, keep_outputs: bool = False,
                records_out: list | None = None) -> Iterator[RowResult]:
    """Launch the ranks for one case and turn rank 0's records into rows (``records_out``,
    when given, also receives the raw records: tests read the gathered outputs there)."""
    from moebench.kinds.parallel.engine import EngineJob
    from moebench.kinds.parallel.launch import LaunchFailure, launch

    if case.device.startswith("cuda") and not torch.cuda.is_available():
        for named in routers:
            yield RowResult({**_row(base, named), "status": "skipped", "reason": "CUDA is not available on this machine"}, [])
        return
    job = EngineJob(case, tuple(routers), frozenset(), spec, threads, warmup, rounds, keep_outputs, fault)
    try:
        records = launch(job)
    except LaunchFailure as exc:
        if len(routers) == 1:
            yield _error_row(base, routers[0], f"LaunchFailure: {exc}")
            return
        # a rank died (a router that segfaults or kills its process, a hang): relaunch each
        # router alone, so that only the one at fault loses its row (the fault test hook stays
        # with the router it was armed for, the first)
        for i, named in enumerate(routers):
            yield from engine_rows(case, spec, [named], base, threads, warmup, rounds, fault if i == 0 else None,
                                   keep_outputs, records_out)
        return
    if records_out is not None:
        records_out.extend(records)
    for record in records:
        yield engine_row(case, spec, record, base)


def _error_row(base: dict, named, reason: str) -> RowResult:
    """An error row of a parallel case: ``redo_on_resume`` makes ``--resume`` run it again
    (moebench.store.runs.RunDir.finished_keys), since a dead rank or a timeout may not recur."""
    return RowResult({**_row(base, named), "status": "error", "reason": reason, "redo_on_resume": True}, [])


def engine_row(case: Case, spec: ParallelSpec, record: dict, base: dict) -> RowResult:
    """The RowResult of one router's record from rank 0 (see the module docstring)."""
    named = record["router"]
    row = _row(base, named)
    if record["status"] == "error":
        return _error_row(base, named, record["reason"])
    if record["status"] != "ok":
        row.update(status=record["status"], reason=record["reason"])
        return RowResult(row, [])
    world = record["world_size"]
    per_batch, first_loads = [], None
    for gathered in record["batches"]:
        routing = concat_routings([g["routing"] for g in gathered])
        per_batch.append(routing_metrics(routing))
        if first_loads is None:
            first_loads = [float(x) for x in expert_loads(routing).tolist()]
    last = record["batches"][-1]
    routing = concat_routings([g["routing"] for g in last])
    placement = Placement(last[0]["slot_expert"], world, case.experts, last[0]["policy"])
    sent = torch.stack([g["send"] for g in last])  # [ep, ep]: rows i -> j
    received = torch.stack([g["recv"] for g in last]).T  # rank j's counts by source, as i -> j
    recomputed = torch.stack([
        rank_plan(g["routing"], placement, shard_bounds(case.tokens, world, r)[0]).input_splits
        for r, g in enumerate(last)])
    rows_per_rank = sent.sum(0)
    element = ELEMENT_BYTES[case.dtype]
    timed = [g["timed"] for g in last]
    rank_layer = torch.tensor([t["layer"] for t in timed])
    rank_expert = torch.tensor([t["experts"] for t in timed])
    global_load = routing.load().double()
    row.update(mean_over_batches(per_batch))
    row.update({
        "backend": record["backend"], "world_size": world, "ep": world, "nodes": spec.nodes,
        "placement_policy": placement.policy, "capacity": routing.capacity,
        "byte_matrix": json.dumps((sent * case.hidden * element).tolist()),
        "tokens_per_rank": json.dumps(rows_per_rank.tolist()),
        "slot_expert": json.dumps(placement.slot_expert.tolist()),
        "rank_imbalance": _ratio(rows_per_rank),
        "rank_imbalance_contiguous": (rank_imbalance(contiguous(case.experts, world).rank_loads(global_load))
                                      if case.experts % world == 0 else None),
        "tokens_conserved": bool(int(sent.sum()) == int(routing.kept.sum()) == int(received.sum())),
        "exchange_matches_routing": bool(torch.equal(sent, received) and torch.equal(sent, recomputed)),
        "remote_fraction": float(1 - sent.diagonal().sum() / sent.sum()) if int(sent.sum()) else 0.0,
        "inter_node_fraction": _inter_node(sent, world // spec.nodes),
        "rank_layer_ms": json.dumps([round(float(x), 4) for x in rank_layer]),
        "rank_expert_ms": json.dumps([round(float(x), 4) for x in rank_expert]),
        "straggler_ratio": _ratio(rank_layer),
        "expert_straggler_ratio": _ratio(rank_expert),
        "layer_ms": float(rank_layer.max()),
        "a2a_ms": max(t["a2a"] for t in timed),
        "expert_ms": float(rank_expert.max()),
        **{f"{p}_ms": max(t[p] for t in timed) for p in ("permute", "dispatch", "combine", "unpermute")},
        **_slowest_rank_ci(timed),
    })
    key = {"run_id": row.get("run_id"), "case_id": row["case_id"], "router": row["router"]}
    batches = [{**key, "batch": b, **m} for b, m in enumerate(per_batch)] if case.batches > 1 else []
    return RowResult(row, batches, {**key, "batch": 0, "loads": first_loads})


# -------------------------------------------------------------------------------- model

def model_profile(spec: ParallelSpec):
    from moebench.kinds.parallel.profiles import BUILTIN

    if spec.profile == "gloo_local":
        from moebench.kinds.parallel.pingpong import local_profile

        return local_profile(spec.timeout_s)
    return BUILTIN[spec.profile]


def model_rows(case: Case, spec: ParallelSpec, routers, base: dict) -> Iterator[RowResult]:
    batches = None
    for named in routers:
        row = _row(base, named)
        problem = memory_problem(case, spec, named)  # before the batches are made
        if problem:
            yield RowResult({**row, "status": "skipped", "reason": problem}, [])
            continue
        try:
            if batches is None:
                batches = global_batches(case, "cpu")
            yield _model_row(case, spec, named, batches, row)
        except SystemExit as exc:  # a router's sys.exit must not end the run (Ctrl-C still does)
            yield _error_row(base, named, exit_reason(exc))
        except Exception as exc:  # noqa: BLE001 (a fault becomes an error row; the run goes on)
            yield _error_row(base, named, f"{type(exc).__name__}: {exc}".strip())


def model_matrix(routing, placement: Placement, tokens: int) -> torch.Tensor:
    """<int64>[ep, ep]: rows from rank i (tokens [i*T/ep, (i+1)*T/ep)) to rank j for one
    global Routing on ``placement`` (vectorised: EP 1024 is a 1M-entry bincount)."""
    ep = placement.ep
    kept = routing.kept
    token, expert = routing.token_index[kept], routing.expert_index[kept]
    src = token // (tokens // ep)
    dst = placement.slot_of(expert, token) // placement.slots_per_rank
    return torch.bincount(src * ep + dst, minlength=ep * ep).view(ep, ep)


def _model_row(case: Case, spec: ParallelSpec, named, batches, row: dict) -> RowResult:
    router = ROUTERS.create(named.name, named.params)
    problem = router.applicable(case.top_k, case.experts)
    if problem:
        row.update(status="skipped", reason=problem)
        return RowResult(row, [])
    state = router.init_state(case.experts, torch.device("cpu"))
    history, per_batch, routing, first_loads = None, [], None, None
    for b, inputs in enumerate(batches):
        # the global batch, one shard; checked before the placement reads its indices
        routing = check_routing(route_shard(router, inputs, case, 0, b, state), named.display)
        if routing.soft is not None:
            row.update(status="skipped", reason="Soft MoE has no token-to-expert assignments to dispatch")
            return RowResult(row, [])
        load = routing.load().double()
        if first_loads is None:
            first_loads = [float(x) for x in load.tolist()]
        estimate = {"oracle": load, "uniform": None}.get(spec.load_estimate, history)
        history = load if history is None else spec.ema_alpha * load + (1 - spec.ema_alpha) * history
        per_batch.append(routing_metrics(routing))
        router.update_state(state, routing)
    profile = model_profile(spec)
    d_bytes = spec.dispatch_bytes or ELEMENT_BYTES[case.dtype]
    c_bytes = spec.combine_bytes or ELEMENT_BYTES[case.dtype]
    hidden = spec.wire_hidden or case.hidden
    flops = costmodel.mlp_flops_per_row(hidden, spec.ffn_hidden) if spec.experts == "mlp" else 0.0
    row.update(mean_over_batches(per_batch))
    row.update({"wire_hidden": hidden, "profile": profile.name, "profile_source": profile.source, "ep_sizes": json.dumps(list(spec.ep))})
    for ep in spec.ep:
        nodes = max(1, ep // profile.gpus_per_node)
        groups = spec.groups or nodes
        policy = spec.eplb_policy if case.experts % groups == 0 else "global"
        placement = make_placement(spec.placement, estimate, case.experts, ep, spec.redundant_experts,
                                   groups, nodes, policy)
        m = model_matrix(routing, placement, case.tokens)
        t = costmodel.layer_times(m * hidden * d_bytes, m.T * hidden * c_bytes, m.sum(0), profile, flops)
        p = f"model.ep{ep}."
        row.update({
            p + "dispatch_ms": float(t["dispatch"].max()) * 1e3, p + "combine_ms": float(t["combine"].max()) * 1e3,
            p + "expert_ms": float(t["experts"].max()) * 1e3, p + "layer_ms": t["layer"] * 1e3,
            p + "rank_imbalance": _ratio(m.sum(0)), p + "straggler_ratio": _ratio(t["rank_layer"]),
            p + "remote_fraction": float(1 - m.diagonal().sum() / m.sum()) if int(m.sum()) else 0.0,
        })
        if ep == spec.ep[0] and ep <= BYTE_MATRIX_MAX_EP:
            row.update(ep=ep, byte_matrix=json.dumps((m * hidden * d_bytes).tolist()),
                       tokens_per_rank=json.dumps(m.sum(0).tolist()), rank_imbalance=_ratio(m.sum(0)),
                       slot_expert=json.dumps(placement.slot_expert.tolist()), placement_policy=placement.policy)
    key = {"run_id": row.get("run_id"), "case_id": row["case_id"], "router": row["router"]}
    batches_out = [{**key, "batch": b, **m} for b, m in enumerate(per_batch)] if case.batches > 1 else []
    return RowResult(row, batches_out, {**key, "batch": 0, "loads": first_loads})


def _slowest_rank_ci(timed: list[dict]) -> dict:
    """``<phase>_ms_ci_low/high``: the 95% CI of the median of the rank whose median is the
    phase's column (the slowest rank sets the layer's time); None where too few rounds."""
    out = {}
    for phase in ("layer", "a2a", "experts", "permute", "dispatch", "combine", "unpermute"):
        if not all("ci" in t for t in timed):
            break
        slowest = max(timed, key=lambda t: t[phase])
        low, high = slowest["ci"][phase]
        column = "expert" if phase == "experts" else phase
        out[f"{column}_ms_ci_low"], out[f"{column}_ms_ci_high"] = low, high
    return out

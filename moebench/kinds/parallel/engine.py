"""The expert-parallel engine: every rank runs this under torch.distributed (gloo or NCCL).

Per router and batch each rank routes its shard (`moebench.kinds.parallel.layer`), agrees with the
others on the placement (global expert loads by all_reduce, so EPLB gives every rank the
same plan), and runs the layer as Megatron-Core's all-to-all dispatcher does:

1. permute: gather its kept rows into (destination rank, local slot) order;
2. dispatch: all_to_all_single of the [ep, L] row counts, then of the rows (input splits:
   rows per destination; output splits: rows per source);
3. experts: the received rows regrouped from [source][slot] to [slot][source] chunks, each
   local slot's expert on its rows, and back;
4. combine: all_to_all_single of the outputs with the splits swapped;
5. unpermute: weighted scatter-add into the shard's tokens, in moebench.core.dispatch's order.

The layer runs untimed once per batch (its outputs and exchanged counts are what the row
checks); on the stream's last batch it is then timed: ``warmup`` + ``rounds`` calls, each
after a barrier, each phase on the rank's own clock (CUDA synchronised). Rank 0 gathers
everything with gather_object and returns it. A collective that fails or times out
(``init_process_group(timeout=parallel.timeout_s)``) raises `RankFailure`.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moebench.core.case import Case, NamedSpec
from moebench.core.errors import MoebenchError
from moebench.core.routing_check import check_routing
from moebench.core.timing_stats import summarize
from moebench.kinds.parallel.layer import DTYPES, Experts, global_batches, route_shard, shard_inputs
from moebench.kinds.parallel.placement import make_placement
from moebench.kinds.parallel.plan import RankPlan, rank_plan, shard_bounds
from moebench.kinds.parallel.spec import ParallelSpec
from moebench.routers.registry import ROUTERS
from moebench.run.runner import exit_reason

PHASES = ("permute", "dispatch", "experts", "combine", "unpermute")


class RankFailure(MoebenchError):
    """A collective failed or timed out: a rank died or hung."""


@dataclass(frozen=True)
class EngineJob:
    """What every rank runs: one case, its routers, the parallel block.

    keep_outputs: gather every rank's combined outputs to rank 0 (tests).
    fault: tests only: {"rank": r, "at": phase, "kind": "exit" | "hang"} makes rank r exit or
    hang when it reaches that phase of the first router's last batch.
    """

    case: Case
    routers: tuple[NamedSpec, ...]
    skip: frozenset
    spec: ParallelSpec
    threads: int | None = None
    warmup: int = 2
    rounds: int = 5
    keep_outputs: bool = False
    fault: dict | None = None


def backend_for(spec: ParallelSpec, device: str) -> str:
    if spec.backend != "auto":
        return spec.backend
    return "nccl" if device.startswith("cuda") else "gloo"


def ensure_group(backend: str, timeout_s: float) -> None:
    """Join the process group torchrun / the launcher described in the environment."""
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))


def _device(case: Case, backend: str) -> str:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return case.device if not case.device.startswith("cuda") else "cuda"


def _fault(job: EngineJob, rank: int, at: str, armed: bool) -> None:
    f = job.fault
    if armed and f and f.get("rank") == rank and f.get("at") == at:
        if f.get("kind") == "hang":
            time.sleep(1e6)
        os._exit(3)


class _Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def run_layer(hidden: torch.Tensor, plan: RankPlan, local_experts: list[int], experts: Experts,
              clock: _Clock, fault=lambda at: None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One rank's layer: (out <dtype>[T/ep, d], received counts <int64>[ep, L], phase ms)."""
    dev = hidden.device
    ep, slots = plan.slot_counts.shape
    marks = [clock.now()]
    rows = hidden.index_select(0, plan.tokens.to(dev))  # 1. permute
    marks.append(clock.now())
    fault("dispatch")
    send_counts = plan.slot_counts.reshape(-1).to(dev)  # 2. dispatch
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    recv_counts = recv_counts.view(ep, slots).cpu()
    in_splits, out_splits = plan.input_splits.tolist(), recv_counts.sum(1).tolist()
    recv = rows.new_empty((sum(out_splits), hidden.shape[1]))
    dist.all_to_all_single(recv, rows, out_splits, in_splits)
    marks.append(clock.now())
    chunks = list(recv.split(recv_counts.reshape(-1).tolist()))  # 3. experts: [source][slot] chunks
    for slot, expert in enumerate(local_experts):
        picked = [src * slots + slot for src in range(ep)]
        y = experts(expert, torch.cat([chunks[i] for i in picked]))
        for i, part in zip(picked, y.split([chunks[i].shape[0] for i in picked])):
            chunks[i] = part
    expert_out = torch.cat(chunks) if chunks else recv
    marks.append(clock.now())
    fault("combine")
    back = rows.new_empty(rows.shape)  # 4. combine
    dist.all_to_all_single(back, expert_out, in_splits, out_splits)
    marks.append(clock.now())
    out = torch.zeros_like(hidden)  # 5. unpermute, in moebench.core.dispatch's order
    weight = plan.ref_weight.to(dev, hidden.dtype)
    out.index_add_(0, plan.ref_tokens.to(dev), back[plan.unpermute.to(dev)] * weight[:, None])
    marks.append(clock.now())
    times = {p: (b - a) * 1e3 for p, a, b in zip(PHASES, marks, marks[1:])}
    return out, recv_counts, times


def _agree(problem: tuple[str, str] | None) -> tuple[int, str, str] | None:
    """Every rank's (status, reason) problem or None, gathered everywhere: the lowest rank's
    (rank, status, reason), so that all ranks skip or fail a router together."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    return next(((r, *p) for r, p in enumerate(everyone) if p), None)


def run_job(job: EngineJob) -> list[dict] | None:
    """Run every router of the job on this rank; rank 0 returns one record per router."""
    case, spec = job.case, job.spec
    backend = backend_for(spec, case.device)
    ensure_group(backend, spec.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != spec.world_size:
        raise MoebenchError(f"parallel.ep is {spec.world_size} but {world} processes were started")
    device = _device(case, backend)
    if not device.startswith("cuda"):
        torch.set_num_threads(job.threads or max(1, (os.cpu_count() or 1) // world))
    try:
        batches = global_batches(case, device)
        lo, hi = shard_bounds(case.tokens, world, rank)
        records = []
        for i, spec_r in enumerate(job.routers):
            if spec_r.display in job.skip:
                continue
            records.append(_run_router(job, spec_r, batches, lo, hi, rank, world, device, backend, armed=i == 0))
        return records if rank == 0 else None
    except RuntimeError as exc:  # gloo/NCCL: a peer closed the connection or the timeout passed
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RankFailure(
            f"rank {rank}: a collective failed ({first}); another rank died or hung "
            f"(parallel.timeout_s = {spec.timeout_s:g})") from None


def _guarded(fn, *args):
    """(fn(*args), None), or (None, ("error", reason)) when the router's code raises or calls
    sys.exit: a router's fault becomes its row on every rank, never the end of a rank (which
    would cost the other routers of the case their rows). Ctrl-C still propagates."""
    try:
        return fn(*args), None
    except SystemExit as exc:
        return None, ("error", exit_reason(exc))
    except Exception as exc:  # noqa: BLE001
        return None, ("error", f"{type(exc).__name__}: {exc}".strip())


def _create(named, case):
    router = ROUTERS.create(named.name, named.params)
    reason = router.applicable(case.top_k, case.experts)
    return router, (("skipped", reason) if reason else None)


def _route_checked(router, local, case, rank, b, state, named):
    """The shard's Routing, checked (moebench.core.routing_check) before the plan, the
    placement or any kernel reads its indices; Soft MoE is a skip."""
    routing = check_routing(route_shard(router, local, case, rank, b, state), named.display)
    if routing.soft is not None:
        return routing, ("skipped", "Soft MoE mixes tokens into slots; it has no token-to-expert assignments to dispatch")
    return routing, None


def _run_router(job, named, batches, lo, hi, rank, world, device, backend, armed) -> dict | None:
    case, spec = job.case, job.spec
    made, problem = _guarded(_create, named, case)
    router = state = None
    if made:
        router, problem = made
    if problem is None:
        state, problem = _guarded(router.init_state, case.experts, torch.device(device))
    agreed = _agree(problem)
    if agreed:  # the same on every rank: skipped (not applicable) or error
        r, status, reason = agreed
        reason = reason if status == "skipped" else f"rank {r}: {reason}"
        return {"router": named, "status": status, "reason": reason} if rank == 0 else None
    experts = Experts(spec.experts, case.hidden, spec.ffn_hidden, case.seed, DTYPES[case.dtype], device)
    clock = _Clock(device)
    history = None
    per_batch = []
    for b, inputs in enumerate(batches):
        local = shard_inputs(inputs, lo, hi)
        made, problem = _guarded(_route_checked, router, local, case, rank, b, state, named)
        routing = None
        if made:
            routing, problem = made
        agreed = _agree(problem)
        if agreed:
            r, status, reason = agreed
            reason = reason if status == "skipped" else f"rank {r}, batch {b}: {reason}"
            return {"router": named, "status": status, "reason": reason} if rank == 0 else None
        load = routing.load().double().to(device)
        dist.all_reduce(load)
        load = load.cpu()
        estimate = _estimate(spec, load, history, case.experts)
        history = load if history is None else spec.ema_alpha * load + (1 - spec.ema_alpha) * history
        placement = make_placement(spec.placement, estimate, case.experts, world, spec.redundant_experts,
                                   spec.eplb_groups(spec.nodes), spec.nodes, spec.eplb_policy)
        plan = rank_plan(routing, placement, lo)
        local_experts = placement.slot_expert.view(world, -1)[rank].tolist()
        hidden = local.hidden if local.hidden is not None else torch.zeros(hi - lo, case.hidden, device=device)
        last = b == len(batches) - 1
        dist.barrier()
        out, recv_counts, checked = run_layer(hidden, plan, local_experts, experts, clock,
                                              lambda at: _fault(job, rank, at, armed and last))
        timed = None
        if last:
            rounds = []
            for _ in range(job.warmup + job.rounds):
                dist.barrier()
                rounds.append(run_layer(hidden, plan, local_experts, experts, clock)[2])
            rounds = rounds[job.warmup:] or [checked]
            samples = {p: [r[p] for r in rounds] for p in PHASES}
            samples["layer"] = [sum(r[p] for p in PHASES) for r in rounds]
            samples["a2a"] = [r["dispatch"] + r["combine"] for r in rounds]
            # the same summary every timed phase gets (median, and its 95% CI where rounds allow)
            stats = {p: summarize(x) for p, x in samples.items()}
            timed = {p: st.median for p, st in stats.items()}
            timed["ci"] = {p: (st.ci_low, st.ci_high) for p, st in stats.items()}
        mine = {"routing": _cpu_routing(routing), "send": plan.input_splits, "recv": recv_counts.sum(1),
                "out": out.cpu() if job.keep_outputs else None, "timed": timed,
                "slot_expert": placement.slot_expert, "policy": placement.policy,
                "estimate": estimate}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            per_batch.append(gathered)
        agreed = _agree(_guarded(router.update_state, state, routing)[1])
        if agreed:
            return {"router": named, "status": "error", "reason": f"rank {agreed[0]}, batch {b}: {agreed[2]}"} \
                if rank == 0 else None
    if rank != 0:
        return None
    return {"router": named, "status": "ok", "reason": None, "batches": per_batch, "backend": backend,
            "world_size": world, "flops_per_row": experts.flops_per_row()}


def _estimate(spec: ParallelSpec, load: torch.Tensor, history, experts: int) -> torch.Tensor | None:
    """The expert loads <float64>[E] EPLB places by (None for contiguous / round_robin)."""
    if spec.placement != "eplb":
        return None
    if spec.load_estimate == "oracle":
        return load
    if spec.load_estimate == "ema" and history is not None:
        return history
    return torch.ones(experts, dtype=torch.float64)  # uniform, or ema before any history


def _cpu_routing(routing):
    from dataclasses import fields, replace

    moved = {f.name: getattr(routing, f.name).cpu() for f in fields(routing)
             if isinstance(getattr(routing, f.name), torch.Tensor)}
    return replace(routing, **moved)

"""How much memory one router of a parallel case needs, estimated before any rank starts; a
case that cannot fit becomes a `skipped` row per router with moebench/run/memory_estimate.py's
reason ('does not fit in memory: needs ~X (...); cpu has Y available (...)') and the run goes on.

T tokens, E experts, d hidden, b bytes per element of the case's dtype, B batches, ep ranks,
Ts = T/ep tokens per rank, S = E + redundant replicas (EPLB) slots, f = ffn_hidden (mlp
experts), A the assignments of the whole batch (memory_estimate.assignments, the capacity
applied per rank), As = A/ep per rank. Counted, summed:

engine mode (every rank is a local process, so the sum over the ep ranks must fit; on CUDA
each rank has its own GPU, so one rank's share is compared with what the device has):

- ``batches``: every rank builds the stream's B global batches (layer.global_batches) and
  keeps them: logits <dtype>[T, E] and hidden <dtype>[T, d] each, plus while one is made
  its float32 draw and the workload's gate <float32>[d, E] (memory_estimate's ``workload``):
  ep * (B*T*(E + d)*b + ...);
- ``routing``: per rank the router's 4 temporaries <float32>[Ts, E] and the Routing of As
  assignments (memory_estimate's bytes per assignment): over all ranks 4*T*E*4 + A*bytes;
- ``layer``: per rank the permuted rows <dtype>[As, d], the received rows, their expert
  outputs and concatenation (4 x <dtype>[R, d]; the ranks receive A rows together), the
  combined rows, their unpermuted gather and weighted product (3 x <dtype>[As, d]), the
  output <dtype>[Ts, d] twice (the checked call's is kept while the timed calls run); mlp
  experts: the hidden and SiLU rows of one expert <dtype>[n, f] x2 (n <= min(T, R) rows);
- ``experts``: mlp: W1 <dtype>[d, f] and W2 <dtype>[f, d] per slot (S over all ranks), and the
  float32 draw of one expert's pair per rank;
- ``records``: rank 0 gathers every rank's Routing of every batch (its [A] fields and its
  probabilities and logits <float32>[Ts, E]) for every router of the launch, pickled once on
  the way and held again by the session: 3 * routers * B * (8*T*E + A*bytes);
- ``processes``: `RANK_PROCESS_BYTES` per rank (an interpreter with torch, forked from the
  launcher's server: its own pages only).

model mode (one process, no ranks): the B global batches kept <dtype>[T, E] and [T, d], the
router's temporaries and the Routing of the whole batch (A), the kept assignments' source and
destination <int64>[A] x3, and per EP size the rows matrix <int64>[ep, ep] (x4 temporaries).

The sum is multiplied by memory_estimate.SAFETY.
"""

from __future__ import annotations

from moebench.core.case import Case, NamedSpec
from moebench.run.memory_estimate import (DENSE_ROUTERS, DTYPE_BYTES, FLOAT32, INT64, ROUTING_BYTES_PER_ASSIGNMENT,
                                          Estimate, assignments, problem)

RANK_PROCESS_BYTES = 160 << 20  # one rank's own pages: an interpreter with torch forked from the server


def _workload(case: Case, b: int) -> int:
    """One batch being made: the float32 draw of logits and hidden, the gate, the dtype copy."""
    t, e, d = case.tokens, case.experts, case.hidden
    return (t * e + t * d) * FLOAT32 + d * e * FLOAT32


def estimate(case: Case, spec, router: NamedSpec | None = None, routers: int = 1) -> Estimate:
    """The memory ``router`` needs on ``case`` under the parallel block ``spec`` (a
    ParallelSpec); ``routers``: how many routers one launch runs (rank 0 keeps their records).
    Engine mode: the sum over all local ranks (see `rank_share`)."""
    t, e, d, k = case.tokens, case.experts, case.hidden, case.top_k
    b = DTYPE_BYTES.get(case.dtype, 4)
    name = router.name if router is not None else ""
    dense = name in DENSE_ROUTERS
    batches = max(1, case.batches)
    if spec.mode == "model":
        a = assignments(t, e, k, case.capacity_factor, dense)
        ep = max(spec.ep)
        return Estimate({
            "batches": batches * t * (e + d) * b + _workload(case, b),
            "routing": 4 * t * e * FLOAT32 + a * ROUTING_BYTES_PER_ASSIGNMENT + 3 * a * INT64,
            "matrices": 4 * ep * ep * INT64 * len(spec.ep),
        })
    ep = spec.world_size
    ts = t // ep
    a_rank = assignments(ts, e, k, case.capacity_factor, dense)
    a = ep * a_rank
    layer = 4 * a * d * b + ep * (3 * a_rank * d * b + 2 * ts * d * b)
    parts = {
        "batches": ep * (batches * t * (e + d) * b + _workload(case, b)),
        "routing": 4 * t * e * FLOAT32 + a * ROUTING_BYTES_PER_ASSIGNMENT,
        "layer": layer,
        "records": 3 * routers * batches * (8 * t * e + a * ROUTING_BYTES_PER_ASSIGNMENT),
        "processes": ep * RANK_PROCESS_BYTES,
    }
    if spec.experts == "mlp":
        f = spec.ffn_hidden
        parts["layer"] += ep * 2 * min(t, a) * f * b
        parts["experts"] = spec.slots(e) * 2 * d * f * b + ep * 2 * d * f * FLOAT32
    return Estimate(parts)


def rank_share(need: Estimate, ranks: int) -> Estimate:
    """One rank's share of an engine estimate (each rank's GPU must hold its own)."""
    return Estimate({k: -(-v // max(1, ranks)) for k, v in need.parts.items()}, need.safety)


def memory_problem(case: Case, spec, router: NamedSpec | None = None, routers: int = 1,
                   have: tuple[int | None, str] | None = None) -> str | None:
    """None if ``router`` on ``case`` should fit, else its skipped row's reason
    (memory_estimate.problem's wording). On CPU (and in model mode) the whole estimate must
    fit in what the machine has; engine ranks on CUDA each compare their share with what
    their device has. ``have``: (bytes, source), default what the device has."""
    need = estimate(case, spec, router, routers)
    if spec.mode == "engine" and case.device.startswith("cuda"):
        return problem(rank_share(need, spec.world_size), case.device, have)
    device = "cpu" if spec.mode == "model" else case.device
    return problem(need, device, have)

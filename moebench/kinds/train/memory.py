"""How much memory training one router on one case needs, estimated before the Trainer
allocates anything; a case that cannot fit becomes a `skipped` row per router with
moebench/run/memory_estimate.py's reason ('does not fit in memory: needs ~X (...); cpu has Y
available (...)') and the run goes on.

All tensors are float32 (training refuses other dtypes). T tokens per step, E experts, d hidden,
f = expert_hidden, o the experts' output width (the task's output_dim; d for `language`), V the
language vocabulary, N = max(1, eval_tokens // T) * T held-out examples, A the assignments of a
step (memory_estimate.assignments: T*E for dense routers, else T*min(E, ceil(k*max(1, cf)))).
Counted, summed (not all are alive at once, so the sum is an upper bound of the peak):

- ``parameters``: gate W <[d, E]> and b <[E]>; experts w1 <[E, d, f]>, b1 <[E, f]>, w2
  <[E, f, o]>, b2 <[E, o]>; Soft MoE's Phi <[d, E*S]>; language: embedding <[V, d]>, head
  <[d, V]> and <[V]>. Each held as the weight, its gradient, one more full-size gradient the
  autograd of ``w1[e]`` (a select per expert) adds before accumulating it, and the optimizer's
  state: Adam/AdamW exp_avg and exp_avg_sq plus 2 foreach temporaries of every parameter; SGD
  (no momentum) none;
- ``step``: the batch x <[T, d]>, y <[T, o]> (language: ids, next ids <int64>[T]), truth
  <int64>[T]; logits, gate noise and the router's temporaries (as memory_estimate: 4) and their
  gradients (2), <[T, E]> each: 8 T*E; the Routing of A assignments (memory_estimate's bytes per
  assignment); per kept assignment the combine's saved rows h[tokens] <[d]>, the expert's
  pre-activation and ReLU <[f]> x2, its output and weighted output <[o]> x2, and as much again
  for their gradients; the combined output and its gradient <[T, o]>; language: h + y and head
  logits <[T, d]>, <[T, V]> with log-softmax and gradient (3 T*V);
- Soft MoE: dispatch, combine and slot logits <[T, E*S]> and the experts' slot rows (R = T/n *
  E*S rows of d, 2 f and 2 o, with gradients);
- ``eval set``: the N held-out examples as the batch above, plus the chosen expert per
  example <int64>[N];
- ``task``: its drawn structure: local_experts centres <[K, d]>, maps <[K, d, o]> and the
  gather maps[region] <[n, d, o]> a sample of n examples makes (n = N when the eval set is
  drawn); teacher gate <[d, K]>, u <[K, d, f_t]>, v <[K, f_t, o]>, its hidden rows <[n, f_t]>
  and, balanced, its calibration sample <[65536, d]> and scores <[65536, K]>; language perms
  <int64>[K, V] and the unigram <float64>[V] with its conditional <float64>[K, V].

Seeds run one after another (the previous seed's Trainer is let go before the next is built).
The sum is multiplied by memory_estimate.SAFETY.
"""

from __future__ import annotations

import math

from moebench.core.case import Case, NamedSpec
from moebench.run.memory_estimate import (DENSE_ROUTERS, FLOAT32, INT64, ROUTING_BYTES_PER_ASSIGNMENT, Estimate,
                                          assignments, problem)

OPTIMIZER_COPIES = {"sgd": 0, "adam": 4, "adamw": 4}  # exp_avg, exp_avg_sq + 2 foreach temporaries
CALIBRATION_INPUTS = 65536  # tasks.CALIBRATION_INPUTS (a balanced teacher's sample)


def _task_fields(case: Case) -> object | None:
    """The task's options with their defaults (a frozen dataclass; nothing drawn yet)."""
    from moebench.kinds.train.tasks import TASKS

    try:
        return TASKS.create(case.workload.name, case.workload.params)
    except Exception:  # noqa: BLE001 (an unknown task is the row's own error)
        return None


def _soft_rows(case: Case, params: dict) -> tuple[int, int]:
    """(E*S slots per sequence, R slot rows of the batch) for Soft MoE."""
    from moebench.run.memory_estimate import _soft_moe_slots

    slots = _soft_moe_slots(case, params)
    n = min(int(params.get("sequence_length") or case.tokens), case.tokens)
    return slots, math.ceil(case.tokens / max(1, n)) * slots


def estimate(case: Case, spec, router: NamedSpec | None = None) -> Estimate:
    """The memory training ``router`` on ``case`` under the train block ``spec`` (a TrainSpec)
    needs; see the module doc."""
    t, e, d, k = case.tokens, case.experts, case.hidden, case.top_k
    f = spec.expert_hidden
    task = _task_fields(case)
    name = router.name if router is not None else ""
    params = router.params if router is not None else {}
    language = case.workload.name == "language" or type(task).__name__ == "Language"
    vocab = int(getattr(task, "vocab", 256)) if language else 0
    o = d if language else int(getattr(task, "output_dim", 4))
    n = max(1, spec.eval_tokens // t) * t

    weights = d * e + e + e * (d * f + f + f * o + o)
    slots = rows = 0
    if name == "soft_moe":
        slots, rows = _soft_rows(case, params)
        weights += d * slots
    if language:
        weights += vocab * d + d * vocab + vocab
    copies = 2 + 1 + OPTIMIZER_COPIES.get(spec.optimizer, 4)  # weight, grad, select's grad, optimizer
    parts = {"parameters": weights * FLOAT32 * copies}

    def batch(m: int) -> int:
        if language:
            return 3 * m * INT64
        return m * (d + o) * FLOAT32 + m * INT64

    a = assignments(t, e, k, case.capacity_factor, dense=name in DENSE_ROUTERS)
    step = batch(t) + 8 * t * e * FLOAT32 + a * ROUTING_BYTES_PER_ASSIGNMENT + 2 * t * o * FLOAT32
    step += 2 * (a * (d + 2 * f + 2 * o) * FLOAT32)
    if language:
        step += (2 * t * d + 3 * t * vocab) * FLOAT32
    if name == "soft_moe":
        step += 3 * t * slots * FLOAT32 + 2 * rows * (d + 2 * f + 2 * o) * FLOAT32
    parts["step"] = step
    parts["eval set"] = batch(n) + n * INT64

    structure = 0
    tname = type(task).__name__
    if tname == "LocalExperts":
        regions = int(task.regions)
        structure = (regions * d + regions * d * o) * FLOAT32 + max(n, t) * d * o * FLOAT32
    elif tname == "Teacher":
        kt, ft = int(task.experts), int(task.expert_hidden)
        structure = (d * kt + kt * d * ft + kt * ft * o + max(n, t) * ft) * FLOAT32
        if getattr(task, "balanced", False):
            structure += CALIBRATION_INPUTS * (d + kt) * FLOAT32
    elif language:
        classes = int(getattr(task, "classes", 4))
        structure = classes * vocab * INT64 + vocab * 8 + 2 * classes * vocab * 8
    parts["task"] = structure
    return Estimate(parts)


def memory_problem(case: Case, spec, router: NamedSpec | None = None,
                   have: tuple[int | None, str] | None = None) -> str | None:
    """None if training ``router`` on ``case`` should fit, else its skipped row's reason
    (memory_estimate.problem's wording). ``have``: (bytes, source), default what the device has."""
    return problem(estimate(case, spec, router), case.device, have)

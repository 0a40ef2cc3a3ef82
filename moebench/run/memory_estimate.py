"""How much memory one router on one case needs, estimated before anything is allocated, and
how much the machine has: a case that cannot fit becomes a `skipped` row that says both,
instead of an out-of-memory kill (which on Linux takes the whole run with it, not one row).

The estimate counts the tensors the run loop holds at its peak (T tokens, E experts, d hidden,
k choices, A assignments, b bytes per element of the case's dtype):

- workload: logits <float32>[T, E] and hidden <float32>[T, d] as generated, their copies in the
  case's dtype, the gate <float32>[d, E] and tables some workloads keep (`tokens`: an
  embedding <float32>[vocab, d]; `clustered`: centres <float32>[clusters, d] and their
  gather <float32>[T, d]);
- router: probabilities, an fp32 copy of the logits and two [T, E] temporaries (softmax,
  top-k, noise), all float32; Soft MoE adds its dispatch, combine and slot-logit matrices
  <float32>[T, E*S] and Phi <float32>[d, E*S];
- routing: token_index, expert_index, choice <int64>[A], weight <float32>[A], kept <bool>[A]
  and the sort buffers of capacity (two <int64>[A]); A = T*E for dense routers, else
  T*min(E, ceil(k * max(1, capacity factor)));
- dispatch/combine: dispatched rows <dtype>[A, d], the combined output <dtype>[T, d], twice
  (the timed calls allocate while the previous result is still alive);
- memcopy bounds: clones of logits and hidden;
- the stream: cached later batches (at most `STREAM_CACHE_BYTES`) and one metric record per
  batch;
- what the workload itself holds beyond its batches, where its class says so: a workload
  object with a ``memory_parts(case) -> {part: bytes}`` method adds those parts (the trace
  workloads: the recorded layers they load, moebench/kinds/traces/memory.py).

The sum is multiplied by `SAFETY` (allocator rounding, fragmentation, what we do not model).
What the machine has: on CPU, MemAvailable of /proc/meminfo, lowered to what the cgroup
(memory.max - memory.current) and RLIMIT_AS allow; on CUDA, torch.cuda.mem_get_info's free
bytes. When it cannot be read, nothing is skipped.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from moebench.core.case import Case, NamedSpec

SAFETY = 2.0
STREAM_CACHE_BYTES = 256 << 20  # later batches of a stream kept for the next router (runner)
BATCH_RECORD_BYTES = 2048  # one per-batch metric record (a dict of ~25 floats)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DENSE_ROUTERS = frozenset({"softmax_dense", "soft_moe"})  # every token gets every expert: A = T*E
INT64, FLOAT32 = 8, 4


@dataclass(frozen=True)
class Estimate:
    """Bytes per part of one router's run on one case, and the total after the safety factor."""

    parts: dict[str, int]
    safety: float = SAFETY

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * self.safety)

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return f"~{gib(self.total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in big) + f"; x{self.safety:g} safety)"


def gib(n: float) -> str:
    """Bytes as a short human unit: '12.3 GiB', '640 MiB', '12 KiB'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def _soft_moe_slots(case: Case, params: dict) -> int:
    """E*S, Soft MoE's slots per sequence (routers/soft_moe.py: S from the option, else from
    the case's capacity per sequence, about cf*n/E)."""
    if params.get("slots_per_expert"):
        return case.experts * int(params["slots_per_expert"])
    n = params.get("sequence_length") or case.tokens
    cf = case.capacity_factor or 1.0
    return case.experts * max(1, math.ceil(cf * min(n, case.tokens) / case.experts))


def estimate(case: Case, router: NamedSpec | None = None) -> Estimate:
    """The memory ``router`` (None: a sparse top-k router) needs on ``case``; see the module doc."""
    t, e, d, k = case.tokens, case.experts, case.hidden, case.top_k
    b = DTYPE_BYTES.get(case.dtype, 4)
    params = case.workload.params
    name = router.name if router is not None else ""
    te, td = t * e, t * d
    workload = (te + td) * FLOAT32 + d * e * FLOAT32 + (0 if case.dtype == "float32" else (te + td) * b)
    if case.workload.name == "tokens":
        workload += int(params.get("vocab", 4096)) * d * FLOAT32 + t * INT64
    if case.workload.name == "clustered":
        workload += int(params.get("clusters", 8)) * d * FLOAT32 + td * FLOAT32
    parts = {"workload": workload, "router": 4 * te * FLOAT32}
    if name in DENSE_ROUTERS:
        a = te
    else:
        a = t * min(e, math.ceil(k * max(1.0, case.capacity_factor or 1.0)))
    if name == "soft_moe":
        slots = _soft_moe_slots(case, router.params)
        parts["soft_moe slots"] = 3 * t * slots * FLOAT32 + d * slots * FLOAT32
    parts["routing"] = a * (3 * INT64 + FLOAT32 + 1 + 2 * INT64)
    parts["dispatch"] = 2 * (a * d * b + td * b + a * INT64)
    parts["memcopy"] = (te + td) * b
    later = max(0, case.batches - 1)
    parts["stream"] = min(later * (te + td) * b, STREAM_CACHE_BYTES) + case.batches * BATCH_RECORD_BYTES
    parts.update(workload_parts(case))
    return Estimate(parts)


def assignments(tokens: int, experts: int, top_k: int, capacity_factor: float | None, dense: bool = False) -> int:
    """A, the assignments a router makes of ``tokens`` tokens: T*E for dense routers, else
    T*min(E, ceil(k * max(1, capacity factor))) (as `estimate` counts them)."""
    if dense:
        return tokens * experts
    return tokens * min(experts, math.ceil(top_k * max(1.0, capacity_factor or 1.0)))


ROUTING_BYTES_PER_ASSIGNMENT = 3 * INT64 + FLOAT32 + 1 + 2 * INT64  # Routing's [A] fields + capacity's sort


def workload_parts(case: Case) -> dict[str, int]:
    """The parts a workload adds through its ``memory_parts(case)`` method (module doc), {} for
    workloads without one, or that cannot be made (the run reports that itself)."""
    try:
        from moebench.core.workloads import WORKLOADS

        workload = WORKLOADS.create(case.workload.name, case.workload.params)
    except Exception:  # noqa: BLE001 (an unknown or invalid workload is the run's error row)
        return {}
    method = getattr(workload, "memory_parts", None)
    return dict(method(case)) if callable(method) else {}


# ---------------------------------------------------------------------------------------------
# What the machine has


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), else v1's limit - usage."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        top, used = _read_int(limit), _read_int(usage)
        if top is not None and used is not None and top < (1 << 60):  # 'max' or a huge v1 number: no limit
            return max(0, top - used)
    return None


def _rlimit_available() -> int | None:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    vm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - (vm or 0))


def available(device: str) -> tuple[int | None, str]:
    """(bytes free for a new allocation on ``device``, where the number comes from); None when
    it cannot be told."""
    if device.startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free), f"free on {device} (torch.cuda.mem_get_info)"
        except Exception:  # no CUDA, or a driver that cannot say
            return None, "unknown"
    candidates = [(_meminfo_available(), "MemAvailable"), (_cgroup_available(), "cgroup memory.max - memory.current"),
                  (_rlimit_available(), "RLIMIT_AS")]
    known = [(n, src) for n, src in candidates if n is not None]
    if not known:
        return None, "unknown"
    return min(known)


def memory_problem(case: Case, router: NamedSpec | None = None, have: tuple[int | None, str] | None = None) -> str | None:
    """None if ``router`` on ``case`` should fit, else the reason of its skipped row: the
    estimate and what the machine has. ``have``: (bytes, source), default `available`."""
    return problem(estimate(case, router), case.device, have)


def problem(need: Estimate, device: str, have: tuple[int | None, str] | None = None) -> str | None:
    """None if ``need`` fits in what ``device`` has (``have``: (bytes, source), default
    `available`), else the skipped row's reason: 'does not fit in memory: needs ~X (...); DEVICE
    has Y available (SOURCE)'. The reason of every kind's memory check (train, parallel, traces)."""
    free, source = have if have is not None else available(device)
    if free is None or need.total <= free:
        return None
    return f"does not fit in memory: needs {need.describe()}; {device} has {gib(free)} available ({source})"

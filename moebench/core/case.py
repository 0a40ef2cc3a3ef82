"""The expanded form of a suite: what one measurement is (`Case`) and how to time it.

suite.py turns YAML into these; the runner consumes only these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

from moebench.core.capacity import CapacitySpec

# The names a Case's drop_policy and a TimingSpec's mode may take, here (no torch) so that the
# suite validator refuses a bad one before torch loads (#23). core/drop_policies.py checks, on
# import, that DROP_POLICY_NAMES are its DROP_POLICIES; run/exec_modes.py runs the MODES.
DROP_POLICY_NAMES = ("position", "probs", "bpr", "random")
MODES = ("eager", "compile", "cuda_graph")


@dataclass(frozen=True)
class NamedSpec:
    """A registry name with its options (a workload or a router as a suite names it).

    label: how rows and reports name it; defaults to ``name`` (two routers of one name with
    different params need distinct labels).
    """

    name: str
    params: dict = field(default_factory=dict)
    label: str = ""

    @property
    def display(self) -> str:
        return self.label or self.name

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)


@dataclass(frozen=True)
class TimingSpec:
    """How phases are timed.

    warmup_rounds: untimed calls before measuring.  min_rounds/max_rounds: bounds on timed
    calls.  min_time_s: keep timing until this much measured time (adaptive rounds).
    threads: torch intra-op threads for CPU cases (None: all cores).  enabled: time at all.
    mode: how phases run: eager, compile (torch.compile) or cuda_graph (CUDA-graph replay);
        compiling and capturing happen before the warm-up (see moebench/run/exec_modes.py).
    cpu_memory: also measure peak memory on CPU (through torch.profiler: ~10-40 ms a phase,
    so off by default; CUDA peak memory is always measured, it is nearly free).
    cpu_allocator: system (glibc's defaults) or reuse (large blocks kept for reuse instead of
        fresh pages on every call; see moebench/run/allocator.py). CPU cases only.
    timeout_s: the longest one router may take on one case (its whole stream, timing
        included) before it is killed and given an error row; None: no limit. Enforced only
        when isolated.
    isolate: run the routers in a worker process (moebench/run/isolation.py), so that a router
        that segfaults, hangs or exits gives an error row and the run goes on; false runs
        them in this process (for debuggers and profilers).
    """

    warmup_rounds: int = 3
    min_rounds: int = 5
    max_rounds: int = 200
    min_time_s: float = 0.2
    threads: int | None = None
    enabled: bool = True
    cpu_memory: bool = False
    mode: str = "eager"
    cpu_allocator: str = "system"
    timeout_s: float | None = 600.0
    isolate: bool = True


@dataclass(frozen=True)
class Case:
    """One point of a suite's grid: a workload at a shape, on a device, in a dtype, with a seed.

    capacity_factor None means dropless. batches > 1 makes a stream (stateful routers and
    drifting workloads are measured over it).
    """

    workload: NamedSpec
    tokens: int
    experts: int
    top_k: int
    capacity_factor: float | None
    drop_policy: str = "position"
    min_capacity: int = 0
    capacity_multiple: int = 1
    hidden: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    batches: int = 1

    @property
    def capacity(self) -> CapacitySpec:
        return CapacitySpec(self.capacity_factor, self.min_capacity, self.capacity_multiple)

    @property
    def case_id(self) -> str:
        """Stable, readable id: the main axes plus a short hash of every field."""
        cf = "dropless" if self.capacity_factor is None else f"cf{self.capacity_factor:g}"
        digest = hashlib.sha256(json.dumps(self._fields_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return (
            f"{self.workload.display}-T{self.tokens}-E{self.experts}-k{self.top_k}-{cf}-"
            f"{self.drop_policy}-{self.dtype}-{self.device}-s{self.seed}-{digest}"
        )

    def _fields_dict(self) -> dict:
        """``dataclasses.asdict(self)`` (the same JSON, so ids do not change) without its deep
        copies: a 100 000-case grid is hashed in ~1 s instead of ~8."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.workload, NamedSpec):
            out["workload"] = {f.name: getattr(self.workload, f.name) for f in fields(NamedSpec)}
        return out

    def axes(self) -> dict:
        """The case as flat row columns: ``case_id``, then :func:`case_axes` in order."""
        out: dict[str, Any] = {"case_id": self.case_id}
        for name in case_fields():
            value = getattr(self, name)
            if name == "workload":  # a spec: its label and its options, as two columns
                out["workload"], out["workload_params"] = value.display, value.params_json()
            else:
                out[name] = value
        return out


@lru_cache(maxsize=None)
def case_fields() -> tuple[str, ...]:
    """The fields of :class:`Case` in order: what a suite's grid names (``suite.load.AXES``)."""
    return tuple(f.name for f in fields(Case))


@lru_cache(maxsize=None)
def case_axes() -> tuple[str, ...]:
    """The row columns that say which case a row measured, in sort order, ``case_id`` not
    included: the :class:`Case` fields, with ``workload`` as two columns (``workload``, its
    label, and ``workload_params``, its options as JSON). Derived from the dataclass, so a new
    field is an axis of every table, fit and export at once; two rows that differ in any of
    these are different cases (the scaling fit groups by all of them)."""
    out: list[str] = []
    for name in case_fields():
        out += ["workload", "workload_params"] if name == "workload" else [name]
    return tuple(out)


@dataclass(frozen=True)
class Suite:
    """A loaded, validated, expanded suite.

    path: the file it came from.  document: the merged YAML (after include) as a dict.
    sha256: hash of the canonical JSON of ``document``.  cases: the grid, expanded.
    """

    name: str
    version: int
    description: str
    path: str
    document: dict
    sha256: str
    routers: tuple[NamedSpec, ...]
    cases: tuple[Case, ...]
    timing: TimingSpec
    kind: str = "routing"  # the kind of case (moebench/core/kinds.py): whose rows the run loop asks for
    blocks: dict = field(default_factory=dict)  # kind name -> its parsed suite block (e.g. "train": TrainSpec)

    @property
    def train(self) -> Any:
        """The TrainSpec of a training suite (moebench/kinds/train/spec.py), else None."""
        return self.blocks.get("train")

    @property
    def parallel(self) -> Any:
        """The ParallelSpec of an expert-parallel suite (moebench/kinds/parallel/spec.py), else None."""
        return self.blocks.get("parallel")

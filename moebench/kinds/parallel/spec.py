"""A suite's ``parallel:`` block: what expert-parallel layer every case runs as.

    parallel:
      mode: engine            # engine (torch.distributed ranks) | model (cost model, no processes)
      ep: 4                   # ranks; model mode: a list, e.g. [8, 16, ..., 1024]
      nodes: 1                # engine: ranks form this many nodes (EPLB hierarchy, node traffic)
      placement: eplb         # contiguous | round_robin | eplb
      redundant_experts: 4    # eplb: extra replica slots
      groups: null            # eplb: expert groups (null: one per node)
      eplb_policy: auto       # auto | hierarchical | global
      load_estimate: oracle   # eplb loads: oracle (this batch), ema (earlier batches), uniform
      ema_alpha: 0.5          # ema: weight of the newest batch
      experts: identity       # identity | mlp
      ffn_hidden: 128         # mlp: inner size
      backend: auto           # auto (nccl on cuda, gloo on cpu) | gloo | nccl
      timeout_s: 60           # collectives and process start give up after this long
      profile: h800_deepep    # model mode: h800_deepep | gloo_local (fitted here by ping-pong)
      dispatch_bytes: null    # model mode: bytes per element on the wire (null: the case dtype's)
      combine_bytes: null
      wire_hidden: null       # model mode: hidden size on the wire (null: the case's hidden)

The engine times ``timing.warmup_rounds`` untimed and ``timing.min_rounds`` timed calls of the
layer (none with ``timing.enabled: false``; the one checked call's times are then reported).
`parse_parallel` raises the suite's SuiteError (file, field, what was expected) through the
validator's ``fail``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from moebench.core.errors import did_you_mean
from moebench.suite.rules import Rule

# light to import (#23): the suite validator parses this block before torch loads, so the names
# it checks live here; placement.py and profiles.py take theirs from here
# (tests/test_refusals.py checks that they are the same)
PLACEMENTS = ("contiguous", "round_robin", "eplb")
EPLB_POLICIES = ("auto", "hierarchical", "global")
PROFILES = ("h800_deepep", "gloo_local")
MODES = ("engine", "model")
EXPERTS = ("identity", "mlp")
BACKENDS = ("auto", "gloo", "nccl")
LOAD_ESTIMATES = ("oracle", "ema", "uniform")
MAX_ENGINE_RANKS = 64
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParallelSpec:
    """The validated ``parallel:`` block (see the module docstring); ep is a tuple of sizes."""

    mode: str = "engine"
    ep: tuple[int, ...] = (2,)
    nodes: int = 1
    placement: str = "contiguous"
    redundant_experts: int = 0
    groups: int | None = None
    eplb_policy: str = "auto"
    load_estimate: str = "oracle"
    ema_alpha: float = 0.5
    experts: str = "identity"
    ffn_hidden: int = 128
    backend: str = "auto"
    timeout_s: float = 60.0
    profile: str = "h800_deepep"
    dispatch_bytes: int | None = None
    combine_bytes: int | None = None
    wire_hidden: int | None = None

    @property
    def world_size(self) -> int:
        return self.ep[0]

    def slots(self, experts: int) -> int:
        return experts + (self.redundant_experts if self.placement == "eplb" else 0)

    def eplb_groups(self, nodes: int) -> int:
        return self.groups if self.groups is not None else nodes

    def as_row(self) -> dict:
        return {"parallel_mode": self.mode, "placement": self.placement,
                "redundant_experts": self.redundant_experts if self.placement == "eplb" else 0,
                "load_estimate": self.load_estimate if self.placement == "eplb" else None,
                "experts_kind": self.experts, "ffn_hidden": self.ffn_hidden if self.experts == "mlp" else None}


def _rules():
    return {
        "mode": Rule("choice", choices=MODES, what="parallel mode"),
        "nodes": Rule("int", 1),
        "placement": Rule("choice", choices=PLACEMENTS, what="placement"),
        "redundant_experts": Rule("int", 0, maximum=4096),  # ranges: #23
        "groups": Rule("int", 1, nullable=True, what="one group per node"),
        "eplb_policy": Rule("choice", choices=EPLB_POLICIES, what="EPLB policy"),
        "load_estimate": Rule("choice", choices=LOAD_ESTIMATES, what="load estimate"),
        "ema_alpha": Rule("number", 0, exclusive=True),
        "experts": Rule("choice", choices=EXPERTS, what="expert kind"),
        "ffn_hidden": Rule("int", 1, maximum=1 << 18),
        "backend": Rule("choice", choices=BACKENDS, what="backend"),
        "timeout_s": Rule("number", 1, maximum=86400),
        "profile": Rule("choice", choices=PROFILES, what="hardware profile"),
        "dispatch_bytes": Rule("int", 1, nullable=True, what="the case dtype's size", maximum=16),
        "combine_bytes": Rule("int", 1, nullable=True, what="the case dtype's size", maximum=16),
        "wire_hidden": Rule("int", 1, nullable=True, what="the case's hidden size", maximum=1 << 20),
    }


def parse_parallel(value: Any, fail: Callable[[str, str], None]) -> ParallelSpec:
    """The ParallelSpec of a ``parallel:`` mapping; ``fail(field, message)`` raises SuiteError."""
    rules = _rules()
    if not isinstance(value, dict):
        fail("parallel", f"expected a mapping of parallel options, got {value!r}")
    allowed = ("ep", *rules)
    for key in value:
        if key not in allowed:
            fail(f"parallel.{key}", f"unknown key {key!r}{did_you_mean(str(key), list(allowed))}")
    fields: dict[str, Any] = {}
    for key, rule in rules.items():
        if key in value:
            problem, fields[key] = rule.check(value[key])
            if problem:
                fail(f"parallel.{key}", problem)
    mode = fields.get("mode", "engine")
    if "ep" not in value:
        fail("parallel.ep", "missing required field (the number of expert-parallel ranks)")
    raw = value["ep"]
    sizes = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, list) and mode == "engine":
        fail("parallel.ep", "expected one integer in engine mode (a list of sizes needs mode: model)")
    if not sizes:
        fail("parallel.ep", "empty list: give at least one size")
    for i, size in enumerate(sizes):
        where = f"parallel.ep[{i}]" if isinstance(raw, list) else "parallel.ep"
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            fail(where, f"expected an integer >= 1, got {size!r}")
        if mode == "engine" and size > MAX_ENGINE_RANKS:
            fail(where, f"expected at most {MAX_ENGINE_RANKS} local ranks in engine mode (use mode: model), got {size}")
    spec = ParallelSpec(ep=tuple(sizes), **fields)
    nodes = spec.nodes
    if mode == "engine" and spec.world_size % nodes:
        fail("parallel.nodes", f"expected a divisor of ep ({spec.world_size}), got {nodes}")
    if spec.groups is not None and spec.groups % nodes and spec.eplb_policy == "hierarchical":
        fail("parallel.groups", f"hierarchical EPLB needs groups divisible by nodes ({nodes}), got {spec.groups}")
    return spec


def check_cases(spec: ParallelSpec, cases, fail: Callable[[str, str], None]) -> None:
    """Every case must split evenly over the ranks: tokens by ep, slots by ep, groups by experts."""
    for case in cases:
        for ep in spec.ep:
            if case.tokens % ep:
                fail("parallel.ep", f"tokens={case.tokens} do not split evenly over ep={ep} ranks")
            slots = spec.slots(case.experts)
            if slots % ep:
                what = f"experts + redundant_experts = {slots}" if spec.placement == "eplb" else f"experts={case.experts}"
                fail("parallel.ep", f"{what} do not split evenly over ep={ep} ranks")
            if spec.placement == "eplb" and spec.mode == "engine":
                groups = spec.eplb_groups(spec.nodes)
                if case.experts % groups:
                    fail("parallel.groups", f"experts={case.experts} do not split into {groups} groups")

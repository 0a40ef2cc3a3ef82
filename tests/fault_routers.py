"""Plugin-style routers that misbehave, for tests/test_isolation.py.

They are plain top-level classes of an importable module (not registered on import: a test
registers them for its own duration, so no other test meets them in the registry), so an
isolated worker can import them by module and qualified name.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from moebench.core import kernels
from moebench.routers.base import TokenChoiceRouter
from moebench.core.routing import Routing


@dataclass(frozen=True)
class _TopK(TokenChoiceRouter):
    """A correct top-k (torch path) that the faulty routers start from."""

    paper = "test router"

    def good(self, inputs, ctx) -> Routing:
        logits = inputs.logits.float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, ctx.top_k, dim=-1)
        return self.finish(top.indices, top.values, probs, logits, ctx)


@dataclass(frozen=True)
class Segfaults(_TopK):
    """Reads address 0 (SIGSEGV). (It fed an out-of-range expert into a numba kernel, which
    now bound-checks: moebench.core.kernels.ExpertOutOfRange.)"""

    def route(self, inputs, ctx):
        import ctypes

        ctypes.string_at(0)
        return self.good(inputs, ctx)


@dataclass(frozen=True)
class OffsetIds(_TopK):
    """Passes experts + offset to `finish` (numba path): the capacity pass must refuse them
    before writing at them (#23)."""

    offset: int = 10

    def route(self, inputs, ctx):
        logits = inputs.logits.float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, ctx.top_k, dim=-1)
        return self.finish(top.indices + self.offset, top.values, probs, logits, ctx)


@dataclass(frozen=True)
class Hangs(_TopK):
    def route(self, inputs, ctx):
        while True:
            time.sleep(0.05)


@dataclass(frozen=True)
class Exits(_TopK):
    def route(self, inputs, ctx):
        sys.exit(3)


@dataclass(frozen=True)
class HardExits(_TopK):
    def route(self, inputs, ctx):
        os._exit(7)


@dataclass(frozen=True)
class Raises(_TopK):
    def route(self, inputs, ctx):
        raise RuntimeError("plugin bug")


@dataclass(frozen=True)
class WrongShape(_TopK):
    """probs with one expert too few."""

    def route(self, inputs, ctx):
        r = self.good(inputs, ctx)
        return replace(r, probs=r.probs[:, :-1])


@dataclass(frozen=True)
class OutOfRange(_TopK):
    """One expert index == E: in the numba dispatch kernel an out-of-bounds write."""

    def route(self, inputs, ctx):
        r = self.good(inputs, ctx)
        expert = r.expert_index.clone()
        expert[0] = inputs.logits.shape[1]
        return replace(r, expert_index=expert)


@dataclass(frozen=True)
class NanWeights(_TopK):
    def route(self, inputs, ctx):
        r = self.good(inputs, ctx)
        weight = r.weight.clone()
        weight[::2] = math.nan
        return replace(r, weight=weight)


FAULT_ROUTERS = {
    "fault_segfault": Segfaults,
    "fault_hang": Hangs,
    "fault_exit": Exits,
    "fault_os_exit": HardExits,
    "fault_raise": Raises,
    "fault_shape": WrongShape,
    "fault_range": OutOfRange,
    "fault_nan": NanWeights,
    "fault_offset": OffsetIds,
}

"""Expert capacity: every capacity rule of docs/spec.md §1 in one place.

Token choice: ``C = ceil(cf * k * T / E)``, then ``max(C, min_capacity)``, then rounded up to a
multiple of ``capacity_multiple``, never above T. ``factor=None`` is dropless (no capacity).
Expert choice uses the same rule with k = 1 (there cf is the mean number of experts per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class CapacitySpec:
    """How capacity is chosen for a case.

    factor: capacity factor cf, or None for dropless routing.
    min_capacity: lower bound on C (DeepSpeed uses 4 or 8).
    multiple: C is rounded up to a multiple of this (alignment for kernels).
    """

    factor: float | None
    min_capacity: int = 0
    multiple: int = 1

    @property
    def dropless(self) -> bool:
        return self.factor is None


def expert_capacity(spec: CapacitySpec, tokens: int, experts: int, top_k: int = 1) -> int | None:
    """Slots per expert for ``tokens`` tokens over ``experts`` experts with ``top_k`` choices.

    Returns None when the spec is dropless. The product cf·k·T/E is computed exactly (as a
    fraction of the decimal cf) so that e.g. cf=1.1 never rounds up by floating-point error.
    """
    if spec.factor is None:
        return None
    exact = Fraction(str(spec.factor)) * top_k * tokens / experts
    cap = math.ceil(exact)
    cap = max(cap, spec.min_capacity)
    if spec.multiple > 1:
        cap = -(-cap // spec.multiple) * spec.multiple
    return min(cap, tokens)

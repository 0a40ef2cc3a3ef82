"""What one scalar field of a suite file accepts: `Rule`, shared by the validator's tables
(suite/load.py: AXES, TIMING), the JSON schema (suite/schema.py) and the kinds' own blocks
(`train:`, `parallel:`), so a kind checks its fields exactly as the suite checks its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moebench.core.errors import did_you_mean
from moebench.suite.files import show


@dataclass(frozen=True)
class Rule:
    """What one scalar field accepts.

    kind: "int", "number", "bool", "choice" (one of ``choices``) or "workload" (a NamedSpec).
    minimum/exclusive: lower bound (``> minimum`` when exclusive).  nullable: null allowed,
    and ``what`` says what null means; for choices ``what`` names the kind of name.
    required: must be given (axes only).  default: the value when absent.
    maximum: upper bound (inclusive): what moebench can allocate or count, so that a typo like
    ``hidden: 1000000000`` is refused in validation instead of attempted.
    """

    kind: str
    minimum: float | None = None
    exclusive: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    what: str = ""
    required: bool = False
    default: Any = None
    maximum: float | None = None

    def describe(self) -> str:
        text = {"int": "an integer", "number": "a number", "bool": "a boolean"}[self.kind]
        if self.minimum is not None:
            text += f" {'>' if self.exclusive else '>='} {self.minimum:g}"
        if self.nullable:
            text += f" or null ({self.what})" if self.what else " or null"
        return text

    def check(self, value: Any) -> tuple[str | None, Any]:
        """(None, normalised value) if ``value`` is acceptable, else (what was expected, value)."""
        if value is None and self.nullable:
            return None, None
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return None, value
            return f"unknown {self.what} {show(value)}{did_you_mean(str(value), list(self.choices))}", value
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and self.kind == "number" and abs(value) >= 2**1000:  # float() of it would overflow
            return f"expected {self.describe()}, got {show(value)}", value
        ok = {
            "int": is_int,
            "number": is_int or (isinstance(value, float) and math.isfinite(value)),
            "bool": isinstance(value, bool),
        }[self.kind]
        if ok and self.minimum is not None:
            ok = value > self.minimum if self.exclusive else value >= self.minimum
        if not ok:
            return f"expected {self.describe()}, got {show(value)}", value
        if self.maximum is not None and value > self.maximum:
            kind = {"int": "an integer", "number": "a number"}[self.kind]
            top = f"{int(self.maximum)}" if self.kind == "int" else f"{self.maximum:g}"
            return f"expected {kind} <= {top} (the most moebench accepts), got {show(value)}", value
        # floats stay floats: `1` and `1.0` must give the same case id
        return None, float(value) if self.kind == "number" else value

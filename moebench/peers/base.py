"""What every peer adapter shares: lazy library loading, skip reasons, the capacity bridge,
and the split between the peer's own routing call (timed) and the conversion to a Routing.

An adapter implements three methods:

- ``prepare(inputs, ctx, lib)``: everything that is not the peer's routing (checking the case,
  solving the capacity factor, building a module). Runs once per (logits, context).
- ``call(prepared)``: the peer's routing on the logits, returning its native output. This is
  what the runner's ``route`` phase measures on repeated calls.
- ``convert(native, prepared)``: the peer's output as a :class:`Routing`. Runs once per
  (logits, context): repeated ``route`` calls with the same logits tensor and context (the
  runner's timing rounds) call the peer again and return the Routing converted the first time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from moebench.core.errors import WorkloadMismatchError
from moebench.routers.base import RouteContext, RouteInputs, Router
from moebench.core.routing import Routing

INSTALL_HINT = "pip install 'moebench[peers]'"


class PeerSkip(WorkloadMismatchError):
    """A peer adapter cannot run this case (library missing, policy or shape it does not have).

    A WorkloadMismatchError, so the runner records a `skipped` row with this message.
    """


# import name -> (module, None) or (None, reason); filled on first use, never at import time
_LIBRARIES: dict[str, tuple[Any, str | None]] = {}


def load_library(module: str, package: str) -> Any:
    """Import ``module`` (of the pip distribution ``package``) once; raise PeerSkip if impossible."""
    if module not in _LIBRARIES:
        top = module.split(".")[0]
        if importlib.util.find_spec(top) is None:
            _LIBRARIES[module] = (None, f"{package} is not installed; {INSTALL_HINT}")
        else:
            disabled = logging.root.manager.disable
            try:
                # quiet imports: Megatron warns about missing TE/Apex, DeepSpeed logs its accelerator
                logging.disable(logging.WARNING)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _LIBRARIES[module] = (importlib.import_module(module), None)
            except Exception as exc:  # noqa: BLE001  (any import failure is a skip reason)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                _LIBRARIES[module] = (None, f"{package} is installed but failed to import: {type(exc).__name__}: {first}")
            finally:
                logging.disable(disabled)
    lib, reason = _LIBRARIES[module]
    if lib is None:
        raise PeerSkip(reason)
    return lib


def library_problem(module: str, package: str) -> str | None:
    """None if the library imports, else why not (imports it on first call)."""
    try:
        load_library(module, package)
    except PeerSkip as exc:
        return str(exc)
    return None


def seed_from(ctx: RouteContext) -> int:
    """An int drawn from the case's router stream, to seed a peer that uses torch's global RNG."""
    g = ctx.generator
    if g is None:
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())


@contextlib.contextmanager
def seeded_global_rng(seed: int | None, device: torch.device):
    """Run a block with torch's global RNG seeded to ``seed`` and restore it afterwards.

    Peers draw their noise (DeepSpeed's Random Token Selection, Gumbel sampling) from the global
    generator; seeding it from the case keeps their rows reproducible. ``None``: do nothing.
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def factor_for_capacity(capacity_of: Callable[[float], int], target: int, hint: float) -> float:
    """A capacity factor that makes a peer's own formula ``capacity_of(cf)`` give ``target``.

    The RouteContext carries the case's capacity C (moebench's exact ceil(cf*k*T/E), with
    min_capacity and alignment), not its factor; peers take a factor and apply their own
    formula in floating point. This finds the interval of factors for which the peer's formula
    (evaluated by the peer's own function) gives C and returns its midpoint, so the peer keeps
    exactly the case's C slots. ``capacity_of`` must be non-decreasing in cf.
    """

    def smallest_reaching(c: int) -> float:
        lo, hi = 0.0, max(hint, 1e-6)
        while capacity_of(hi) < c:
            lo, hi = hi, hi * 2
            if hi > 1e12:
                raise RuntimeError(f"no capacity factor reaches capacity {c}")
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if capacity_of(mid) >= c:
                hi = mid
            else:
                lo = mid
        return hi

    low, high = smallest_reaching(target), smallest_reaching(target + 1)
    cf = (low + high) / 2
    got = capacity_of(cf)
    if got != target:  # pragma: no cover  (a jump over target: impossible for ceil-based formulas)
        raise RuntimeError(f"peer capacity formula cannot produce capacity {target} (got {got} at cf={cf!r})")
    return cf


def rank_major(expert: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, probs: torch.Tensor,
               logits: torch.Tensor, capacity: int | None) -> Routing:
    """A Routing from per-token choices expert/weight/kept <[T, k]>, flattened choice-major
    (all 1st choices, then all 2nd choices, ...) like `TokenChoiceRouter.finish`."""
    t, k = expert.shape
    device = expert.device
    return Routing(
        token_index=torch.arange(t, device=device).repeat(k),
        expert_index=expert.t().reshape(-1).long(),
        choice=torch.arange(k, device=device).repeat_interleave(t),
        weight=weight.t().reshape(-1).float(),
        kept=kept.t().reshape(-1).bool(),
        probs=probs.float(),
        logits=logits.float(),
        top_k=k,
        capacity=capacity,
    )


def order_choices(selected: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """<int64>[T, k]: the k experts marked in selected <bool>[T, E>, ordered by ``score`` (desc).

    Megatron returns [T, E] maps without the choice order; the order only names 1st/2nd choices.
    """
    if not bool((selected.sum(1) == k).all()):
        raise RuntimeError("peer routing map does not select exactly top_k experts per token")
    masked = torch.where(selected, score.float(), torch.tensor(float("-inf"), device=score.device))
    return torch.topk(masked, k, dim=1).indices


@dataclass
class _Memo:
    logits_ref: Any
    version: int
    key: tuple
    prepared: Any
    routing: Routing | None = None


@dataclass(frozen=True)
class PeerRouter(Router):
    """Base of the peer adapters (see the module docstring for the prepare/call/convert split).

    Class attributes: ``package`` (pip name), ``module`` (what to import), ``system`` (for docs).
    """

    package: ClassVar[str] = ""
    module: ClassVar[str] = ""
    system: ClassVar[str] = ""

    def library(self) -> Any:
        return load_library(self.module, self.package)

    def applicable(self, top_k: int, num_experts: int) -> str | None:
        return super().applicable(top_k, num_experts) or library_problem(self.module, self.package)

    # --- to implement ------------------------------------------------------------------------
    def prepare(self, inputs: RouteInputs, ctx: RouteContext, lib: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def call(self, prepared: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def convert(self, native: Any, prepared: Any) -> Routing:  # pragma: no cover
        raise NotImplementedError

    # --- the Router interface -----------------------------------------------------------------
    def _prepared(self, inputs: RouteInputs, ctx: RouteContext) -> _Memo:
        lib = self.library()
        logits = inputs.logits
        key = (tuple(logits.shape), logits.dtype, str(logits.device), ctx.top_k, ctx.capacity, ctx.drop_policy)
        memo: _Memo | None = self.__dict__.get("_memo")
        if memo is not None and memo.logits_ref() is logits and memo.version == logits._version and memo.key == key:
            return memo
        memo = _Memo(weakref.ref(logits), logits._version, key, self.prepare(inputs, ctx, lib))
        object.__setattr__(self, "_memo", memo)  # frozen dataclass: a cache, not an option
        return memo

    def native(self, inputs: RouteInputs, ctx: RouteContext) -> Callable[[], Any]:
        """A zero-argument call of the peer's routing alone on these inputs (for timing)."""
        prepared = self._prepared(inputs, ctx).prepared
        return lambda: self.call(prepared)

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        memo = self._prepared(inputs, ctx)
        out = self.call(memo.prepared)
        if memo.routing is None:
            memo.routing = self.convert(out, memo.prepared)
        return memo.routing

"""Execution modes for the timed phases: eager, torch.compile, or CUDA-graph replay.

A mode turns a phase call into the call that is timed. Preparation (compiling, capturing)
and one untimed call happen here, before the runner's warm-up and measurement, so neither
compile time nor capture is ever inside a timed region.

- eager: the call as is.
- compile: ``torch.compile`` of the call (graph breaks fall back to eager for the parts
  dynamo cannot trace, e.g. numba kernels or host-side Python).
- cuda_graph: the call captured once into a ``torch.cuda.CUDAGraph`` and replayed. CUDA
  only. The runner gives this mode the capturable forms of `moebench.run.capture`; a phase a
  router cannot capture is a `PhaseSkip`. Before capture, one eager call runs under
  ``torch.cuda.set_sync_debug_mode("error")``, so a phase that still synchronises with the
  host fails with the moebench file:line that does it (`SyncError`), not with CUDA's generic
  "operation not permitted when stream is capturing". Random draws of the phase come from
  generators registered with the graph (``generators``), so each replay draws afresh.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from moebench.core.case import MODES  # the names, where the suite validator reads them without torch

CAPTURE_WARMUP = 3  # calls on a side stream before capture (allocator and lazy-init warm-up)
Phase = Callable[[], Any]
PACKAGE = Path(__file__).resolve().parents[1]  # moebench/


@dataclass(frozen=True)
class PhaseSkip:
    """A phase that is not timed in this mode, and why (its row gets `<phase>.status` skipped)."""

    reason: str


class SyncError(RuntimeError):
    """A phase synchronises with the host, so it cannot be captured; names the moebench line."""


class CaptureError(RuntimeError):
    """Capture of a phase failed; names the error the phase itself raised (not the generic one
    CUDA reports when the capture ends) and the moebench line that raised it."""


def mode_problem(mode: str, device: str) -> str | None:
    """None if ``mode`` can run on ``device``, else the reason the row is skipped."""
    if mode == "cuda_graph" and not device.startswith("cuda"):
        return f"timing mode cuda_graph needs a CUDA device; case device is {device}"
    return None


def prepare(fn: Phase, mode: str, device: str, generators: Iterable[torch.Generator] = ()) -> Phase:
    """The call to time for ``fn`` under ``mode`` (already compiled or captured, run once).

    generators: the torch.Generators ``fn`` draws from (cuda_graph registers the CUDA ones
    with the graph; the other modes ignore them).
    """
    if mode == "eager":
        return fn
    if mode == "compile":
        compiled = torch.compile(fn)
        compiled()  # compilation happens here, not in a timed round
        return compiled
    if mode == "cuda_graph":
        return _capture(fn, torch.device(device), [g for g in generators if g.device.type == "cuda"])
    raise ValueError(f"unknown timing mode {mode!r}; expected one of {', '.join(MODES)}")


def moebench_site(exc: BaseException) -> str | None:
    """'moebench/x.py:123 (function)' of the innermost traceback frame in the moebench package
    outside this module (the line that called the failing operation), or None. The exception's
    cause is looked at first (`SyncError` is raised from the error at the synchronising line)."""
    for e in (exc.__cause__, exc):
        for frame in reversed(traceback.extract_tb(e.__traceback__) if e is not None else []):
            path = Path(frame.filename).resolve()
            if path != Path(__file__).resolve() and PACKAGE in path.parents:
                return f"{path.relative_to(PACKAGE.parent)}:{frame.lineno} ({frame.name})"
    return None


def check_sync_free(fn: Phase) -> None:
    """Run ``fn`` once eagerly with CUDA's sync debug mode at "error"; a host synchronisation
    raises `SyncError` naming the moebench line that made it."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        site = moebench_site(exc) or "an unknown line"
        raise SyncError(f"synchronises with the host at {site}: {str(exc).splitlines()[0]}") from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def release_after_failure(device: str | torch.device) -> None:
    """Give cached CUDA memory back after a failed phase; never raises. (After a failed capture
    on torch without the fix of pytorch/pytorch#180395 the allocator still believes a capture
    is under way and ``empty_cache`` raises an internal assert: that must not end the run.)"""
    if torch.device(device).type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - cleanup of a failure must not become the failure
        pass


def _end_pool_after_failed_capture(graph: Any, device: torch.device) -> None:
    """End the graph pool's allocation routing that a failed ``capture_end`` left open (torch
    before pytorch/pytorch#180395); a no-op (its error swallowed) where torch already did."""
    try:
        torch._C._cuda_endAllocateToPool(device.index if device.index is not None else torch.cuda.current_device(),
                                         graph.pool())
    except Exception:  # noqa: BLE001 - "not currently recording to mempool": nothing was left open
        pass


def _capture(fn: Phase, device: torch.device, generators: list[torch.Generator]) -> Phase:
    check_sync_free(fn)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for g in generators:  # each replay then advances the generator's offset
        graph.register_generator_state(g)
    failure: list[BaseException] = []
    try:
        with torch.cuda.graph(graph):
            try:
                fn()
            except Exception as exc:
                failure.append(exc)  # capture_end will raise its own, generic error over this one
                raise
    except Exception as exc:
        _end_pool_after_failed_capture(graph, device)
        cause = failure[0] if failure else exc
        site = moebench_site(cause)
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise CaptureError(f"capture failed{' at ' + site if site else ''}: {type(cause).__name__}: {text}") from cause
    graph.replay()
    torch.cuda.synchronize(device)
    return graph.replay

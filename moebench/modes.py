"""Execution modes for the timed phases: eager, torch.compile, or CUDA-graph replay.

A mode turns a phase call into the call that is timed. Preparation (compiling, capturing)
and one untimed call happen here, before the runner's warm-up and measurement, so neither
compile time nor capture is ever inside a timed region.

- eager: the call as is.
- compile: ``torch.compile`` of the call (graph breaks fall back to eager for the parts
  dynamo cannot trace, e.g. numba kernels or host-side Python).
- cuda_graph: the call captured once into a ``torch.cuda.CUDAGraph`` (after warm-up on a side
  stream, as PyTorch requires) and replayed. CUDA only; a phase that synchronises with the
  host (``.item()``, ``nonzero``) cannot be captured, and its row records that error.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

MODES = ("eager", "compile", "cuda_graph")
CAPTURE_WARMUP = 3  # calls on a side stream before capture (allocator and lazy-init warm-up)


def mode_problem(mode: str, device: str) -> str | None:
    """None if ``mode`` can run on ``device``, else the reason the row is skipped."""
    if mode == "cuda_graph" and not device.startswith("cuda"):
        return f"timing mode cuda_graph needs a CUDA device; case device is {device}"
    return None


def prepare(fn: Callable[[], Any], mode: str, device: str) -> Callable[[], Any]:
    """The call to time for ``fn`` under ``mode`` (already compiled or captured, run once)."""
    if mode == "eager":
        return fn
    if mode == "compile":
        compiled = torch.compile(fn)
        compiled()  # compilation happens here, not in a timed round
        return compiled
    if mode == "cuda_graph":
        return _capture(fn, torch.device(device))
    raise ValueError(f"unknown timing mode {mode!r}; expected one of {', '.join(MODES)}")


def _capture(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    return graph.replay

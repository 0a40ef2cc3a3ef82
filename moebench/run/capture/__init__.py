"""Capturable (static-shape, sync-free) forms of the timed phases, for CUDA-graph timing.

A CUDA graph records kernels with fixed sizes and addresses; anything that reads a tensor's
value on the host (``.item()``, ``nonzero``, ``bincount``, boolean indexing, ``if tensor``)
synchronises and breaks the capture. The eager paths do that in places (tied rows in
`top_k_experts`, counts in `keep_within_capacity`, ``kept.nonzero()`` in dispatch); the forms
here compute the same results without it:

- `select`: top-k with the lowest-index tie rule in one ``topk`` over integer keys; capacity
  by one sort, ``scatter_add_`` counts and cumsum offsets; `finish_static`.
- `routes`: each capturable router's route built on `select` (`capture_route`).
- `dispatch`: dispatch into A fixed slots (kept rows first, dropped ones marked by token T)
  and combine into T + 1 rows.
- `phases`: the runner's per-phase builders for timing mode cuda_graph (`capture_builders`).

Identity with the eager paths: tests/test_capture_equal.py. No data-dependent operation:
tests/test_capture_static.py runs every capturable phase under FakeTensorMode.
"""

from moebench.run.capture.dispatch import SlotDispatched, combine_static, dispatch_static
from moebench.run.capture.phases import capture_builders, phase_problem
from moebench.run.capture.routes import capture_route, route_problem
from moebench.run.capture.select import CAPTURABLE_POLICIES, finish_static, keep_static, top_k_static

__all__ = [
    "CAPTURABLE_POLICIES", "SlotDispatched", "capture_builders", "capture_route", "combine_static",
    "dispatch_static", "finish_static", "keep_static", "phase_problem", "route_problem", "top_k_static",
]

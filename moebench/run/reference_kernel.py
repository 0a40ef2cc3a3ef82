"""A fixed reference kernel timed in every run, so runs from different machines can be compared
by speed relative to it (``moebench compare`` uses it when environments differ).

The kernel is routing-shaped work with fixed inputs: softmax and top-2 over [32768, 64] fp32
logits, then a row gather of [65536, 64] hidden states. Its cost tracks the same memory
bandwidth and reduction throughput the routers depend on.
"""

from __future__ import annotations

import torch

from moebench.core.case import Case, TimingSpec
from moebench.run.timing import clock_for, measure, pinned_threads

KERNEL = "softmax+top2 [32768,64] fp32, gather [65536,64]"
REFERENCE_TIMING = TimingSpec(warmup_rounds=3, min_rounds=10, max_rounds=200, min_time_s=0.25)


def reference_kernel(device: str):
    """A zero-argument callable running the reference kernel on ``device`` (inputs made once)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(32768, 64, generator=g, device=device)
    hidden = torch.randn(32768, 64, generator=g, device=device)
    index = torch.randint(0, 32768, (65536,), generator=g, device=device)

    def kernel():
        top = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
        return top.values, hidden.index_select(0, index)

    return kernel


def time_reference(device: str, threads: int | None) -> dict:
    """Median and 95% CI (ms) of the reference kernel on ``device``."""
    with pinned_threads(threads if device == "cpu" else None) as used:
        stats = measure(reference_kernel(device), REFERENCE_TIMING, clock_for(device))
    return {
        "kernel": KERNEL,
        "device": device,
        "threads": used,
        "median_ms": stats.median,
        "ci_low_ms": stats.ci_low,
        "ci_high_ms": stats.ci_high,
        "rounds": stats.rounds,
    }


def reference_meta(cases: list[Case], threads: int | None) -> dict:
    """meta.json fields: ``reference`` (CPU) and ``reference_by_device`` (every device run on)."""
    from moebench.run.runner import cuda_available

    devices = ["cpu"] + (["cuda"] if any(c.device.startswith("cuda") for c in cases) and cuda_available() else [])
    by_device = {d: time_reference(d, threads) for d in devices}
    return {"reference": by_device["cpu"], "reference_by_device": by_device}

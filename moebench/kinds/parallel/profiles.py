"""Hardware profiles for the cost model, each with its source, and DeepEP's published tables.

DeepEP (github.com/deepseek-ai/DeepEP, docs/legacy.md, "Performance") measured its V1 kernels
on H800 GPUs (~160 GB/s NVLink maximum), each with a CX7 InfiniBand 400 Gb/s NIC (~50 GB/s
maximum), in DeepSeek-V3/R1's settings: 7168 hidden, top-8 of 256 experts, FP8 dispatch
(7168 bytes + 56 fp32 scales per row), BF16 combine. Normal kernels: 4096 tokens per rank,
top-4 groups (node-limited); low-latency kernels: 128 tokens per rank.

The H800 profile takes its bandwidths from the hardware maxima DeepEP states (not from the
measured bandwidths, so the comparison in `moebench.kinds.parallel.published` is not circular) and
one latency, fitted by least squares to the low-latency table (`fit_ll_latency`).
"""

from __future__ import annotations

from moebench.kinds.parallel.costmodel import Profile
from moebench.kinds.parallel.spec import PROFILES  # noqa: F401  (the validator's names: h800_deepep, gloo_local)

GB = 1e9

DEEPEP_SOURCE = ("deepseek-ai/DeepEP docs/legacy.md (V1 kernels on H800, CX7 400 Gb/s IB): "
                 "~160 GB/s NVLink and ~50 GB/s RDMA maxima as stated there")

# Fitted to DeepEP's low-latency table (12 latencies, EP 8-256 dispatch and combine) as the
# mean of published latency minus this model's bandwidth term; tests/test_parallel_model.py
# re-fits it and checks this literal.
H800_LATENCY_S = 51.5e-6

H800_DEEPEP = Profile(
    name="h800_deepep",
    gpus_per_node=8,
    intra_bw=160 * GB,
    inter_bw=50 * GB,
    intra_latency_s=H800_LATENCY_S,
    inter_latency_s=H800_LATENCY_S,
    local_bw=None,
    expert_flops=None,
    source=DEEPEP_SOURCE + "; latency fitted to its low-latency table",
)

# DeepEP legacy.md, "Normal kernels with NVLink and RDMA forwarding": EP -> bottleneck GB/s
# (dispatch, combine) and the link it is measured on.
DEEPEP_NORMAL = {
    8: (153.0, 158.0, "nvlink"),
    16: (43.0, 43.0, "rdma"),
    32: (58.0, 57.0, "rdma"),
    64: (51.0, 50.0, "rdma"),
}

# DeepEP legacy.md, "Low-latency kernels with pure RDMA": EP -> (dispatch us, dispatch GB/s,
# combine us, combine GB/s).
DEEPEP_LOW_LATENCY = {
    8: (77.0, 98.0, 114.0, 127.0),
    16: (118.0, 63.0, 195.0, 74.0),
    32: (155.0, 48.0, 273.0, 53.0),
    64: (173.0, 43.0, 314.0, 46.0),
    128: (192.0, 39.0, 369.0, 39.0),
    256: (194.0, 39.0, 360.0, 40.0),
}

HIDDEN = 7168
FP8_ROW_BYTES = HIDDEN + 4 * (HIDDEN // 128)  # FP8 values + one fp32 scale per 128 channels
BF16_ROW_BYTES = 2 * HIDDEN


def gloo_profile(alpha_s: float, bw: float, source: str, cores: int = 1) -> Profile:
    """A one-node profile from a fitted ping-pong (t = alpha + bytes / bw): gloo sends to one
    peer after another (latency per peer), and loopback TCP copies run on the CPU, a transfer
    keeping about two cores busy (sender and receiver), so the node's ranks share
    bw * max(1, cores / 2)."""
    return Profile(name="gloo_local", gpus_per_node=1 << 20, intra_bw=bw, inter_bw=bw,
                   intra_latency_s=alpha_s, inter_latency_s=alpha_s, source=source,
                   fitted={"alpha_s": alpha_s, "bw": bw, "cores": cores},
                   latency_per_peer=True, node_bw=bw * max(1, cores // 2))


BUILTIN = {"h800_deepep": H800_DEEPEP}

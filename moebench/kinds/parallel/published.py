"""The cost model beside DeepEP's published tables (see `moebench.kinds.parallel.profiles`).

Low-latency kernels send one FP8 row per (token, expert) pair (no deduplication), over NVLink
to ranks of the same node and RDMA to the others; with 128 tokens per rank and top-8 of 256
experts spread evenly, rank i sends 128 * 8 / ep rows to every rank j (itself included).
DeepEP's "RDMA bandwidth" is the logical bytes (all 8 copies) over the latency; its latency is
what the model predicts.

Normal kernels deduplicate: a token crosses to a remote node once (RDMA to the GPU of the
same local index, which forwards it over NVLink) and to a rank of its own node once. The
byte matrix comes from 4096 tokens of DeepSeek-V3's node-limited routing (sigmoid scores,
8 groups, top-4 groups by the sum of each group's best two, top-8 experts) on a rank,
extended to all ranks by symmetry. DeepEP's "bottleneck bandwidth" is the bytes on the
bottleneck link (RDMA internode, NVLink intranode) over the time; the model's is the same
bytes over its predicted time.
"""

from __future__ import annotations

import torch

from moebench.kinds.parallel.costmodel import Profile, alltoall_times, link_bytes
from moebench.report.markdown import pipe_table
from moebench.kinds.parallel.profiles import (BF16_ROW_BYTES, DEEPEP_LOW_LATENCY, DEEPEP_NORMAL, FP8_ROW_BYTES,
                                        H800_DEEPEP)

EXPERTS, TOP_K, GROUPS, TOP_GROUPS = 256, 8, 8, 4
GPUS_PER_NODE = 8


def ll_bytes(ep: int, row_bytes: int, tokens: int = 128) -> torch.Tensor:
    """<float64>[ep, ep]: the low-latency setting's expected all-to-all bytes (uniform routing)."""
    return torch.full((ep, ep), tokens * TOP_K * row_bytes / ep, dtype=torch.float64)


def node_limited_topk(tokens: int, generator: torch.Generator) -> torch.Tensor:
    """<int64>[T, 8]: DeepSeek-V3's group-limited top-8 of 256 experts for random scores."""
    scores = torch.sigmoid(torch.randn(tokens, EXPERTS, generator=generator))
    grouped = scores.view(tokens, GROUPS, EXPERTS // GROUPS)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    allowed = torch.zeros(tokens, GROUPS, dtype=torch.bool)
    allowed.scatter_(1, group_score.topk(TOP_GROUPS, dim=-1).indices, True)
    masked = torch.where(allowed[:, :, None], grouped, -1.0).view(tokens, EXPERTS)
    return masked.topk(TOP_K, dim=-1).indices


def normal_bytes(ep: int, row_bytes: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """<float64>[ep, ep]: the normal kernels' bytes (deduplicated per node over RDMA, per rank
    within the node), from rank 0's tokens and the symmetry of uniform routing."""
    g = torch.Generator().manual_seed(seed)
    experts = node_limited_topk(tokens, g)
    rank = experts // (EXPERTS // ep)  # contiguous placement
    gpn = min(GPUS_PER_NODE, ep)
    nodes = ep // gpn
    node = rank // gpn
    hit_node = torch.zeros(tokens, nodes, dtype=torch.bool).scatter_(1, node, True)
    hit_rank = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, rank, True)
    from0 = torch.zeros(ep, dtype=torch.float64)  # rank 0 (node 0, local index 0) to every rank
    from0[:gpn] = hit_rank[:, :gpn].sum(0).double()
    from0[gpn::gpn] = hit_node[:, 1:].sum(0).double()  # RDMA lands on local index 0 of each node
    i = torch.arange(ep)
    rel = ((i[None, :] // gpn - i[:, None] // gpn) % nodes) * gpn + (i[None, :] - i[:, None]) % gpn
    return from0[rel] * row_bytes


def fit_ll_latency(profile: Profile = H800_DEEPEP) -> float:
    """The latency that best fits the low-latency table: mean of (published - bandwidth term)."""
    residuals = []
    for ep, (d_us, _, c_us, _) in DEEPEP_LOW_LATENCY.items():
        for us, row in ((d_us, FP8_ROW_BYTES), (c_us, BF16_ROW_BYTES)):
            zero = Profile(**{**vars(profile), "intra_latency_s": 0.0, "inter_latency_s": 0.0})
            residuals.append(us * 1e-6 - float(alltoall_times(ll_bytes(ep, row), zero).max()))
    return sum(residuals) / len(residuals)


def low_latency_rows(profile: Profile = H800_DEEPEP) -> list[dict]:
    """Per EP and phase: published and predicted latency (us) and logical bandwidth (GB/s)."""
    out = []
    for ep, (d_us, d_bw, c_us, c_bw) in DEEPEP_LOW_LATENCY.items():
        for phase, us, bw, row in (("dispatch", d_us, d_bw, FP8_ROW_BYTES), ("combine", c_us, c_bw, BF16_ROW_BYTES)):
            b = ll_bytes(ep, row)
            t = float(alltoall_times(b, profile).max())
            logical = float(b[0].sum())
            out.append({"kernel": "low_latency", "ep": ep, "phase": phase,
                        "published_us": us, "predicted_us": t * 1e6,
                        "published_GBps": bw, "predicted_GBps": logical / t / 1e9})
    return out


def normal_rows(profile: Profile = H800_DEEPEP) -> list[dict]:
    """Per EP and phase: published and predicted bottleneck bandwidth (GB/s), and the time the
    published bandwidth implies for the same bytes beside the predicted time (us)."""
    out = []
    for ep, (d_bw, c_bw, link) in DEEPEP_NORMAL.items():
        for phase, bw, row in (("dispatch", d_bw, FP8_ROW_BYTES), ("combine", c_bw, BF16_ROW_BYTES)):
            b = normal_bytes(ep, row)
            if phase == "combine":
                b = b.T.contiguous()
            x = link_bytes(b, min(GPUS_PER_NODE, ep))
            key = "send_inter" if link == "rdma" else "send_intra"
            on_link = float(torch.maximum(x[key], x[key.replace("send", "recv")]).max())
            t = float(alltoall_times(b, profile).max())
            out.append({"kernel": "normal", "ep": ep, "phase": phase, "link": link,
                        "published_GBps": bw, "predicted_GBps": on_link / t / 1e9,
                        "published_us": on_link / (bw * 1e9) * 1e6, "predicted_us": t * 1e6})
    return out


def markdown_table(rows: list[dict]) -> str:
    """The side-by-side rows as a Markdown table with the predicted/published time ratio."""
    header = ("kernel", "EP", "phase", "published us", "predicted us", "ratio", "published GB/s",
              "predicted GB/s")
    cells = [(r["kernel"], str(r["ep"]), r["phase"], f"{r['published_us']:.0f}",
              f"{r['predicted_us']:.0f}", f"{r['predicted_us'] / r['published_us']:.2f}",
              f"{r['published_GBps']:.0f}", f"{r['predicted_GBps']:.0f}") for r in rows]
    return pipe_table(header, cells, (False, True, False, True, True, True, True, True))

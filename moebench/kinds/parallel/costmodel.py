"""A cost model of an expert-parallel MoE layer: pure functions of byte matrices and a profile.

Each rank's all-to-all time is one start-up latency plus the time its busiest link class
needs: NVLink-like traffic to ranks of its own node and network traffic to other nodes run
concurrently (separate links), and a rank is done when both what it sends and what it
receives have passed::

    t_i = alpha_i + max(max(send_intra_i, recv_intra_i) / bw_intra,
                        max(send_inter_i, recv_inter_i) / bw_inter,
                        local_i / bw_local)

alpha_i is the inter-node latency when rank i has any inter-node traffic, else the intra-node
one (0 without any traffic); a message-based transport (gloo: one send per peer in turn,
``latency_per_peer``) pays it once per peer it exchanges with. Rows a rank keeps for itself
cost ``local_i / bw_local`` (free when the profile has no local bandwidth). Where the ranks of
a node share one budget (loopback TCP copies on the same CPU cores, ``node_bw``), no rank of
the node finishes before the node's intra-node bytes have passed at that rate. The all-to-all is a synchronising collective, so a
layer takes max(dispatch) + max(experts) + max(combine): the slowest rank of each phase sets
its time (`layer_times`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Profile:
    """A machine as the cost model sees it.

    gpus_per_node: ranks sharing the fast intra-node links.
    intra_bw / inter_bw: bytes/s one rank moves over intra-node (NVLink) / inter-node (RDMA) links.
    intra_latency_s / inter_latency_s: fixed start-up cost of an all-to-all phase.
    local_bw: bytes/s of a rank's copy to itself (None: free).
    latency_per_peer: the latency is paid once per peer (message-based transports), not once.
    node_bw: bytes/s all intra-node traffic of one node shares (None: no shared limit).
    expert_flops: flop/s an expert GEMM sustains (None: expert time not modelled).
    source: where the numbers come from.
    """

    name: str
    gpus_per_node: int
    intra_bw: float
    inter_bw: float
    intra_latency_s: float
    inter_latency_s: float
    local_bw: float | None = None
    expert_flops: float | None = None
    source: str = ""
    fitted: dict = field(default_factory=dict)
    latency_per_peer: bool = False
    node_bw: float | None = None


def link_bytes(bytes_matrix: torch.Tensor, gpus_per_node: int) -> dict[str, torch.Tensor]:
    """Per rank <float64>[ep]: send_intra, recv_intra, send_inter, recv_inter and local bytes of
    one all-to-all whose bytes_matrix <int|float>[ep, ep] gives bytes from rank i to rank j."""
    b = bytes_matrix.double()
    ep = b.shape[0]
    node = torch.arange(ep) // gpus_per_node
    same = node[:, None] == node[None, :]
    eye = torch.eye(ep, dtype=torch.bool)
    intra, inter = torch.where(same & ~eye, b, 0.0), torch.where(~same, b, 0.0)
    return {
        "send_intra": intra.sum(1), "recv_intra": intra.sum(0),
        "send_inter": inter.sum(1), "recv_inter": inter.sum(0),
        "local": b.diagonal().clone(),
    }


def alltoall_times(bytes_matrix: torch.Tensor, profile: Profile) -> torch.Tensor:
    """<float64>[ep]: seconds each rank spends in one all-to-all (see the module docstring)."""
    x = link_bytes(bytes_matrix, profile.gpus_per_node)
    intra = torch.maximum(x["send_intra"], x["recv_intra"])
    inter = torch.maximum(x["send_inter"], x["recv_inter"])
    t = torch.maximum(intra / profile.intra_bw, inter / profile.inter_bw)
    if profile.local_bw:
        t = torch.maximum(t, x["local"] / profile.local_bw)
    if profile.node_bw:
        node = torch.arange(t.numel()) // profile.gpus_per_node
        node_bytes = torch.zeros(int(node.max()) + 1, dtype=torch.float64).index_add_(0, node, x["send_intra"])
        t = torch.maximum(t, node_bytes[node] / profile.node_bw)
    alpha = torch.where(inter > 0, profile.inter_latency_s, torch.where(intra > 0, profile.intra_latency_s, 0.0))
    if profile.latency_per_peer:
        b = bytes_matrix.double()
        peers = ((b > 0) | (b.T > 0)).fill_diagonal_(False).sum(1)
        alpha = alpha * peers
    return t + alpha


def expert_times(rows_per_rank: torch.Tensor, flops_per_row: float, profile: Profile) -> torch.Tensor:
    """<float64>[ep]: seconds of each rank's experts for rows <int>[ep] at ``flops_per_row``
    (zeros for identity experts or a profile without ``expert_flops``)."""
    if not flops_per_row or not profile.expert_flops:
        return torch.zeros(rows_per_rank.numel(), dtype=torch.float64)
    return rows_per_rank.double() * flops_per_row / profile.expert_flops


def mlp_flops_per_row(hidden: int, ffn_hidden: int) -> float:
    """Flops of one row through a two-GEMM expert MLP [d -> f -> d] (2 flops per multiply-add)."""
    return 2.0 * 2 * hidden * ffn_hidden


def layer_times(dispatch_bytes: torch.Tensor, combine_bytes: torch.Tensor, rows_per_rank: torch.Tensor,
                profile: Profile, flops_per_row: float = 0.0) -> dict:
    """Predicted times (seconds) of one MoE layer.

    dispatch_bytes / combine_bytes <int|float>[ep, ep]: bytes from rank i to rank j in each
    all-to-all (the combine's is normally the dispatch's transpose, in the combine dtype).
    rows_per_rank <int>[ep]: rows each rank's experts process.
    Returns per-rank tensors ``dispatch``, ``experts``, ``combine`` and ``rank_layer`` (their
    sum) [ep], and the synchronised ``layer`` = max(dispatch) + max(experts) + max(combine).
    """
    d = alltoall_times(dispatch_bytes, profile)
    c = alltoall_times(combine_bytes, profile)
    e = expert_times(rows_per_rank, flops_per_row, profile)
    return {"dispatch": d, "experts": e, "combine": c, "rank_layer": d + e + c,
            "layer": float(d.max() + e.max() + c.max())}


def fit_latency_bandwidth(sizes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Fit of t = alpha + n / bw to (bytes n, seconds t) samples: (alpha, bw), least squares
    in relative error (each sample divided by its t, so small messages fix alpha and large
    ones bw instead of the largest dominating both).

    alpha is clamped at 0 (a negative intercept means the samples cannot resolve it).
    """
    n = torch.tensor(sizes, dtype=torch.float64)
    t = torch.tensor(seconds, dtype=torch.float64)
    a = torch.stack([torch.ones_like(n), n], 1) / t[:, None]
    alpha, inv_bw = torch.linalg.lstsq(a, torch.ones_like(t)[:, None]).solution[:, 0].tolist()
    if alpha < 0:  # refit through the origin
        alpha, inv_bw = 0.0, float((n * t).sum() / (n * n).sum())
    return alpha, 1.0 / inv_bw

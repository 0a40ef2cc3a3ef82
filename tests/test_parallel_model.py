"""The cost model: hand-computed cases, DeepEP's published tables, and the suite block."""

from __future__ import annotations

import pytest
import torch

from moebench.core.errors import SuiteError
from moebench.kinds.parallel import published
from moebench.kinds.parallel.costmodel import Profile, alltoall_times, fit_latency_bandwidth, layer_times, link_bytes
from moebench.kinds.parallel.placement import eplb
from moebench.kinds.parallel.plan import rank_plan, row_matrix, shard_bounds
from moebench.kinds.parallel.profiles import H800_LATENCY_S
from moebench.kinds.parallel.rows import model_matrix
from moebench.routers.base import RouteContext
from moebench.routers.registry import ROUTERS
from moebench.suite.load import validate_document
from moebench.core.workloads import WORKLOADS, BatchShape

TOY = Profile("toy", gpus_per_node=2, intra_bw=100.0, inter_bw=10.0, intra_latency_s=1.0, inter_latency_s=5.0)


def test_alltoall_hand_case():
    # ranks 0,1 on node 0; 2,3 on node 1. Rank 0 sends 200 B to rank 1 (intra) and 30 B to
    # rank 2 (inter); rank 3 only keeps 50 B for itself.
    b = torch.zeros(4, 4)
    b[0, 1], b[0, 2], b[3, 3] = 200, 30, 50
    t = alltoall_times(b, TOY)
    # rank 0: 5 + max(200/100, 30/10) = 8; rank 1: recv 200 intra: 1 + 2 = 3;
    # rank 2: recv 30 inter: 5 + 3 = 8; rank 3: local only, free: 0
    assert t.tolist() == [8.0, 3.0, 8.0, 0.0]
    x = link_bytes(b, 2)
    assert x["send_inter"].tolist() == [30, 0, 0, 0] and x["local"].tolist() == [0, 0, 0, 50]


def test_layer_time_is_the_sum_of_each_phases_slowest_rank():
    b = torch.tensor([[0.0, 100.0], [0.0, 0.0]])
    p = Profile("p", 2, 100.0, 100.0, 0.0, 0.0, expert_flops=10.0)
    t = layer_times(b, b.T, torch.tensor([0, 30]), p, flops_per_row=1.0)
    assert t["dispatch"].tolist() == [1.0, 1.0] and t["experts"].tolist() == [0.0, 3.0]
    assert t["layer"] == 1.0 + 3.0 + 1.0
    assert t["rank_layer"].tolist() == [2.0, 5.0]


def test_fit_recovers_latency_and_bandwidth():
    sizes = [1e3, 1e4, 1e5, 1e6]
    alpha, bw = fit_latency_bandwidth(sizes, [20e-6 + n / 2e9 for n in sizes])
    assert alpha == pytest.approx(20e-6, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)


def test_model_reproduces_deepep_published_tables():
    # the profile's latency literal is the least-squares fit to the low-latency table
    assert published.fit_ll_latency() == pytest.approx(H800_LATENCY_S, abs=0.5e-6)
    rows = published.low_latency_rows() + published.normal_rows()
    assert len(rows) == 12 + 8
    for r in rows:  # stated tolerance: every predicted time within 25% of the published one
        assert 0.75 < r["predicted_us"] / r["published_us"] < 1.25, r
    ll8 = next(r for r in rows if r["kernel"] == "low_latency" and r["ep"] == 8 and r["phase"] == "dispatch")
    # the table's logical bandwidth is the 128 x 8 FP8 rows over its latency
    assert 128 * 8 * published.FP8_ROW_BYTES / (ll8["published_us"] * 1e-6) / 1e9 == pytest.approx(98, rel=0.02)


def test_model_matrix_equals_the_engine_plans():
    inputs = WORKLOADS.create("zipf", {"s": 1.2}).batch(BatchShape(64, 8, 4), seed=3)
    routing = ROUTERS.create("topk", {}).route(inputs, RouteContext(2, None))
    load = routing.load().double()
    placement = eplb(load, 4, redundant=4)
    plans = []
    for r in range(4):
        lo, hi = shard_bounds(64, 4, r)
        keep = (routing.token_index >= lo) & (routing.token_index < hi)
        shard = type(routing)(**{**routing.__dict__, "token_index": routing.token_index[keep] - lo,
                                 "expert_index": routing.expert_index[keep], "choice": routing.choice[keep],
                                 "weight": routing.weight[keep], "kept": routing.kept[keep],
                                 "probs": routing.probs[lo:hi], "logits": routing.logits[lo:hi]})
        plans.append(rank_plan(shard, placement, lo))
    assert torch.equal(model_matrix(routing, placement, 64), row_matrix(plans))
    assert int(row_matrix(plans).sum()) == 64 * 2


DOC = {"name": "p", "version": 1, "routers": ["topk"],
       "grid": {"workload": "uniform", "tokens": 64, "experts": 8, "top_k": 2}}


@pytest.mark.parametrize("block, field, words", [
    ({"ep": 2, "placment": "eplb"}, "parallel.placment", "did you mean 'placement'"),
    ({"ep": [2, 4]}, "parallel.ep", "mode: model"),
    ({"ep": 3}, "parallel.ep", "tokens=64 do not split evenly over ep=3"),
    ({"ep": 4, "placement": "eplb", "redundant_experts": 2}, "parallel.ep", "experts + redundant_experts = 10"),
    ({"ep": 4, "nodes": 3}, "parallel.nodes", "divisor of ep"),
    ({"placement": "eplb"}, "parallel.ep", "missing required field"),
    ({"ep": 2, "experts": "ffn"}, "parallel.experts", "unknown expert kind"),
])
def test_bad_parallel_blocks_name_file_and_field(block, field, words):
    with pytest.raises(SuiteError) as err:
        validate_document({**DOC, "parallel": block}, "suite.yaml")
    assert err.value.file == "suite.yaml" and err.value.field == field and words in err.value.message


def test_good_parallel_block():
    suite = validate_document({**DOC, "parallel": {"mode": "model", "ep": [2, 4, 8], "profile": "h800_deepep"}}, "s")
    assert suite.parallel.ep == (2, 4, 8) and suite.parallel.mode == "model"
    assert validate_document(DOC, "s").parallel is None


def test_inter_node_fraction_hand_case():
    from moebench.kinds.parallel.rows import _inter_node

    m = torch.tensor([[1, 2, 3, 4], [1, 1, 1, 1], [0, 0, 5, 5], [2, 0, 0, 0]])
    assert _inter_node(m, 2) == pytest.approx((3 + 4 + 1 + 1 + 2) / 26)  # ranks {0,1} and {2,3}

"""Peer adapters (moebench.peers): lazy loading, skip reasons, conversion, conformance.

Tests marked by a peer library use pytest.importorskip: without `pip install 'moebench[peers]'`
(the CI venv) they skip and only the library-free tests run.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.case import TimingSpec
from moebench.core.errors import WorkloadMismatchError
from moebench.peers import base as peer_base
from moebench.peers.base import PeerSkip, factor_for_capacity, rank_major
from moebench.run.peer_conformance import PAIRS, compare, main as conformance_main, replayed_kept, time_rows
from moebench.routers.base import RouteContext, RouteInputs
from moebench.routers.registry import ROUTERS
from moebench.core.workloads import WORKLOADS, BatchShape

PEERS = ["peer:megatron.topk", "peer:megatron.sinkhorn", "peer:deepspeed.topkgating", "peer:deepspeed.top1gating",
         "peer:deepspeed.top2gating", "peer:hf.mixtral"]


def ctx(k, capacity, policy="probs", seed=0):
    return RouteContext(k, capacity, policy, torch.Generator().manual_seed(seed))


def route(name, params, logits, k, capacity, policy="probs", seed=0):
    return ROUTERS.create(name, params).route(RouteInputs(logits), ctx(k, capacity, policy, seed))


def logits_of(workload, tokens, experts, seed=0, **params):
    return WORKLOADS.create(workload, params).batch(BatchShape(tokens, experts, 8), seed, 0).logits


def kept_pairs(routing):
    return {(int(t), int(e)) for t, e, kp in zip(routing.token_index, routing.expert_index, routing.kept) if kp}


# --- without any peer library -------------------------------------------------------------------


def test_peers_registered_without_importing_their_libraries():
    code = (
        "import sys\nfrom moebench.routers.registry import ROUTERS\nnames = ROUTERS.classes()\n"
        f"assert all(n in names for n in {PEERS!r}), names\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'deepspeed', 'transformers')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_library_is_a_skip_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(peer_base, "_LIBRARIES", {})
    real = peer_base.importlib.util.find_spec
    monkeypatch.setattr(peer_base.importlib.util, "find_spec", lambda n, *a: None if n == "megatron" else real(n, *a))
    router = ROUTERS.create("peer:megatron.topk")
    assert router.applicable(2, 8) == "megatron-core is not installed; pip install 'moebench[peers]'"
    with pytest.raises(WorkloadMismatchError, match="pip install 'moebench\\[peers\\]'"):
        router.route(RouteInputs(torch.randn(16, 8)), ctx(2, None))


def test_broken_library_import_is_a_skip(monkeypatch):
    monkeypatch.setattr(peer_base, "_LIBRARIES", {})
    reason = peer_base.library_problem("moebench.peers._no_such_module_", "nothing")
    assert reason.startswith("nothing is installed but failed to import: ModuleNotFoundError")


def test_fixed_top_k_and_options_are_checked_without_the_library():
    assert "exactly 1 expert" in ROUTERS.create("peer:deepspeed.top1gating").applicable(2, 8)
    assert "exactly 2 expert" in ROUTERS.create("peer:deepspeed.top2gating").applicable(1, 8)
    assert ROUTERS.problem("peer:megatron.topk", {"num_groups": 4}) is not None
    assert ROUTERS.problem("peer:deepspeed.topkgating", {"capacity_factor": -1.0}) is not None
    assert ROUTERS.problem("peer:megatron.topk", {"score_function": "relu"}) is not None


def _megatron_formula(t, e, k):
    return lambda cf: math.ceil((t * k / e) * cf)


def _deepspeed_formula(t, e, scale):
    return lambda cf: int(torch.ceil((t / e) * torch.tensor(cf * scale)).to(torch.int64))


@pytest.mark.parametrize("t,e,k,cf", [(1000, 10, 1, 1.1), (1000, 10, 2, 1.1), (65536, 64, 2, 1.25), (4096, 64, 2, 1.1),
                                      (100, 64, 1, 1.0), (7, 3, 2, 0.3)])
def test_factor_for_capacity_makes_the_peer_formula_give_the_case_capacity(t, e, k, cf):
    target = expert_capacity(CapacitySpec(cf), t, e, k)
    for formula in (_megatron_formula(t, e, k), _deepspeed_formula(t, e, k)):
        found = factor_for_capacity(formula, target, target * e / (t * k))
        assert formula(found) == target


def test_megatron_float_formula_differs_from_the_exact_one():
    # the documented case: 100 * 1.1 = 110.00000000000001 in float64
    assert expert_capacity(CapacitySpec(1.1), 1000, 10, 1) == 110
    assert _megatron_formula(1000, 10, 1)(1.1) == 111
    assert _deepspeed_formula(1000, 10, 1)(1.1) == 110


def _routing(expert, weight, kept, capacity, experts):
    expert = torch.tensor(expert)
    t = expert.shape[0]
    probs = torch.full((t, experts), 1.0 / experts)
    return rank_major(expert, torch.tensor(weight), torch.tensor(kept), probs, torch.zeros(t, experts), capacity)


def test_compare_and_replay_on_hand_made_routings():
    # token 0 asks (e0, e1), token 1 asks (e1, e0); capacity 1
    choice_major = _routing([[0, 1], [1, 0]], [[0.6, 0.4], [0.9, 0.1]], [[True, False], [True, False]], 1, 2)
    token_order = _routing([[0, 1], [1, 0]], [[0.6, 0.4], [0.9, 0.1]], [[True, True], [False, False]], 1, 2)
    assert replayed_kept(choice_major, "choice_major").tolist() == choice_major.kept.tolist()
    assert replayed_kept(token_order, "token_order").tolist() == token_order.kept.tolist()
    assert replayed_kept(token_order, "topk_ties") is None
    same = compare(choice_major, choice_major, "choice_major")
    assert same["kept"] == 1.0 and same["selection"] == 1.0 and same["replayed"] is True
    diff = compare(choice_major, token_order)
    assert diff["only_peer"] == 1 and diff["only_ours"] == 1 and diff["kept"] == 1 / 3
    assert diff["drops_ours"] == diff["drops_peer"] == 2 and diff["per_expert_drops_equal"]
    fewer = _routing([[0, 1], [1, 0]], [[0.6, 0.4], [0.9, 0.1]], [[True, False], [False, False]], 1, 2)
    assert not compare(choice_major, fewer)["per_expert_drops_equal"]


def test_conformance_script_runs_without_or_with_peers(capsys):
    assert conformance_main(["--tokens", "256", "--experts", "8", "--no-timing", "--workloads", "zipf"]) == 0
    out = capsys.readouterr().out
    assert "| pair | workload | policy |" in out and "## Capacity per expert by formula" in out
    for pair in PAIRS:
        assert pair.label in out


# --- Megatron-Core -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron():
    return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def _hand_picked_probs_case():
    """Two tokens both want expert 0 (capacity 1). Token A: p = (.40, .40, .20) -> renormalised
    weight of e0 = .5; token B: p = (.45, .05, .50) -> .45 / .95 = .474. Raw ranking keeps B,
    renormalised ranking keeps A."""
    return torch.tensor([[0.40, 0.40, 0.20], [0.45, 0.05, 0.50]]).log()


def test_megatron_probs_drops_rank_by_the_renormalised_weight(megatron):
    x = _hand_picked_probs_case()
    peer = route("peer:megatron.topk", {}, x, 2, 1)
    assert (0, 0) in kept_pairs(peer) and (1, 0) not in kept_pairs(peer)
    ours = route("topk", {"softmax_after_topk": True}, x, 2, 1)
    assert kept_pairs(ours) == kept_pairs(peer)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ours,peer", [
    ({"softmax_after_topk": True}, {}),
    ({}, {"use_pre_softmax": True}),
    ({"score": "sigmoid", "renormalize": True}, {"score_function": "sigmoid"}),
])
def test_megatron_topk_probs_agrees_exactly(megatron, seed, ours, peer):
    x = logits_of("zipf", 2048, 16, seed, s=1.2)
    capacity = expert_capacity(CapacitySpec(1.0), 2048, 16, 2)
    a = route("topk", ours, x, 2, capacity)
    b = route("peer:megatron.topk", peer, x, 2, capacity)
    result = compare(a, b, "weight")
    assert result["drops_peer"] > 0
    assert result["selection"] == 1.0 and result["kept"] == 1.0 and result["replayed"] is True
    assert result["max_dw"] < 1e-6
    assert b.capacity == capacity


def test_megatron_position_keeps_an_implementation_defined_subset(megatron):
    x = logits_of("zipf", 2048, 16, 0, s=1.2)
    capacity = expert_capacity(CapacitySpec(1.0), 2048, 16, 2)
    a = route("topk", {"softmax_after_topk": True}, x, 2, capacity, "position")
    b = route("peer:megatron.topk", {}, x, 2, capacity, "position")
    result = compare(a, b)
    # same selection and capacity: the per-expert drop counts agree, which tokens keep a slot does not
    assert result["selection"] == 1.0 and result["per_expert_drops_equal"]
    assert int(b.load().max()) <= capacity


def test_megatron_capacity_factor_option_uses_megatrons_formula(megatron):
    x = torch.randn(1000, 10)
    r = route("peer:megatron.topk", {"capacity_factor": 1.1}, x, 1, 110)
    assert r.capacity == 111 == megatron.get_capacity(1000, 10, 1.1)


def test_megatron_sinkhorn_matches_moebench_sinkhorn(megatron):
    if "sinkhorn" not in ROUTERS.classes():
        pytest.skip("moebench sinkhorn router not registered")
    for k in (1, 2):
        x = logits_of("zipf", 1024, 16, 3, s=1.2)
        capacity = expert_capacity(CapacitySpec(1.25), 1024, 16, k)
        result = compare(route("sinkhorn", {}, x, k, capacity), route("peer:megatron.sinkhorn", {}, x, k, capacity), "weight")
        assert result["selection"] >= 0.99 and result["replayed"] is True


def test_unsupported_policy_is_a_skip(megatron):
    with pytest.raises(PeerSkip, match="no 'bpr' drop policy"):
        route("peer:megatron.topk", {}, torch.randn(8, 4), 2, 4, "bpr")


def test_repeated_route_reuses_the_conversion(megatron):
    router = ROUTERS.create("peer:megatron.topk")
    inputs, c = RouteInputs(torch.randn(256, 8)), ctx(2, 80)
    first = router.route(inputs, c)
    assert router.route(inputs, c) is first
    assert router.route(RouteInputs(inputs.logits.clone()), c) is not first
    probs, routing_map, _, kept_map = router.native(inputs, c)()
    assert routing_map.shape == kept_map.shape == (256, 8)


# --- DeepSpeed -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed():
    return pytest.importorskip("deepspeed.moe.sharded_moe")


def test_deepspeed_probs_drops_rank_by_the_raw_probability(deepspeed):
    x = _hand_picked_probs_case()
    peer = route("peer:deepspeed.topkgating", {}, x, 2, 1)
    assert (1, 0) in kept_pairs(peer) and (0, 0) not in kept_pairs(peer)
    assert kept_pairs(route("topk", {}, x, 2, 1)) == kept_pairs(peer)  # raw ranking: same
    assert kept_pairs(route("topk", {"renormalize": True}, x, 2, 1)) != kept_pairs(peer)


def test_deepspeed_position_conventions(deepspeed):
    # token 0: (e1, e0), token 1: (e0, e2); capacity 1. Token order keeps token 0's 2nd choice
    # for e0; choice-major (GShard, moebench, top2gating) keeps token 1's 1st choice.
    x = torch.tensor([[2.0, 3.0, 0.0], [3.0, 0.0, 2.0]])
    topk = route("peer:deepspeed.topkgating", {}, x, 2, 1, "position")
    top2 = route("peer:deepspeed.top2gating", {}, x, 2, 1, "position")
    ours = route("topk", {}, x, 2, 1, "position")
    assert (0, 0) in kept_pairs(topk) and (1, 0) not in kept_pairs(topk)
    assert (1, 0) in kept_pairs(top2) and (0, 0) not in kept_pairs(top2)
    assert kept_pairs(ours) == kept_pairs(top2)


@pytest.mark.parametrize("seed", [0, 1])
def test_deepspeed_agrees_where_conventions_match_and_differs_exactly_by_them(deepspeed, seed):
    x = logits_of("zipf", 2048, 16, seed, s=1.2)
    capacity = expert_capacity(CapacitySpec(1.0), 2048, 16, 2)
    peer = route("peer:deepspeed.topkgating", {}, x, 2, capacity)
    raw = compare(route("topk", {}, x, 2, capacity), peer, "raw_prob")
    assert raw["kept"] == 1.0 and raw["replayed"] is True and raw["drops_peer"] > 0
    renorm = compare(route("topk", {"renormalize": True, "renormalize_after_drop": True}, x, 2, capacity), peer, "raw_prob")
    assert renorm["kept"] < 1.0 and renorm["per_expert_drops_equal"] and renorm["replayed"] is True
    pos = route("peer:deepspeed.topkgating", {}, x, 2, capacity, "position")
    assert compare(route("topk", {}, x, 2, capacity, "position"), pos, "token_order")["replayed"] is True
    top2 = route("peer:deepspeed.top2gating", {}, x, 2, capacity, "position")
    gshard = route("gshard", {"second_expert_sampling": False, "renormalize_after_drop": True}, x, 2, capacity, "position")
    result = compare(gshard, top2, "choice_major")
    assert result["kept"] == 1.0 and result["replayed"] is True and result["max_dw"] < 1e-6


def test_deepspeed_top1_and_its_random_token_selection(deepspeed):
    x = logits_of("zipf", 1024, 8, 0, s=1.2)
    capacity = expert_capacity(CapacitySpec(1.0), 1024, 8, 1)
    switch = route("switch", {}, x, 1, capacity, "position")
    for policy in ("position", "random"):
        peer = route("peer:deepspeed.top1gating", {}, x, 1, capacity, policy, seed=5)
        assert compare(switch, peer)["per_expert_drops_equal"]
        again = route("peer:deepspeed.top1gating", {}, x, 1, capacity, policy, seed=5)
        assert torch.equal(peer.kept, again.kept)  # seeded from the case's stream
    with pytest.raises(PeerSkip, match="no 'probs' drop policy"):
        route("peer:deepspeed.top1gating", {}, x, 1, capacity, "probs")


def test_deepspeed_top2_sampling_is_seeded_and_leaves_the_logits_alone(deepspeed):
    x = logits_of("uniform", 512, 8, 0)
    before = x.clone()
    capacity = expert_capacity(CapacitySpec(1.0), 512, 8, 2)
    a = route("peer:deepspeed.top2gating", {"second_expert_sampling": True}, x, 2, capacity, "position", seed=3)
    b = route("peer:deepspeed.top2gating", {"second_expert_sampling": True}, x, 2, capacity, "position", seed=3)
    assert torch.equal(x, before)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.kept, b.kept)
    plain = route("peer:deepspeed.top2gating", {}, x, 2, capacity, "position")
    assert not torch.equal(a.expert_index, plain.expert_index)  # the 2nd expert is sampled


@pytest.mark.parametrize("name,k,policy", [("peer:deepspeed.topkgating", 2, "probs"), ("peer:deepspeed.top1gating", 1, "position"),
                                           ("peer:deepspeed.top2gating", 2, "position")])
def test_deepspeed_dense_and_sparse_outputs_convert_alike(deepspeed, name, k, policy):
    x = logits_of("zipf", 512, 8, 1, s=1.2)
    for capacity in (expert_capacity(CapacitySpec(1.0), 512, 8, k), None):
        sparse = route(name, {}, x, k, capacity, policy)
        dense = route(name, {"sparse_routes": False}, x, k, capacity, policy)
        if name.endswith("top1gating") and capacity is not None:  # topk ties: only counts are defined
            assert torch.equal(sparse.load(), dense.load())
            continue
        assert torch.equal(sparse.kept, dense.kept) and torch.equal(sparse.expert_index, dense.expert_index)
        assert torch.allclose(sparse.weight, dense.weight)
    with pytest.raises(PeerSkip, match="exceeds max_dense_elements"):
        route(name, {"sparse_routes": False, "max_dense_elements": 1000}, x, k, 128, policy)


# --- Hugging Face transformers ---------------------------------------------------------------------


def test_hf_mixtral_matches_topk_renormalised():
    pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    x = logits_of("zipf", 1024, 16, 0, s=1.2)
    peer = route("peer:hf.mixtral", {}, x, 2, None)
    ours = route("topk", {"renormalize": True}, x, 2, None)
    assert torch.equal(peer.expert_index, ours.expert_index) and bool(peer.kept.all())
    assert torch.allclose(peer.weight, ours.weight, atol=1e-6)
    with pytest.raises(PeerSkip, match="dropless"):
        route("peer:hf.mixtral", {}, x, 2, 160)


# --- the time table ------------------------------------------------------------------------------


def test_time_rows_on_a_tiny_shape():
    pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    timing = TimingSpec(warmup_rounds=0, min_rounds=1, max_rounds=1, min_time_s=0.0, threads=1)
    rows = time_rows(PAIRS[:1], 256, 8, 1.25, timing)
    assert rows[0]["status"] == "ok" and rows[0]["peer_ms"] > 0 and rows[0]["moebench_ms"] > 0

"""The engine on 2 gloo ranks against the single-process layer; a dead rank ends the case clearly.

Each launch costs a few seconds (process start, gloo rendezvous), so each test is one launch.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from moebench.core.case import Case, NamedSpec
from moebench.kinds.parallel.layer import Experts, global_batches, reference_layer, route_shard, shard_inputs
from moebench.kinds.parallel.placement import Placement
from moebench.kinds.parallel.plan import byte_matrix, rank_plan, shard_bounds
from moebench.kinds.parallel.rows import engine_rows
from moebench.kinds.parallel.spec import ParallelSpec
from moebench.routers.registry import ROUTERS

BASE = {"run_id": "test", "suite": "test"}


def run(case, spec, routers, **kw):
    records: list = []
    rows = list(engine_rows(case, spec, routers, {**BASE, **case.axes()}, threads=1, warmup=0, rounds=1,
                            keep_outputs=True, records_out=records, **kw))
    return rows, records


def check_against_reference(case, spec, record, row, exact: bool):
    router = ROUTERS.create(record["router"].name, record["router"].params)
    experts = Experts(spec.experts, case.hidden, spec.ffn_hidden, case.seed, torch.float32, "cpu")
    states = [router.init_state(case.experts, torch.device("cpu")) for _ in range(spec.world_size)]
    for b, (inputs, gathered) in enumerate(zip(global_batches(case, "cpu"), record["batches"])):
        for r, g in enumerate(gathered):
            lo, hi = shard_bounds(case.tokens, spec.world_size, r)
            local = shard_inputs(inputs, lo, hi)
            routing = route_shard(router, local, case, r, b, states[r])
            expected = reference_layer(routing, local.hidden, experts)
            if exact:
                assert torch.equal(g["out"], expected), (b, r)
            else:
                torch.testing.assert_close(g["out"], expected, rtol=1e-5, atol=1e-6)
            router.update_state(states[r], routing)
    # the row's byte matrix is the one the Routings imply on the placement the ranks used
    last = record["batches"][-1]
    placement = Placement(torch.tensor(json.loads(row["slot_expert"])), spec.world_size, case.experts)
    plans = [rank_plan(g["routing"], placement, shard_bounds(case.tokens, spec.world_size, r)[0])
             for r, g in enumerate(last)]
    assert json.loads(row["byte_matrix"]) == byte_matrix(plans, case.hidden, 4).tolist()
    assert row["tokens_conserved"] and row["exchange_matches_routing"]
    assert sum(json.loads(row["tokens_per_rank"])) == sum(int(g["routing"].kept.sum()) for g in last)


@pytest.mark.parametrize("ep", [2, 4])
def test_identity_experts_bit_for_bit_with_eplb_replicas(ep):
    # top-3 (so the order of the three weighted adds matters), EPLB with 2 replica slots whose
    # loads come from the earlier batch (ema), Soft MoE skipped by every rank together
    case = Case(NamedSpec("zipf", {"s": 1.2}), tokens=96, experts=6, top_k=3, capacity_factor=None, hidden=8,
                batches=2)
    spec = ParallelSpec(ep=(ep,), placement="eplb", redundant_experts=2, load_estimate="ema", experts="identity",
                        timeout_s=60)
    rows, records = run(case, spec, [NamedSpec("topk"), NamedSpec("soft_moe")])
    assert [r.row["status"] for r in rows] == ["ok", "skipped"]
    assert "Soft MoE" in rows[1].row["reason"]
    row = rows[0].row
    assert row["world_size"] == ep and row["backend"] == "gloo" and row["placement_policy"].startswith("eplb-")
    assert len(json.loads(row["slot_expert"])) == 8
    for key in ("layer_ms", "a2a_ms", "expert_ms", "straggler_ratio", "rank_imbalance"):
        assert row[key] > 0
    for phase in ("layer", "a2a", "expert", "dispatch", "combine"):  # summarized like every timed phase
        low, high = row[f"{phase}_ms_ci_low"], row[f"{phase}_ms_ci_high"]
        assert (low is None) == (high is None)
        if low is not None:
            assert low <= row[f"{phase}_ms"] <= high
    check_against_reference(case, spec, records[0], row, exact=True)


def test_mlp_experts_within_fp32_tolerance_with_capacity():
    case = Case(NamedSpec("uniform"), tokens=64, experts=4, top_k=2, capacity_factor=1.0, hidden=8)
    spec = ParallelSpec(ep=(2,), placement="round_robin", experts="mlp", ffn_hidden=16, timeout_s=60)
    rows, records = run(case, spec, [NamedSpec("topk")])
    row = rows[0].row
    assert row["status"] == "ok" and row["drop_rate"] > 0  # capacity per rank: some drops
    check_against_reference(case, spec, records[0], row, exact=False)


@pytest.mark.parametrize("kind", ["exit", "hang"])
def test_a_dead_or_hung_rank_ends_the_case_with_a_clear_message(kind):
    # exit: the launcher sees rank 1 die and stops rank 0 (or rank 0's collective sees the
    # closed connection first); hang: rank 0's all-to-all gives up after timeout_s
    case = Case(NamedSpec("uniform"), tokens=32, experts=4, top_k=1, capacity_factor=None, hidden=4)
    spec = ParallelSpec(ep=(2,), experts="identity", timeout_s=5)
    start = time.monotonic()
    rows, _ = run(case, spec, [NamedSpec("topk"), NamedSpec("switch")],
                  fault={"rank": 1, "at": "dispatch", "kind": kind})
    # a failed launch is retried router by router (#23): only the router the fault is armed
    # for loses its row
    assert time.monotonic() - start < 2 * spec.timeout_s + 60  # each launch takes a few seconds
    assert [r.row["status"] for r in rows] == ["error", "ok"]
    assert rows[0].row["redo_on_resume"] is True
    reason = rows[0].row["reason"]
    assert reason.startswith("LaunchFailure: rank ")
    if kind == "hang":
        assert "rank 0 exited with code 1" in reason and "another rank died or hung" in reason
    else:
        assert "rank 1 exited with code 3" in reason or "another rank died or hung" in reason


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_nccl_rank_on_cuda_matches_the_reference():
    case = Case(NamedSpec("zipf", {"s": 1.2}), tokens=256, experts=8, top_k=2, capacity_factor=None, hidden=16,
                device="cuda")
    spec = ParallelSpec(ep=(1,), experts="mlp", ffn_hidden=32, timeout_s=120)
    rows, records = run(case, spec, [NamedSpec("topk")])
    row = rows[0].row
    assert row["status"] == "ok", row["reason"]
    assert row["backend"] == "nccl" and row["tokens_conserved"] and row["exchange_matches_routing"]
    router = ROUTERS.create("topk", {})
    experts = Experts("mlp", 16, 32, 0, torch.float32, "cuda")
    inputs = global_batches(case, "cuda")[0]
    routing = route_shard(router, inputs, case, 0, 0, None)
    expected = reference_layer(routing, inputs.hidden, experts).cpu()
    torch.testing.assert_close(records[0]["batches"][0][0]["out"], expected, rtol=1e-4, atol=1e-5)


TORCHRUN_SUITE = """
name: ep2
version: 1
grid: {workload: {name: zipf, params: {s: 1.2}}, tokens: 128, experts: 8, top_k: 2, capacity_factor: null, hidden: 8}
routers: [topk, switch]
parallel: {ep: 2, placement: eplb, redundant_experts: 2, experts: mlp, ffn_hidden: 16, timeout_s: 60}
timing: {warmup_rounds: 0, min_rounds: 1, threads: 1}
"""


def test_torchrun_ranks_follow_rank_0_into_one_run(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from moebench.store.runs import load_run

    suite = tmp_path / "ep2.yaml"
    suite.write_text(TORCHRUN_SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MOEBENCH"))}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moebench",
         "run", str(suite), "--results", str(tmp_path / "r"), "--no-report"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = list((tmp_path / "r" / "ep2").iterdir())
    rows = {r["router"]: r for r in load_run(run).rows()}
    assert rows["topk"]["status"] == "ok" and rows["switch"]["status"] == "skipped"
    assert rows["topk"]["world_size"] == 2 and rows["topk"]["exchange_matches_routing"]


def test_start_method_is_checked_before_any_rank_starts(monkeypatch):
    from moebench.run import machine as environment
    from moebench.kinds.parallel import launch

    monkeypatch.setenv("MOEBENCH_START_METHOD", "frok")
    with pytest.raises(launch.LaunchFailure, match="expected one of forkserver, spawn, fork"):
        launch._start_method()
    monkeypatch.setenv("MOEBENCH_START_METHOD", "fork")
    monkeypatch.setattr(environment, "numba_layer_in_use", lambda: "workqueue")
    assert launch._start_method() == "fork"
    monkeypatch.setattr(environment, "numba_layer_in_use", lambda: "omp")  # a forked child would abort
    with pytest.raises(launch.LaunchFailure, match="use forkserver"):
        launch._start_method()
    monkeypatch.delenv("MOEBENCH_START_METHOD")
    assert launch._start_method() == "forkserver"


def test_quiet_launcher_silences_child_loggers_with_levels_of_their_own():
    # torch's elastic module loggers carry their own level: setting only the parent let
    # "Received 15 death signal, shutting down workers" through on every SIGTERM'd parallel run
    import logging

    from moebench.kinds.parallel.launch import _quiet_launcher

    child = logging.getLogger("torch.distributed.elastic.agent.server.api")
    child.setLevel(logging.WARNING)
    with _quiet_launcher():
        assert not child.isEnabledFor(logging.WARNING) and child.isEnabledFor(logging.CRITICAL)
    assert child.level == logging.WARNING

"""Memory estimates before allocating (moebench/run/memory_estimate.py), lazy streams
(moebench/core/stream_batches.py) and folders that stay under their roots (moebench/core/paths.py)."""

from __future__ import annotations

import gc
import json
import time
import weakref
from dataclasses import replace

import pytest
import torch

from moebench.run import runner as runner_mod
from moebench.core.case import Case, NamedSpec, TimingSpec
from moebench.cli import main
from moebench.core.dispatch import combine, dispatch
from moebench.core.errors import MoebenchError
from moebench.run.memory_estimate import available, estimate, gib, memory_problem
from moebench.core.paths import folder_name_problem, inside, under
from moebench.routers.base import RouteContext
from moebench.routers.registry import ROUTERS
from moebench.run.runner import CaseRunner
from moebench.core.stream_batches import Batches
from moebench.core.workloads import WORKLOADS, BatchShape, generator

NO_TIMING = TimingSpec(enabled=False, isolate=False)


def case(**kw) -> Case:
    base = dict(workload=NamedSpec("uniform"), tokens=1024, experts=8, top_k=2, capacity_factor=1.25, hidden=64)
    return Case(**{**base, **kw})


def test_estimate_of_a_hand_computed_case():
    # T=1024, E=8, d=64, k=2, cf=1.25, float32, one batch, a sparse router:
    # workload  (T*E + T*d)*4 + d*E*4           = 294912 + 2048       = 296960
    # router    4 * T*E*4                                             = 131072
    # routing   A = T*min(E, ceil(k*cf)) = 3072;  A*(3*8 + 4 + 1 + 2*8) = 138240
    # dispatch  2*(A*d*4 + T*d*4 + A*8)          = 2*(786432+262144+24576) = 2146304
    # memcopy   (T*E + T*d)*4                                         = 294912
    # stream    one metric record                                     = 2048
    est = estimate(case(), NamedSpec("topk"))
    assert est.parts == {"workload": 296960, "router": 131072, "routing": 138240, "dispatch": 2146304,
                         "memcopy": 294912, "stream": 2048}
    assert est.total == 2 * 3009536


def test_estimate_grows_with_dense_routers_soft_moe_and_workload_tables():
    c = case()
    sparse = estimate(c, NamedSpec("topk")).total
    assert estimate(c, NamedSpec("softmax_dense")).total > sparse  # A = T*E
    soft = estimate(c, NamedSpec("soft_moe"))
    assert soft.parts["soft_moe slots"] > 0
    big_vocab = replace(c, workload=NamedSpec("tokens", {"vocab": 10**9}))
    assert estimate(big_vocab).parts["workload"] > 10**9 * 64 * 4


@pytest.mark.parametrize("name", ["topk", "switch", "expert_choice", "softmax_dense", "soft_moe", "deepseek"])
def test_estimate_covers_the_tensors_a_route_really_holds(name):
    # the bytes of every tensor one batch of the run loop holds: inputs, the Routing (its soft
    # slot matrices included), the dispatched rows and the combined output
    c = case(tokens=2048, experts=16, hidden=128, top_k=2)
    spec = NamedSpec(name)
    router = ROUTERS.create(name)
    shape = BatchShape(c.tokens, c.experts, c.hidden)
    inputs = WORKLOADS.create("uniform").batch(shape, 0, 0)
    from moebench.core.capacity import expert_capacity

    ctx = RouteContext(c.top_k, expert_capacity(c.capacity, c.tokens, c.experts, c.top_k), "position",
                       generator("cpu", 0, 1), router.init_state(c.experts, torch.device("cpu")))
    routing = router.route(inputs, ctx)
    dispatched = dispatch(routing, inputs.hidden)
    out = combine(routing, dispatched, dispatched.rows)
    held = [inputs.logits, inputs.hidden, routing.token_index, routing.expert_index, routing.choice, routing.weight,
            routing.kept, routing.probs, routing.logits, dispatched.rows, out]
    if routing.soft is not None:
        held += [routing.soft.dispatch, routing.soft.combine]
    real = sum(t.numel() * t.element_size() for t in held)
    est = estimate(c, spec).total
    assert real <= est <= 10 * real, (real, est)  # measured: 4.0x (softmax_dense) to 6.5x (switch)


def test_available_memory_is_read_and_sane():
    free, source = available("cpu")
    assert free is not None and 0 < free and source
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert free <= total


def test_memory_problem_names_the_estimate_and_what_the_machine_has():
    c = case()
    assert memory_problem(c, NamedSpec("topk"), have=(10**12, "test")) is None
    reason = memory_problem(c, NamedSpec("topk"), have=(1 << 20, "test"))
    assert reason.startswith("does not fit in memory: needs ~5.74 MiB (dispatch 2.05 MiB")
    assert "cpu has 1 MiB available (test)" in reason
    assert gib(3 << 30) == "3 GiB" and gib(1536) == "1.5 KiB"


def test_a_case_that_cannot_fit_is_a_skipped_row_without_allocating():
    huge = case(tokens=2**26, experts=4096, hidden=4096, top_k=2)
    start = time.perf_counter()
    rows = list(CaseRunner(huge, NO_TIMING, {}).rows([NamedSpec("topk"), NamedSpec("soft_moe")]))
    assert time.perf_counter() - start < 2.0  # nothing of the ~TiB was attempted
    assert [r.row["status"] for r in rows] == ["skipped", "skipped"]
    assert all("does not fit in memory: needs ~" in r.row["reason"] and "available" in r.row["reason"] for r in rows)


def test_run_skips_what_cannot_fit_and_runs_the_rest(tmp_path, capsys):
    suite = tmp_path / "mem.yaml"
    suite.write_text(
        "name: mem\nversion: 1\n"
        "grid: {workload: uniform, tokens: [64, 67108864], experts: [4, 65536], top_k: 1, hidden: 65536}\n"
        "routers: [topk]\ntiming: {enabled: false, isolate: false}\n")
    assert main(["run", str(suite), "--results", str(tmp_path / "results"), "--no-report"]) == 0
    rows = [json.loads(line) for line in next((tmp_path / "results" / "mem").iterdir()).joinpath("rows.jsonl").open()]
    status = {(r["tokens"], r["experts"]): r["status"] for r in rows}
    assert status[(64, 4)] == "ok"
    assert {s for k, s in status.items() if k != (64, 4)} == {"skipped"}


# --- lazy streams --------------------------------------------------------------------------------


def test_batches_are_made_when_read_and_not_kept_past_the_cache():
    shape = BatchShape(512, 8, 32)
    batches = Batches(WORKLOADS.create("rotating_hotspot"), shape, seed=3, count=20, cache_bytes=0)
    assert batches.made == 0  # nothing up front
    alive = []
    for b, inputs in enumerate(batches):
        alive.append(weakref.ref(inputs.logits))
        assert batches.made == b + 1
    del inputs
    gc.collect()
    assert sum(r() is not None for r in alive) == 1  # only batch 0 (timed, and the memcopy bound) stays
    again = batches[7]  # made again: the same batch
    first = WORKLOADS.create("rotating_hotspot").batch(shape, 3, 7)
    assert torch.equal(again.logits, first.logits) and torch.equal(again.hidden, first.hidden)
    assert len(batches) == 20 and batches[-1] is not None
    with pytest.raises(IndexError):
        batches[20]


def test_streams_give_the_same_rows_with_or_without_the_cache(monkeypatch):
    # a stateful router (DeepSeek's expert bias) on a drifting workload: state is carried by
    # the runner, so regenerated batches must give identical per-batch metrics
    c = case(workload=NamedSpec("rotating_hotspot"), tokens=512, experts=8, top_k=2, batches=6)
    spec = NamedSpec("deepseek")

    def stream(cache):
        monkeypatch.setattr(runner_mod, "STREAM_CACHE_BYTES", cache)
        result = next(iter(CaseRunner(c, NO_TIMING, {}).rows([spec, NamedSpec("topk")])))
        return result.row, result.batches

    row_cached, batches_cached = stream(1 << 30)
    row_lazy, batches_lazy = stream(0)
    assert row_cached["status"] == "ok" and len(batches_lazy) == 6
    assert batches_cached == batches_lazy
    assert {k: v for k, v in row_cached.items()} == {k: v for k, v in row_lazy.items()}


# --- folders under their roots ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", ".hidden", "-rf", "x" * 101, "a\\b", "süite", None, 3])
def test_unsafe_folder_names(name, tmp_path):
    assert folder_name_problem(name)
    with pytest.raises(MoebenchError):
        under(tmp_path, "ok", name)


def test_under_refuses_a_symlink_out_of_the_root(tmp_path):
    root, elsewhere = tmp_path / "results", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "suite").symlink_to(elsewhere)
    assert under(root, "fine", "20260101T000000Z-abcd") == root / "fine" / "20260101T000000Z-abcd"
    with pytest.raises(MoebenchError, match="leads outside"):
        under(root, "suite", "run")
    with pytest.raises(MoebenchError, match="leads outside"):
        inside(root, root)


def test_an_output_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    import moebench.core.paths as paths

    target = tmp_path / "out.json"
    paths.write_output(target, "old\n", "--out")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paths.os, "replace", full)
    with pytest.raises(MoebenchError, match=r"^--out .*out\.json: cannot write: No space left on device$"):
        paths.write_output(target, "new\n" * 1000, "--out")
    assert target.read_text() == "old\n"  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left behind


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_comes_from_the_device():
    free, source = available("cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < free <= total and "mem_get_info" in source
    huge = case(tokens=2**26, experts=4096, hidden=4096, device="cuda")
    (result,) = CaseRunner(huge, NO_TIMING, {}).rows([NamedSpec("topk")])
    assert result.row["status"] == "skipped" and "cuda has" in result.row["reason"]
    small = case(device="cuda")
    (result,) = CaseRunner(small, NO_TIMING, {}).rows([NamedSpec("topk")])
    assert result.row["status"] == "ok"

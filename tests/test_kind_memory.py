"""Memory estimates of the train, parallel and trace kinds (moebench/kinds/*/memory.py): hand-
counted small cases, huge cases that become skipped rows without allocating, and estimates that
are not below what a real small case allocates (a subprocess's peak RSS growth)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import torch

from moebench.cli import main
from moebench.core.case import Case, NamedSpec, TimingSpec
from moebench.kinds.parallel import memory as par_memory
from moebench.kinds.parallel.spec import ParallelSpec
from moebench.kinds.traces import memory as trace_memory
from moebench.kinds.traces.format import LayerTrace, new_header, write_trace
from moebench.kinds.train import memory as train_memory
from moebench.kinds.train.spec import TrainSpec
from moebench.run.memory_estimate import estimate as plain_estimate
from moebench.run.runner import CaseRunner

ROUTING = 3 * 8 + 4 + 1 + 2 * 8  # bytes per assignment: token, expert, choice, weight, kept, 2 sort buffers
MIB = 1 << 20


def case(**kw) -> Case:
    base = dict(workload=NamedSpec("uniform"), tokens=64, experts=4, top_k=2, capacity_factor=1.0, hidden=8)
    return Case(**{**base, **kw})


# --- train -----------------------------------------------------------------------------------------

def train_case(**kw) -> Case:
    return case(**{"workload": NamedSpec("local_experts"), "tokens": 32, "top_k": 1, "capacity_factor": 1.25, **kw})


def test_train_estimate_of_a_hand_counted_case():
    c = train_case()  # T=32, E=4, d=8, k=1, cf=1.25; local_experts: 4 regions, o=4
    spec = TrainSpec(steps=3, tasks=(NamedSpec("local_experts"),), expert_hidden=16, eval_tokens=64)
    est = train_memory.estimate(c, spec, NamedSpec("topk"))
    weights = 8 * 4 + 4 + 4 * (8 * 16 + 16 + 16 * 4 + 4)  # gate W, b; w1, b1, w2, b2 = 884 floats
    assert est.parts["parameters"] == weights * 4 * (1 + 1 + 1 + 4)  # weight, grad, select grad, Adam (2 + 2 temps)
    a = 32 * 2  # ceil(1 * 1.25) = 2 slots per token
    batch = 32 * (8 + 4) * 4 + 32 * 8  # x, y, truth
    step = batch + 8 * 32 * 4 * 4 + a * ROUTING + 2 * 32 * 4 * 4 + 2 * a * (8 + 2 * 16 + 2 * 4) * 4
    assert est.parts["step"] == step == 34368
    assert est.parts["eval set"] == 64 * 12 * 4 + 64 * 8 + 64 * 8  # N = 64 held-out examples + chosen
    assert est.parts["task"] == (4 * 8 + 4 * 8 * 4) * 4 + 64 * 8 * 4 * 4  # centres, maps, maps[region] of N
    assert est.total == 2 * (24752 + 34368 + 4096 + 8832)
    sgd = train_memory.estimate(c, TrainSpec(steps=3, tasks=(), expert_hidden=16, eval_tokens=64, optimizer="sgd"))
    assert sgd.parts["parameters"] == weights * 4 * 3


def test_a_train_case_that_cannot_fit_is_skipped_and_the_run_goes_on(tmp_path):
    from moebench.kinds.train.loop import train_router

    huge = train_case(experts=64, hidden=4096)
    spec = TrainSpec(steps=2, tasks=(NamedSpec("local_experts"),), expert_hidden=1 << 18, eval_tokens=32)
    start = time.perf_counter()
    result = train_router(huge, spec, NamedSpec("topk"), {"case_id": "c", "router": "topk"})
    assert time.perf_counter() - start < 2.0  # ~TiB of experts not attempted
    assert result.row["status"] == "skipped"
    assert result.row["reason"].startswith("does not fit in memory: needs ~") and "parameters" in result.row["reason"]
    assert "cpu has" in result.row["reason"] and "available" in result.row["reason"]
    # a suite: the small case trains, the huge one (hidden 4096 x expert_hidden 2^18) is skipped
    suite = tmp_path / "train_mem.yaml"
    suite.write_text("name: train_mem\nversion: 1\nrouters: [topk, switch]\n"
                     "grid: {experts: [4, 64], top_k: 1, hidden: [8, 4096]}\n"
                     "train: {steps: 2, tokens_per_step: 32, eval_tokens: 32, expert_hidden: 262144,"
                     " task: [local_experts]}\n")
    start = time.perf_counter()
    assert main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-report"]) == 0
    rows = _rows(tmp_path / "r")
    status = {(r["experts"], r["hidden"], r["router"]): r["status"] for r in rows}
    assert status[(4, 8, "topk")] == "ok" and status[(4, 8, "switch")] == "ok", status
    assert all(s == "skipped" for (e, h, _), s in status.items() if h == 4096), status
    assert time.perf_counter() - start < 60


def _rows(results):
    run = next(p for p in results.rglob("rows.jsonl"))
    return [json.loads(line) for line in run.open()]


# --- parallel --------------------------------------------------------------------------------------

def test_parallel_engine_estimate_of_a_hand_counted_case():
    c = case()  # T=64, E=4, k=2, d=8, float32, 1 batch; ep=2: Ts=32, As=64, A=128
    est = par_memory.estimate(c, ParallelSpec(ep=(2,)), NamedSpec("topk"))
    gen = (64 * 4 + 64 * 8) * 4 + 8 * 4 * 4  # float32 draw of logits and hidden, the gate
    assert est.parts["batches"] == 2 * (64 * (4 + 8) * 4 + gen)
    assert est.parts["routing"] == 4 * 64 * 4 * 4 + 128 * ROUTING
    assert est.parts["layer"] == 4 * 128 * 8 * 4 + 2 * (3 * 64 * 8 * 4 + 2 * 32 * 8 * 4) == 32768
    assert est.parts["records"] == 3 * (8 * 64 * 4 + 128 * ROUTING)
    assert est.parts["processes"] == 2 * par_memory.RANK_PROCESS_BYTES
    mlp = par_memory.estimate(c, ParallelSpec(ep=(2,), experts="mlp", ffn_hidden=16), NamedSpec("topk"))
    assert mlp.parts["layer"] == 32768 + 2 * 2 * 64 * 16 * 4  # hidden and SiLU rows of one expert per rank
    assert mlp.parts["experts"] == 4 * 2 * 8 * 16 * 4 + 2 * 2 * 8 * 16 * 4  # W1, W2 per slot + one draw per rank
    share = par_memory.rank_share(mlp, 2)
    assert share.parts["experts"] == mlp.parts["experts"] // 2


def test_parallel_model_estimate_of_a_hand_counted_case():
    est = par_memory.estimate(case(), ParallelSpec(ep=(2, 4), mode="model"), NamedSpec("topk"))
    assert est.parts == {"batches": 64 * 12 * 4 + (64 * 4 + 64 * 8) * 4 + 8 * 4 * 4,
                         "routing": 4 * 64 * 4 * 4 + 128 * ROUTING + 3 * 128 * 8,
                         "matrices": 4 * 4 * 4 * 8 * 2}


def test_a_parallel_case_that_cannot_fit_is_skipped_without_starting_ranks():
    from moebench.kinds.parallel.rows import fitting_engine_rows

    huge = case(tokens=1 << 20, experts=1024, hidden=8192)
    spec = ParallelSpec(ep=(8,), experts="mlp", ffn_hidden=1 << 18)
    start = time.perf_counter()
    rows = list(fitting_engine_rows(huge, spec, [NamedSpec("topk"), NamedSpec("switch")], {"case_id": "c"}))
    assert time.perf_counter() - start < 2.0
    assert [r.row["status"] for r in rows] == ["skipped", "skipped"]
    assert all(r.row["reason"].startswith("does not fit in memory: needs ~") for r in rows)


def test_a_parallel_model_suite_skips_what_cannot_fit_and_runs_the_rest(tmp_path):
    suite = tmp_path / "par_mem.yaml"
    suite.write_text("name: par_mem\nversion: 1\nrouters: [topk]\n"
                     "grid: {workload: uniform, tokens: [64, 67108864], experts: [4, 65536], top_k: 1, hidden: 65536}\n"
                     "parallel: {mode: model, ep: [2, 4]}\ntiming: {enabled: false, isolate: false}\n")
    start = time.perf_counter()
    assert main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-report"]) == 0
    status = {(r["tokens"], r["experts"]): (r["status"], r["reason"]) for r in _rows(tmp_path / "r")}
    assert status[(64, 4)][0] == "ok"
    assert all(s == "skipped" and "does not fit in memory" in why for k, (s, why) in status.items() if k != (64, 4))
    assert time.perf_counter() - start < 60


# --- traces ----------------------------------------------------------------------------------------

def synthetic(tmp_path, n=40, e=6, k=2, layers=2):
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(layers):
        lg = torch.randn(n, e, generator=g)
        data.append(LayerTrace(lg.topk(k, dim=1).indices, lg, torch.rand(n, k, generator=g)))
    header = new_header(model="unit", family="synthetic", source="synthetic", layers=[3, 7][:layers],
                        num_experts=e, score_function="softmax", replay={"name": "topk", "params": {}})
    return write_trace(tmp_path / "t", header, data, torch.arange(n) % 9)


def test_trace_estimate_of_a_hand_counted_case(tmp_path):
    path = synthetic(tmp_path)  # N=40, E=6, k=2, 2 layers, float32 logits, weights, token ids
    header = json.loads((path / "trace.json").read_text() if path.is_dir() else path.read_text())
    v = int(header.get("vocab_size") or 40)
    parts = trace_memory.trace_parts(str(path), tokens=12, experts=6, batches=3)
    per_layer = 40 * 2 * 8 + 40 * 6 * 4 + 40 * 2 * 4 + 6 * 4  # experts, logits, weights, bias
    assert parts["trace layers"] == 2 * per_layer  # min(L=2, batches=3) layers stay loaded
    assert parts["trace load"] == 40 * 2 * 4 + 40 * 6 * (4 + 1) + 2 * 40 * 2 * 8
    assert parts["trace ids"] == 40 * 8 + v * (8 + 4 + 4)
    assert parts["trace batch"] == 12 * 2 * (8 + 4)
    one = trace_memory.trace_parts(str(path), tokens=12, experts=6, batches=3, layer=7, shuffled=True)
    assert one["trace layers"] == per_layer and one["trace ids"] == parts["trace ids"] + 40 * 8
    # the plain estimate adds them through the workload's memory_parts
    c = case(workload=NamedSpec("trace", {"path": str(path)}), tokens=12, experts=6, batches=3)
    assert plain_estimate(c, NamedSpec("topk")).parts["trace layers"] == 2 * per_layer
    assert trace_memory.trace_parts(str(tmp_path / "missing"), 12, 6, 3) == {}


def test_a_trace_case_that_cannot_fit_is_skipped_and_the_small_one_runs(tmp_path):
    path = synthetic(tmp_path)
    big = tmp_path / "big"
    big.mkdir()  # a header that promises 2^36 tokens of 4096 logits: nothing of it is read
    header = json.loads((path / "trace.json").read_text())
    header.update(tokens=1 << 36, num_experts=4096)
    (big / "trace.json").write_text(json.dumps(header))
    timing = TimingSpec(enabled=False, isolate=False)
    start = time.perf_counter()
    huge = case(workload=NamedSpec("trace", {"path": str(big)}), tokens=12, experts=4096)
    rows = list(CaseRunner(huge, timing, {}).rows([NamedSpec("topk"), NamedSpec("recorded")]))
    assert time.perf_counter() - start < 2.0
    assert [r.row["status"] for r in rows] == ["skipped", "skipped"]
    assert "does not fit in memory: needs ~" in rows[0].row["reason"] and "trace layers" in rows[0].row["reason"]
    small = case(workload=NamedSpec("trace", {"path": str(path)}), tokens=12, experts=6, batches=2)
    assert [r.row["status"] for r in CaseRunner(small, timing, {}).rows([NamedSpec("topk")])] == ["ok"]


# --- the estimates are not below what a real case allocates ----------------------------------------

def _peak_growth(body: str) -> tuple[int, int]:
    """(peak RSS over the RSS before running ``body`` in a fresh interpreter, the estimate it prints)."""
    setup, run = body.split("---\n")
    script = "\n".join(["import resource, torch", "from moebench.core.case import Case, NamedSpec",
                         textwrap.dedent(setup), "torch.manual_seed(0)",
                         "import gc; gc.collect()",
                         "before = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()",
                         textwrap.dedent(run),
                         # VmHWM, not ru_maxrss: a child's ru_maxrss keeps the forking parent's peak across exec
                         "after = next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmHWM:'))",
                         "print(after - before, need)"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, need = out.stdout.split()[-2:]
    return int(grown), int(need)


def test_train_estimate_covers_a_real_training_run():
    grown, need = _peak_growth("""
import moebench.kinds.train.loop as loop
from moebench.kinds.train.memory import estimate
from moebench.kinds.train.spec import TrainSpec
from moebench.routers.registry import ROUTERS
c = Case(workload=NamedSpec("local_experts"), tokens=4096, experts=16, top_k=2, capacity_factor=1.25, hidden=256)
spec = TrainSpec(steps=2, tasks=(NamedSpec("local_experts"),), expert_hidden=512, eval_tokens=8192, eval_interval=2)
need = estimate(c, spec, NamedSpec("topk")).total
router = ROUTERS.create("topk")
---
loop.Trainer(c, spec, router, 0).run()
""")
    assert grown > 20 * MIB  # the case allocates something measurable
    assert grown <= need, (grown, need)


def test_parallel_model_estimate_covers_a_real_model_run():
    grown, need = _peak_growth("""
from moebench.kinds.parallel.memory import estimate
from moebench.kinds.parallel.rows import model_rows
from moebench.kinds.parallel.spec import ParallelSpec
c = Case(workload=NamedSpec("uniform"), tokens=65536, experts=64, top_k=2, capacity_factor=1.0, hidden=256, batches=2)
spec = ParallelSpec(ep=(8, 64), mode="model")
need = estimate(c, spec, NamedSpec("topk")).total
---
rows = list(model_rows(c, spec, [NamedSpec("topk")], {"case_id": "c"}))
assert rows[0].row["status"] == "ok", rows[0].row
""")
    assert grown > 20 * MIB
    assert grown <= need, (grown, need)

"""Execution modes: eager, torch.compile and CUDA-graph replay of the timed phases."""

from __future__ import annotations

import pytest
import torch

from moebench.core.errors import SuiteError
from moebench.run.exec_modes import mode_problem, prepare
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite

SUITE = """
name: modes
version: 1
grid: {{workload: zipf, tokens: 64, experts: 4, top_k: 2, capacity_factor: 1.0}}
routers: [{{name: topk, params: {{impl: torch}}}}]
timing: {{warmup_rounds: 1, min_rounds: 2, max_rounds: 3, min_time_s: 0.0, threads: 1, mode: {mode}}}
"""


def _run(tmp_path, mode):
    path = tmp_path / f"{mode}.yaml"
    path.write_text(SUITE.format(mode=mode))
    return execute(load_suite(path), RunOptions(results_root=tmp_path / mode)).rows()


def test_compile_mode_times_the_compiled_phases_and_keeps_the_metrics(tmp_path):
    (eager,), (compiled,) = _run(tmp_path, "eager"), _run(tmp_path, "compile")
    assert compiled["status"] == "ok", compiled["reason"]
    assert (eager["mode"], compiled["mode"]) == ("eager", "compile")
    for metric in ("imbalance", "drop_rate", "aux_loss", "router_confidence"):
        assert compiled[metric] == eager[metric]
    assert compiled["route.rounds"] >= 2 and compiled["route.median_ms"] > 0


def test_compiled_call_returns_what_eager_returns():
    x = torch.randn(32, 8)
    fn = prepare(lambda: torch.topk(torch.softmax(x, -1), 2).indices, "compile", "cpu")
    assert torch.equal(fn(), torch.topk(torch.softmax(x, -1), 2).indices)


def test_cuda_graph_needs_cuda(tmp_path):
    assert mode_problem("cuda_graph", "cpu") and mode_problem("eager", "cpu") is None
    (row,) = _run(tmp_path, "cuda_graph")
    assert row["status"] == "skipped" and "cuda_graph" in row["reason"]


def test_unknown_mode_is_a_suite_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SUITE.format(mode="cuda-graph"))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert err.value.field == "timing.mode" and "did you mean 'cuda_graph'" in str(err.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_recomputes_from_the_same_buffers():
    x = torch.randn(256, 16, device="cuda")
    out = {}

    def phase():
        out["y"] = torch.softmax(x, -1) * 2

    replay = prepare(phase, "cuda_graph", "cuda")
    x.copy_(torch.randn_like(x))
    replay()
    torch.cuda.synchronize()
    assert torch.allclose(out["y"], torch.softmax(x, -1) * 2)

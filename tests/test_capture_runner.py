"""The runner with per-phase preparation: honest per-phase errors and skips, the cuda_graph
wiring of the capturable forms, and the host-sync check naming the moebench line (on CPU)."""

from __future__ import annotations

import pytest
import torch

import moebench.run.runner as runner
from moebench.run import exec_modes as modes
from moebench.run.capture import SlotDispatched
from moebench.run.exec_modes import PhaseSkip, SyncError, check_sync_free, moebench_site, release_after_failure
from moebench.routers.base import RouteContext, RouteInputs, top_k_experts
from moebench.routers.registry import ROUTERS
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite

SUITE = """
name: phases
version: 1
grid: {{workload: zipf, tokens: 96, experts: 8, top_k: 2, capacity_factor: 1.0}}
routers: [{routers}]
timing: {{warmup_rounds: 1, min_rounds: 2, max_rounds: 3, min_time_s: 0.0, threads: 1, mode: {mode}}}
"""
METRICS = ("imbalance", "drop_rate", "aux_loss")


def run_rows(tmp_path, routers="topk", mode="eager"):
    """The rows of the suite's one case, measured in this process (so monkeypatches apply)."""
    path = tmp_path / "phases.yaml"
    path.write_text(SUITE.format(routers=routers, mode=mode))
    suite = load_suite(path)
    (case,) = suite.cases
    return [r.row for r in runner.CaseRunner(case, suite.timing, {"run_id": "test"}).rows(list(suite.routers))]


def test_eager_rows_have_ok_phase_status(tmp_path):
    """Through the session (and its worker process) into rows.jsonl."""
    path = tmp_path / "phases.yaml"
    path.write_text(SUITE.format(routers="topk", mode="eager"))
    (row,) = execute(load_suite(path), RunOptions(results_root=tmp_path / "r")).rows()
    assert row["status"] == "ok"
    for phase in ("route", "dispatch", "combine"):
        assert row[f"{phase}.status"] == "ok" and row[f"{phase}.reason"] is None
        assert row[f"{phase}.median_ms"] > 0


def test_a_phase_failing_in_preparation_leaves_the_others_and_the_metrics(tmp_path, monkeypatch):
    """A simulated capture failure: preparing the 2nd phase (dispatch) raises."""
    real_prepare, calls = runner.prepare, []

    def failing_prepare(fn, mode, device, generators=()):
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("simulated capture failure: operation not permitted when stream is capturing")
        return real_prepare(fn, mode, device, generators)

    monkeypatch.setattr(runner, "prepare", failing_prepare)
    (row,) = run_rows(tmp_path)
    assert row["status"] == "ok"
    assert row["dispatch.status"] == "error"
    assert row["dispatch.reason"] == "RuntimeError: simulated capture failure: operation not permitted when stream is capturing"
    assert row["dispatch.error_at"].startswith("moebench/run/runner.py:")
    assert "dispatch.median_ms" not in row
    for phase in ("route", "combine"):
        assert row[f"{phase}.status"] == "ok" and row[f"{phase}.median_ms"] > 0 and row[f"{phase}.rounds"] >= 2
    for metric in METRICS:
        assert row[metric] is not None and row[metric] == row[metric]  # present, not NaN


def test_a_phase_failing_to_build_leaves_the_others(tmp_path, monkeypatch):
    """Building combine needs the eager dispatch; when that raises only combine is an error."""
    real_builders = runner.phase_builders

    def builders(*args, **kwargs):
        out = real_builders(*args, **kwargs)
        out["combine"] = lambda: (_ for _ in ()).throw(MemoryError("no memory for the dispatched rows"))
        return out

    monkeypatch.setattr(runner, "phase_builders", builders)
    (row,) = run_rows(tmp_path)
    assert row["combine.status"] == "error" and row["combine.reason"] == "MemoryError: no memory for the dispatched rows"
    assert row["route.status"] == row["dispatch.status"] == "ok"


def test_cuda_graph_mode_times_the_capturable_forms_and_skips_the_rest(tmp_path, monkeypatch):
    """cuda_graph on CPU with capture itself stubbed out (it needs CUDA; tests/test_capture_cuda.py
    captures for real): the runner builds moebench.run.capture's forms, times them, and records the
    route of Sinkhorn and BASE as skipped phases with their reasons, not as error rows."""
    seen = []

    def fake_prepare(fn, mode, device, generators=()):
        assert mode == "cuda_graph"
        seen.append(fn())
        return fn

    monkeypatch.setattr(runner, "mode_problem", lambda mode, device: None)
    monkeypatch.setattr(runner, "prepare", fake_prepare)
    rows = {r["router"]: r for r in run_rows(tmp_path, "topk, sinkhorn, expert_choice, random", "cuda_graph")}
    assert all(r["status"] == "ok" and r["mode"] == "cuda_graph" for r in rows.values())
    for name in ("topk", "expert_choice", "random"):
        assert [rows[name][f"{p}.status"] for p in ("route", "dispatch", "combine")] == ["ok"] * 3
    s = rows["sinkhorn"]
    assert s["route.status"] == "skipped" and "tol" in s["route.reason"] and "route.median_ms" not in s
    assert s["dispatch.status"] == s["combine.status"] == "ok" and s["dispatch.median_ms"] > 0
    assert all(r[m] == r[m] for r in rows.values() for m in METRICS)
    assert any(isinstance(x, SlotDispatched) for x in seen)  # the fixed-size dispatch was timed


def test_phase_calls_with_capture_are_the_capturable_forms():
    router = ROUTERS.create("sinkhorn", {})
    logits = torch.randn(32, 4)
    inputs, ctx = RouteInputs(logits, hidden=torch.randn(32, 6)), RouteContext(1, 10, "position")
    routing = router.route(inputs, ctx)
    calls = runner.phase_calls(router, inputs, ctx, routing, capture=True)
    assert isinstance(calls["route"], PhaseSkip) and "host" in calls["route"].reason
    slots = calls["dispatch"]()
    assert isinstance(slots, SlotDispatched) and slots.rows.shape == (32, 6)
    assert torch.equal(calls["combine"](), runner.phase_calls(router, inputs, ctx, routing)["combine"]())


def test_sync_check_names_the_moebench_line(monkeypatch):
    """CUDA's sync debug mode raises from inside the op; the SyncError names the moebench caller.
    (Simulated on CPU: ``nonzero`` raises what CUDA raises in "error" mode.)"""
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def syncing(self, *args, **kwargs):
        raise RuntimeError("called a synchronizing CUDA operation")

    monkeypatch.setattr(torch.Tensor, "nonzero", syncing)
    with pytest.raises(SyncError) as err:
        check_sync_free(lambda: top_k_experts(torch.zeros(4, 4), 2))
    message = str(err.value)
    assert message.startswith("synchronises with the host at moebench/routers/base.py:")
    assert "(top_k_experts)" in message and "\n" not in message
    assert moebench_site(err.value).startswith("moebench/routers/base.py:")
    with pytest.raises(ValueError):  # other errors pass through unchanged
        check_sync_free(lambda: (_ for _ in ()).throw(ValueError("not a sync")))


def test_cleanup_after_a_failure_never_raises(monkeypatch):
    """pytorch/pytorch#180395: after a failed capture empty_cache can raise an internal assert."""
    def boom(*args, **kwargs):
        raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    monkeypatch.setattr(torch.cuda, "empty_cache", boom)
    release_after_failure("cuda:0")
    release_after_failure("cpu")

    class Graph:
        def pool(self):
            raise RuntimeError("no pool")

    modes._end_pool_after_failed_capture(Graph(), torch.device("cuda", 0))


def test_a_failed_capture_reports_the_phase_error_not_cudas_generic_one(monkeypatch):
    """CUDA's stand-ins on CPU: the op raises during capture, then ending the capture raises
    CUDA's generic error. The CaptureError keeps the op's error and the moebench line, and the
    graph pool's allocation routing is ended (the pytorch/pytorch#180395 workaround)."""
    import contextlib

    state = {"capturing": False, "ended": []}

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def pool(self):
            return (0, 1)

    @contextlib.contextmanager
    def graph(g):
        state["capturing"] = True
        try:
            yield
        finally:
            state["capturing"] = False
            raise RuntimeError("operation failed due to a previous error during capture")

    real_nonzero = torch.Tensor.nonzero

    def nonzero(self, *args, **kwargs):
        if state["capturing"]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_nonzero(self, *args, **kwargs)

    monkeypatch.setattr(modes, "check_sync_free", lambda fn: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda dev, pool: state["ended"].append((dev, pool)),
                        raising=False)
    monkeypatch.setattr(torch.Tensor, "nonzero", nonzero)
    with pytest.raises(modes.CaptureError) as err:
        prepare_cuda = modes.prepare(lambda: top_k_experts(torch.zeros(4, 4), 2), "cuda_graph", "cuda:0")
        del prepare_cuda
    message = str(err.value)
    assert message.startswith("capture failed at moebench/routers/base.py:") and "(top_k_experts)" in message
    assert message.endswith("RuntimeError: operation not permitted when stream is capturing")
    assert state["ended"] == [(0, (0, 1))]


def test_the_pytest_fixture_call_synchronises_on_cuda(monkeypatch):
    from moebench.run.pytest_plugin import _synchronised

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    assert _synchronised(lambda: 7, "cuda:0")() == 7 and calls == [torch.device("cuda:0")]
    assert _synchronised(lambda: 8, "cpu")() == 8 and len(calls) == 1

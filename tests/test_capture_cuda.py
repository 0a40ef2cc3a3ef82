"""On a CUDA device: the capturable phases under real CUDA-graph capture and replay, the
host-sync check, recovery after a failed capture, graph-registered random draws, half
precision, and the shipped GPU suites end to end. Skipped without CUDA (scripts/gpu_check.sh
runs them where there is one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _capture_cases import ROUTER_CONFIGS, config_id, make_case
from moebench.run import exec_modes as modes
from moebench.run.capture import capture_route, combine_static, dispatch_static
from moebench.core.dispatch import combine, dispatch
from moebench.run.exec_modes import SyncError, prepare, release_after_failure
from moebench.routers.registry import ROUTERS
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits")
DRAWS = {"random", "noisy_topk"}


def cuda_case(name, params, k=2, capacity=40, policy="position", t=512, e=16, dtype=torch.float32):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    router, inputs, ctx = make_case(name, params, logits, k, capacity, policy)
    inputs = replace(inputs, hidden=inputs.hidden.to("cuda", dtype))
    g = torch.Generator(device="cuda").manual_seed(0)
    return router, inputs, replace(ctx, generator=g)


def captured(fn, generators=()):
    """(replay, out): ``fn`` captured into a CUDA graph; out["v"] is its output buffer."""
    out = {}

    def phase():
        out["v"] = fn()

    return prepare(phase, "cuda_graph", "cuda", generators), out


@pytest.mark.parametrize("config", [c for c in ROUTER_CONFIGS if c[0] not in DRAWS], ids=config_id)
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_captured_route_replays_the_eager_routing(config, policy):
    name, params = config
    router, inputs, ctx = cuda_case(name, params, k=1 if name == "switch" else 2, policy=policy)
    route = capture_route(router)
    router.route(inputs, ctx)  # per-stream caches, as the runner's first batch fills them
    replay, out = captured(lambda: route(inputs, ctx))
    for _ in range(2):  # new logits in the same buffer: the graph recomputes from them
        inputs.logits.copy_(torch.randn_like(inputs.logits) * 3)
        replay()
        torch.cuda.synchronize()
        want = router.route(inputs, ctx)
        for f in FIELDS:
            assert torch.equal(getattr(out["v"], f), getattr(want, f)), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("capacity", [None, 7, 40])
def test_captured_dispatch_and_combine_match_eager(dtype, capacity):
    router, inputs, ctx = cuda_case("topk", {"renormalize": True}, capacity=capacity, dtype=dtype)
    routing = router.route(inputs, ctx)
    replay, out = captured(lambda: dispatch_static(routing, inputs.hidden))
    replay()
    torch.cuda.synchronize()
    eager = dispatch(routing, inputs.hidden)
    n = eager.rows.shape[0]
    slots = out["v"]
    assert int(slots.num_kept) == n and torch.equal(slots.counts, eager.counts)
    assert torch.equal(slots.rows[:n], eager.rows) and torch.equal(slots.token_index[:n], eager.token_index)
    replay_c, out_c = captured(lambda: combine_static(routing, slots, slots.rows))
    replay_c()
    torch.cuda.synchronize()
    # k = 2: at most two rows meet per token, and a + b == b + a, so atomics cannot reorder the sum
    assert torch.equal(out_c["v"], combine(routing, eager, eager.rows))


def test_an_eager_route_that_syncs_names_the_moebench_line_and_capture_goes_on():
    router, inputs, ctx = cuda_case("topk", {"impl": "torch"})
    with pytest.raises(SyncError, match=r"synchronises with the host at moebench/"):
        prepare(lambda: router.route(inputs, ctx), "cuda_graph", "cuda")
    replay, out = captured(lambda: capture_route(router)(inputs, ctx))  # the device is still usable
    replay()
    torch.cuda.synchronize()
    assert out["v"].kept.any()


def test_a_failed_capture_leaves_the_allocator_usable(monkeypatch):
    monkeypatch.setattr(modes, "check_sync_free", lambda fn: None)  # let the sync reach the capture
    x = torch.randn(1024, device="cuda")
    with pytest.raises(Exception):
        prepare(lambda: x[x > 0].sum(), "cuda_graph", "cuda")
    release_after_failure("cuda")
    torch.cuda.empty_cache()
    replay, out = captured(lambda: torch.softmax(x, 0))
    replay()
    torch.cuda.synchronize()
    assert torch.allclose(out["v"], torch.softmax(x, 0))


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_random_draws_are_registered_with_the_graph(name):
    router, inputs, ctx = cuda_case(name, {}, capacity=None)
    route = capture_route(router)
    replay, out = captured(lambda: route(inputs, ctx), generators=(ctx.generator,))
    seen = []
    for _ in range(3):
        replay()
        torch.cuda.synchronize()
        seen.append(out["v"].expert_index.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])  # fresh draws each replay


def _rows(suite_name, tmp_path):
    suite = load_suite(ROOT / "suites" / f"{suite_name}.yaml")
    return execute(suite, RunOptions(results_root=tmp_path / suite_name, quick=True)).rows()


def test_shipped_gpu_suites_quick(tmp_path):
    """suites/gpu.yaml and suites/gpu_cuda_graph.yaml: every row ok, every phase ok, except the
    phases a router cannot capture, which are skipped with their reason."""
    for suite_name in ("gpu", "gpu_cuda_graph"):
        rows = _rows(suite_name, tmp_path)
        errors = [(r["case_id"], r["router"], r["reason"]) for r in rows if r["status"] == "error"]
        assert rows and not errors, (suite_name, errors[:5])
        for r in rows:
            if r["status"] == "skipped":  # only Switch at top_k 2 does not apply
                assert r["router_name"] == "switch" and "top_k=2" in r["reason"], (r["router"], r["reason"])
                continue
            router = ROUTERS.create(r["router_name"], {})
            for phase in ("route", "dispatch", "combine"):
                capturable = suite_name == "gpu" or phase in router.capturable_phases
                want = "ok" if capturable else "skipped"
                assert r[f"{phase}.status"] == want, (suite_name, r["case_id"], r["router"], phase, r[f"{phase}.reason"])
                if want == "ok":
                    assert r[f"{phase}.median_ms"] > 0 and r[f"{phase}.peak_mem_bytes"] is not None


def test_the_pytest_fixture_synchronises(moebench_phase):
    fn = moebench_phase("suites/gpu.yaml", case=0, router="topk", phase="route", quick=True)
    fn()
    assert torch.cuda.current_stream().query()  # nothing left queued when the call returns

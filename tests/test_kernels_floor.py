"""The decode-size fast path and the kernels' bound checks (#22, #23).

- `TokenChoiceRouter.finish`'s one-kernel path (`kernels.assignments`) builds exactly the
  Routing of the general path, for every policy with a fast form, dropless or not.
- A plugin router's out-of-range expert ids never reach a kernel's write: `finish` raises
  `InvalidRouting` (an error row), in process and isolated, and no signal ends the process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fault_routers
from moebench.core import kernels
from moebench.core.routing_check import InvalidRouting
from moebench.routers import RouteContext, RouteInputs, create_router
from moebench.routers.registry import ROUTERS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIELDS = ("token_index", "expert_index", "choice", "weight", "kept", "probs", "logits")


def _same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert (a.top_k, a.capacity) == (b.top_k, b.capacity)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 300), e=st.integers(1, 40), k=st.integers(1, 4), seed=st.integers(0, 10**6),
       policy=st.sampled_from(["position", "probs"]), cap=st.sampled_from([None, 0, 1, 3, 50]),
       ties=st.booleans())
def test_fast_finish_equals_the_general_path(t, e, k, seed, policy, cap, ties):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (t, e), generator=g).float() if ties else torch.randn(t, e, generator=g)
    fast = create_router("topk", {"impl": "numba"})
    ctx = RouteContext(top_k=k, capacity=cap, drop_policy=policy)
    got = fast.route(RouteInputs(logits), ctx)
    # the general path of the same router on the same choices
    probs = torch.softmax(logits, -1)
    expert, weight = fast.choose(probs, k, ctx)
    want = fast._finish_general(expert.t(), weight.t(), probs, logits, ctx, None, None, probs)
    _same(got, want)
    # and the torch router end to end
    _same(got, create_router("topk", {"impl": "torch"}).route(RouteInputs(logits), ctx))


@pytest.mark.parametrize("offset", [10, 10**6, -1])
@pytest.mark.parametrize("cap", [None, 2, 5])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_out_of_range_ids_raise_invalid_routing_in_finish(offset, cap, policy):
    router = fault_routers.OffsetIds(offset=offset)
    ctx = RouteContext(top_k=2, capacity=cap, drop_policy=policy)
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    logits[0] = torch.tensor([9.0, 8.0, 0.0, 0.0])  # experts 0 and 3 chosen somewhere: offsets -1 and 10 leave [0, 4)
    logits[1] = torch.tensor([0.0, 0.0, 8.0, 9.0])
    with pytest.raises(InvalidRouting, match=r"expert_index out of range \[0, 4\)"):
        router.route(RouteInputs(logits), ctx)


def test_capacity_kernels_bound_check_and_write_nothing_out_of_bounds():
    mod = kernels._load()
    expert = np.array([0, 3, 1 << 40, 2, -5], np.int64)
    kept = np.zeros(5, np.bool_)
    assert mod.keep_position_serial(expert, 1, 4, kept) == 2
    assert mod.keep_position(expert, 1, 4, kept) == 2
    assert mod.keep_by_score_serial(expert, np.ones(5, np.float32), 1, 4, kept) == 2
    assert mod.keep_by_score(expert, np.ones(5, np.float32), 1, 4, kept) == 2
    with pytest.raises(kernels.ExpertOutOfRange, match=r"min -5, max 1099511627776"):
        kernels.keep_position(torch.from_numpy(expert), 1, 4)
    with pytest.raises(kernels.ExpertOutOfRange):
        kernels.keep_by_score(torch.from_numpy(expert), torch.ones(5), 1, 4)


SUITE = """
name: offsets
version: 1
grid: {{workload: uniform, tokens: 64, experts: 4, top_k: 2, capacity_factor: [1.0, null]}}
routers:
  - {{name: fault_offset, params: {{offset: 10}}, label: off10}}
  - {{name: fault_offset, params: {{offset: 1000000}}, label: off1e6}}
  - topk
timing: {{warmup_rounds: 0, min_rounds: 1, max_rounds: 1, min_time_s: 0.0, threads: 1, isolate: {isolate}}}
"""

CHILD = """
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import fault_routers
from moebench.routers.registry import ROUTERS
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite
ROUTERS.classes()
ROUTERS.register("fault_offset")(fault_routers.OffsetIds)
run = execute(load_suite({suite!r}), RunOptions(results_root={results!r}))
print(json.dumps([[r["router"], r["capacity_factor"], r["status"], r.get("reason")] for r in run.rows()]))
"""


@pytest.mark.parametrize("isolate", ["false", "true"])
def test_plugin_out_of_range_ids_give_error_rows_and_no_signal(isolate, tmp_path):
    suite = tmp_path / "offsets.yaml"
    suite.write_text(SUITE.format(isolate=isolate))
    code = CHILD.format(tests=str(TESTS), root=str(ROOT), suite=str(suite), results=str(tmp_path / "r"))
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -11 was SIGSEGV
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 6
    for router, _, status, reason in rows:
        if router == "topk":
            assert status == "ok", reason
        else:
            assert status == "error"
            assert reason.startswith(f"InvalidRouting: router 'fault_offset': expert_index out of range [0, 4)"), reason


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 2500), e=st.integers(1, 70), scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
       seed=st.integers(0, 10**6), f64=st.booleans(), tol=st.sampled_from([1e-2, 1e-4, 1e-6]))
def test_sinkhorn_numba_matches_the_torch_iteration(t, e, scale, seed, f64, tol):
    from moebench.routers.sinkhorn import sinkhorn_scaling

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g, dtype=torch.float64 if f64 else torch.float32) * scale
    k0, a0, a1, n_a = sinkhorn_scaling(x, tol, 200, impl="torch")
    k1, b0, b1, n_b = sinkhorn_scaling(x, tol, 200, impl="numba")
    assert torch.equal(k0, k1)
    assert torch.allclose(b0, a0, rtol=1e-6, atol=0) and torch.allclose(b1, a1, rtol=1e-6, atol=0)
    # The stop compares an absolute error mean|d1_old - d1| with tol. Where d1 is so large that
    # one float64 rounding step of it exceeds tol (wide logits), the error after convergence is
    # rounding noise whose size depends on the summation order, so the two may stop at
    # different iterations; the scalings still agree to 1e-6 (above). Elsewhere the counts match.
    if float(a1.abs().max()) * torch.finfo(torch.float64).eps <= tol:
        assert n_a == n_b


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("t", [1, 16, 300, 4096])
def test_sinkhorn_router_numba_routes_as_torch(k, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, 64, generator=g)
    for cap, policy in ((None, "position"), (math.ceil(1.25 * k * t / 64), "probs")):
        ctx = RouteContext(top_k=k, capacity=cap, drop_policy=policy)
        _same(create_router("sinkhorn", {"impl": "numba"}).route(RouteInputs(x), ctx),
              create_router("sinkhorn", {"impl": "torch"}).route(RouteInputs(x), ctx))

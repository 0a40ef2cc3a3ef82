"""The trace and trace_fit workloads, the recorded router, trace statistics and the replay suite."""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("safetensors")

from moebench.core.errors import MoebenchError, WorkloadMismatchError  # noqa: E402
from moebench.routers.base import RouteContext, RouteInputs  # noqa: E402
from moebench.routers.hashing import hash_experts  # noqa: E402
from moebench.routers.registry import ROUTERS  # noqa: E402
from moebench.kinds.traces.families import equivalent_choices, selection_scores  # noqa: E402
from moebench.kinds.traces.format import LayerTrace, new_header, read_trace, write_trace  # noqa: E402
from moebench.kinds.traces.stats import (  # noqa: E402
    cross_layer, fit_shape, id_consistency, layer_stats, shares_overlap, zipf_exponent,
)
from moebench.kinds.traces.workload import TraceInputs, chain_logits  # noqa: E402
from moebench.core.workloads import WORKLOADS, BatchShape  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "tests" / "data" / "traces" / "tiny_qwen3_moe"


def synthetic(tmp_path, n=40, e=6, k=2, layers=2, logits=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(layers):
        lg = torch.randn(n, e, generator=g)
        data.append(LayerTrace(lg.topk(k, dim=1).indices, lg if logits else None,
                               torch.rand(n, k, generator=g) if logits else None))
    header = new_header(model="unit", family="synthetic", source="synthetic", layers=[3, 7][:layers],
                        num_experts=e, score_function="softmax", replay={"name": "topk", "params": {}})
    return write_trace(tmp_path / "t", header, data, torch.arange(n) % 9)


def batches(path, t, b, **params):
    w = WORKLOADS.create("trace", {"path": str(path), **params})
    return [w.batch(BatchShape(t, 6, 4), seed=5, batch_index=i) for i in range(b)]


def test_stream_of_all_layers_in_model_order(tmp_path):
    trace = read_trace(synthetic(tmp_path))
    got = batches(trace.path, 8, 6)
    for b, inputs in enumerate(got):
        j, w = b % 2, b // 2  # layer b mod L, window b div L
        rows = slice(8 * w, 8 * (w + 1))
        assert isinstance(inputs, TraceInputs) and inputs.layer == [3, 7][j]
        assert torch.equal(inputs.logits, trace.layer(j).logits[rows])
        assert torch.equal(inputs.experts, trace.layer(j).experts[rows])
        assert torch.equal(inputs.weights, trace.layer(j).weights[rows])
        assert torch.equal(inputs.token_ids, (torch.arange(40) % 9)[rows])
        assert inputs.hidden.shape == (8, 4)
    assert torch.equal(got[0].vocab_freq, torch.bincount(torch.arange(40) % 9).float() / 40)
    one = batches(trace.path, 8, 5, layer=7)  # one layer: window = batch
    assert all(x.layer == 7 and torch.equal(x.logits, trace.layer(1).logits[8 * i:8 * i + 8]) for i, x in enumerate(one))


def test_shuffled_batches_keep_tokens_aligned_across_layers(tmp_path):
    trace = read_trace(synthetic(tmp_path))
    got = batches(trace.path, 8, 10, order="shuffled")
    rows = {}
    for b, inputs in enumerate(got):
        # recover each row's token position from its logits
        full = trace.layer(b % 2).logits
        pos = [int((full == r).all(dim=1).nonzero()[0, 0]) for r in inputs.logits]
        rows.setdefault(b // 2, []).append(pos)
    for w, (a, b) in rows.items():
        assert a == b  # same tokens in layer 0 and layer 1
    every = [p for a, _ in rows.values() for p in a]
    assert sorted(every) == list(range(40)) and every != list(range(40))  # a permutation, not the stream


def test_trace_workload_mismatches_are_reasons(tmp_path):
    path = synthetic(tmp_path)
    w = WORKLOADS.create("trace", {"path": str(path)})
    with pytest.raises(WorkloadMismatchError, match="has 6 experts; the case has 8"):
        w.batch(BatchShape(8, 8, 4), 0, 0)
    with pytest.raises(WorkloadMismatchError, match=r"batch 10 needs tokens 40..48 of a layer; the trace has 40"):
        w.batch(BatchShape(8, 6, 4), 0, 10)
    with pytest.raises(MoebenchError, match=r"no MoE layer 4; recorded layers are \[3, 7\]"):
        WORKLOADS.create("trace", {"path": str(path), "layer": 4}).batch(BatchShape(8, 6, 4), 0, 0)
    assert "path (a trace folder) is required" in WORKLOADS.problem("trace", {})
    assert "expected one of 'stream', 'shuffled'" in WORKLOADS.problem("trace", {"path": "x", "order": "random"})


def test_index_only_trace_feeds_fixed_routing(tmp_path):
    path = synthetic(tmp_path, logits=False)
    (inputs,) = batches(path, 10, 1)
    routing = ROUTERS.create("topk").route(inputs, RouteContext(2, None))
    chosen = torch.empty(10, 2, dtype=torch.int64)
    chosen[routing.token_index, routing.choice] = routing.expert_index
    assert torch.equal(chosen, inputs.experts) and inputs.weights is None


def test_recorded_router_is_the_models_routing_with_capacity_applied():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    inputs = TraceInputs(logits=torch.zeros(3, 4), experts=experts, weights=weights)
    router = ROUTERS.create("recorded")
    r = router.route(inputs, RouteContext(2, None))
    assert r.expert_index.tolist() == [0, 0, 0, 1, 2, 1] and r.kept.all()  # rank-major order
    assert torch.equal(r.weight, weights.t().reshape(-1))
    # capacity 2, position policy: 1st choices first, token order -> token 2's expert 0 is dropped
    r = router.route(inputs, RouteContext(2, 2, "position"))
    assert r.kept.tolist() == [True, True, False, True, True, True]
    assert ROUTERS.create("recorded", {"uniform_weights": True}).route(inputs, RouteContext(2, None)).weight.eq(0.5).all()
    with pytest.raises(WorkloadMismatchError, match="records top_k=2; this case has top_k=1"):
        router.route(inputs, RouteContext(1, None))
    with pytest.raises(WorkloadMismatchError, match="needs the `trace` workload"):
        router.route(RouteInputs(logits=torch.zeros(3, 4)), RouteContext(2, None))


def test_hash_routers_get_the_real_token_ids(tmp_path):
    (inputs,) = batches(synthetic(tmp_path), 12, 1)
    r = ROUTERS.create("hash").route(inputs, RouteContext(2, None))
    chosen = torch.empty(12, 2, dtype=torch.int64)
    chosen[r.token_index, r.choice] = r.expert_index
    assert torch.equal(chosen, hash_experts(inputs.token_ids, 6, 2, 0))


def test_committed_trace_replays_through_its_router_and_recorded():
    inputs = WORKLOADS.create("trace", {"path": str(COMMITTED), "layer": 1}).batch(BatchShape(512, 16, 8), 0, 3)
    chosen = {}
    for name, params in (("recorded", {}), ("topk", {"renormalize": True})):
        r = ROUTERS.create(name, params).route(inputs, RouteContext(2, None))
        chosen[name] = torch.empty(512, 2, dtype=torch.int64)
        chosen[name][r.token_index, r.choice] = r.expert_index
    h = read_trace(COMMITTED).header
    assert torch.equal(chosen["recorded"], inputs.experts)
    assert bool(equivalent_choices(selection_scores(h, inputs.logits), chosen["topk"], chosen["recorded"]).all())


# ----------------------------------------------------------------------------- statistics

def test_statistics_on_hand_computed_cases():
    ranks = torch.arange(1, 9, dtype=torch.float64)
    assert zipf_exponent(1000 * ranks ** -1.5) == pytest.approx(1.5, abs=1e-12)
    assert zipf_exponent(torch.tensor([5.0, 5, 5, 0])) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(zipf_exponent(torch.tensor([3.0, 0, 0])))
    # (0,1)-(1,2) share 1; (1,2)-(3,4) share none; (3,4)-(4,0) share 4
    assert shares_overlap(torch.tensor([[0, 1], [1, 2], [3, 4], [4, 0]])) == pytest.approx(2 / 3)
    # id 5: top-1 [1, 1, 2] -> 2 of 3 on its usual expert; id 7: [0, 3] -> 1 of 2; id 9 once: left out
    ids, top1 = torch.tensor([5, 5, 5, 7, 7, 9]), torch.tensor([1, 1, 2, 0, 3, 4])
    assert id_consistency(ids, top1, 5) == pytest.approx(3 / 5)


def test_layer_and_cross_layer_statistics(tmp_path):
    e0 = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    e1 = torch.tensor([[2, 0], [2, 1], [2, 3], [1, 0]])
    header = new_header(model="u", family="synthetic", source="synthetic", layers=[0, 1], num_experts=4,
                        score_function="softmax", replay=None)
    t = read_trace(write_trace(tmp_path / "t", header, [LayerTrace(e0), LayerTrace(e1)], torch.tensor([1, 1, 2, 1])))
    s = layer_stats(t, 0)
    # loads: e0 3, e1 3, e2 1, e3 1 of 8; uniform 2
    assert s["popularity"] == [0.375, 0.375, 0.125, 0.125] and s["active"] == 1.0 and s["hot_x_uniform"] == 1.5
    assert s["top1_repeat"] == pytest.approx(2 / 3) and s["locality"] == pytest.approx(1.0)
    assert s["id_consistency"] == pytest.approx(2 / 3)  # id 1: top-1 [0, 0, 3]
    (c,) = cross_layer(t)
    # layer-0 top-1 0 -> layer-1 top-1 {2, 2, 2}; 3 -> {1}: all predicted; always guessing 2 gets 3/4
    assert (c["partner_share"], c["popular_share"]) == (1.0, 0.75)
    shape = fit_shape(t)["layers"][0]
    q = 0.75 ** 2 + 0.25 ** 2
    assert shape["top1_share"] == [0.75, 0.0, 0.0, 0.25]
    assert shape["copy"] == pytest.approx((2 / 3 - q) / (1 - q))


def test_trace_fit_reproduces_popularity_and_locality(tmp_path):
    pop = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.05])
    g = torch.Generator().manual_seed(0)
    logits = chain_logits(pop, 0.6, 20000, g)
    top1 = logits.argmax(dim=1)
    share = torch.bincount(top1, minlength=6).float() / 20000
    assert torch.allclose(share, pop, atol=0.02)
    q = float((pop * pop).sum())
    assert float((top1[1:] == top1[:-1]).float().mean()) == pytest.approx(0.6 + 0.4 * q, abs=0.015)
    # the workload from a trace and from its shape file give the same batches
    path = synthetic(tmp_path, n=400, e=6)
    shape_file = tmp_path / "shape.json"
    shape_file.write_text(json.dumps(fit_shape(read_trace(path))))
    a = WORKLOADS.create("trace_fit", {"path": str(path)}).batch(BatchShape(64, 6, 4), 1, 1)
    b = WORKLOADS.create("trace_fit", {"path": str(shape_file)}).batch(BatchShape(64, 6, 4), 1, 1)
    assert torch.equal(a.logits, b.logits) and a.token_ids is None
    shape_file.write_text(json.dumps({"format": "moebench-trace-shape", "num_experts": 6,
                                      "layers": [{"layer": 0, "top1_share": [1, 2], "copy": 0.5}]}))
    with pytest.raises(MoebenchError, match=r"shape.json: layers\[0\]: expected top1_share \(E=6"):
        WORKLOADS.create("trace_fit", {"path": str(shape_file)}).batch(BatchShape(64, 6, 4), 1, 0)


def test_replay_suite_runs_and_its_report_shows_the_trace(tmp_path, monkeypatch):
    from moebench.report.build import write_report
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    monkeypatch.chdir(ROOT)  # the suite names the trace relative to the repository root
    suite_file = tmp_path / "mini.yaml"
    suite_file.write_text(
        "name: mini\nversion: 1\n"
        "grid:\n  workload: [{name: trace, params: {path: tests/data/traces/tiny_qwen3_moe}}, "
        "{name: trace_fit, params: {path: tests/data/traces/tiny_qwen3_moe}}]\n"
        "  tokens: 256\n  experts: 16\n  top_k: 2\n  capacity_factor: null\n  batches: 3\n"
        "routers: [recorded, {name: topk, params: {renormalize: true}, label: topk_qwen}, hash, expert_choice]\n"
        "timing: {enabled: false}\n")
    run = execute(load_suite(suite_file), RunOptions(results_root=tmp_path / "r"))
    rows = {(r["workload"], r["router"]): r for r in run.rows()}
    assert all(r["status"] == "ok" for (w, name), r in rows.items() if w == "trace")
    assert rows[("trace_fit", "recorded")]["status"] == "skipped"
    assert rows[("trace", "recorded")]["imbalance"] == pytest.approx(rows[("trace", "topk_qwen")]["imbalance"], rel=0.05)
    text = write_report([run.path], tmp_path / "rep").read_text()
    assert "## Trace statistics" in text and "| 2 | 4096 |" in text and "partner_share" in text


def test_stats_command_writes_json_and_shape(tmp_path, capsys):
    from moebench.cli import main

    assert main(["trace", "stats", str(COMMITTED), "--json", str(tmp_path / "s.json"),
                 "--shape", str(tmp_path / "shape.json")]) == 0
    out = capsys.readouterr().out
    assert "| from_layer | to_layer | partner_share | popular_share |" in out
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [r["layer"] for r in stats["layers"]] == [0, 1, 2]
    assert all(r["replay_match"] == 1.0 and len(r["popularity"]) == 16 for r in stats["layers"])
    shape = json.loads((tmp_path / "shape.json").read_text())
    assert shape["num_experts"] == 16 and "token_ids" not in json.dumps(shape)
    batch = WORKLOADS.create("trace_fit", {"path": str(tmp_path / "shape.json"), "layer": 2}).batch(
        BatchShape(256, 16, 8), 0, 0)
    assert batch.logits.shape == (256, 16)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_vectorised_statistics_equal_plain_loops(data):
    e = data.draw(st.integers(2, 6))
    k = data.draw(st.integers(1, e))
    n = data.draw(st.integers(2, 30))
    rows = [data.draw(st.permutations(range(e)))[:k] for _ in range(n)]
    ids = data.draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
    x = torch.tensor(rows)
    overlap = sum(bool(set(rows[t]) & set(rows[t - 1])) for t in range(1, n)) / (n - 1)
    assert shares_overlap(x) == pytest.approx(overlap)
    by_id = {}
    for i, row in zip(ids, rows):
        by_id.setdefault(i, []).append(row[0])
    repeated = [v for v in by_id.values() if len(v) >= 2]
    if repeated:
        expect = sum(max(v.count(c) for c in set(v)) for v in repeated) / sum(len(v) for v in repeated)
        assert id_consistency(torch.tensor(ids), x[:, 0], e) == pytest.approx(expect)
    else:
        assert math.isnan(id_consistency(torch.tensor(ids), x[:, 0], e))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), tokens=st.integers(1, 50))
def test_chain_logits_limits(seed, tokens):
    pop = torch.tensor([0.5, 0.3, 0.2])
    never = chain_logits(pop, 0.0, tokens, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    from moebench.core.workloads import gumbel

    assert torch.equal(never, torch.log(pop)[None, :] + gumbel((tokens, 3), g, "cpu"))  # copy 0: untouched
    always = chain_logits(pop, 1.0, tokens, torch.Generator().manual_seed(seed))
    assert bool((always.argmax(dim=1) == always[0].argmax()).all())  # copy 1: one expert throughout

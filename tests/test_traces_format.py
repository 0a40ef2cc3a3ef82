"""The moebench trace format: round trips, index-only traces, and one-line errors for bad files."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("safetensors")

from moebench.cli import main  # noqa: E402
from moebench.kinds.traces.readers import open_trace  # noqa: E402
from moebench.kinds.traces.format import (  # noqa: E402
    HEADER, TENSORS, LayerTrace, TraceError, index_only_logits, new_header, read_trace, write_trace,
)


def make_layers(n, e, k, layers, seed=0, dtype=torch.float32, bias=False, logits=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        lg = torch.randn(n, e, generator=g).to(dtype)
        experts = torch.rand(n, e, generator=g).argsort(dim=1)[:, :k]
        out.append(LayerTrace(experts, lg if logits else None, torch.rand(n, k, generator=g) if logits else None,
                              torch.randn(e, generator=g) if bias else None))
    return out


def header(e, layers=2, **kw):
    return new_header(model="unit", family="synthetic", source="synthetic", layers=list(range(layers)),
                      num_experts=e, score_function="softmax", replay=None, **kw)


def write(tmp_path, n=12, e=6, k=2, layers=2, **kw):
    ids = torch.arange(n) % 5
    return write_trace(tmp_path / "t", header(e, layers), make_layers(n, e, k, layers, **kw), ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_keeps_every_tensor(tmp_path, dtype):
    layers = make_layers(10, 5, 2, 3, dtype=dtype, bias=True)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    out = write_trace(tmp_path / "t", header(5, 3, tokenizer="bytes"), layers, ids)
    t = read_trace(out)
    assert (t.tokens, t.num_experts, t.top_k, t.num_layers) == (10, 5, 2, 3)
    assert t.header["dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert torch.equal(t.token_ids, ids)
    for j, ref in enumerate(layers):
        got = t.layer(j)
        assert torch.equal(got.experts, ref.experts)
        assert torch.equal(got.logits, ref.logits.float())  # bf16 -> fp32 is exact
        assert torch.equal(got.weights, ref.weights) and torch.equal(got.bias, ref.bias)
    assert open_trace(out / HEADER).header == t.header  # the header file names the trace too


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20), e=st.integers(2, 9), layers=st.integers(1, 3), seed=st.integers(0, 10**6),
       data=st.data())
def test_round_trip_property(tmp_path_factory, n, e, layers, seed, data):
    k = data.draw(st.integers(1, e))
    ref = make_layers(n, e, k, layers, seed=seed)
    out = write_trace(tmp_path_factory.mktemp("t"), header(e, layers), ref)
    t = read_trace(out)
    assert t.token_ids is None and t.vocab_freq() is None
    for j in range(layers):
        assert torch.equal(t.layer(j).experts, ref[j].experts) and torch.equal(t.layer(j).logits, ref[j].logits)


def test_index_only_trace_replays_as_fixed_routing(tmp_path):
    from moebench.routers.base import RouteContext, RouteInputs
    from moebench.routers.registry import ROUTERS

    layers = make_layers(30, 8, 3, 1, logits=False)
    out = write_trace(tmp_path / "t", header(8, 1), layers)
    t = read_trace(out)
    assert not t.has_logits and t.layer(0).logits is None and t.header["num_experts"] == 8
    # hand-computed: a token choosing (2, 0) over 3 experts gets logits 0 / 10 / 9 ranks
    assert index_only_logits(torch.tensor([[2, 0]]), 3).tolist() == [[9.0, 0.0, 10.0]]
    logits = index_only_logits(t.layer(0).experts, 8)
    routing = ROUTERS.create("topk").route(RouteInputs(logits=logits), RouteContext(3, None))
    chosen = torch.empty(30, 3, dtype=torch.int64)
    chosen[routing.token_index, routing.choice] = routing.expert_index
    assert torch.equal(chosen, t.layer(0).experts)  # same experts, same order


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_and_malformed_headers(tmp_path):
    with pytest.raises(TraceError) as exc:
        read_trace(tmp_path / "nowhere")
    assert "no such trace folder" in one_line(exc)
    (tmp_path / "d").mkdir()
    with pytest.raises(TraceError) as exc:
        read_trace(tmp_path / "d")
    assert f"{tmp_path / 'd' / HEADER}: missing" in one_line(exc)
    out = write(tmp_path)
    (out / HEADER).write_text("{not json")
    with pytest.raises(TraceError) as exc:
        read_trace(out)
    assert str(out / HEADER) in one_line(exc) and "not valid JSON" in str(exc.value)
    for field, value, expect in [("num_experts", None, "'num_experts' is missing"),
                                 ("top_k", "2", "'top_k': expected a positive integer"),
                                 ("layers", [], "'layers': expected a non-empty list"),
                                 ("format", "other", "'format': expected 'moebench-trace'"),
                                 ("score_function", "relu", "'score_function'"),
                                 ("dtype", "int8", "'dtype'")]:
        h = header(6)
        h.update(tokens=12, top_k=2, logits=True, weights=True, token_ids=True, bias=False, dtype="float32")
        if value is None:
            del h[field]
        else:
            h[field] = value
        (out / HEADER).write_text(json.dumps(h))
        with pytest.raises(TraceError) as exc:
            read_trace(out)
        assert expect in one_line(exc) and str(out / HEADER) in str(exc.value)


def test_truncated_and_inconsistent_tensor_files(tmp_path):
    out = write(tmp_path)
    data = (out / TENSORS).read_bytes()
    for cut in (len(data) - 7, 40, 3):
        (out / TENSORS).write_bytes(data[:cut])
        with pytest.raises(TraceError) as exc:
            read_trace(out)
        assert f"{out / TENSORS}: unreadable safetensors file" in one_line(exc)
    (out / TENSORS).unlink()
    with pytest.raises(TraceError) as exc:
        read_trace(out)
    assert f"{out / TENSORS}: missing" in one_line(exc)
    # the header promises 7 experts but the logits have 6 columns
    out = write(tmp_path / "b")
    h = json.loads((out / HEADER).read_text())
    h["num_experts"] = 7
    (out / HEADER).write_text(json.dumps(h))
    with pytest.raises(TraceError) as exc:
        read_trace(out)
    assert "tensor 'layers.0.logits': expected F32[12, 7], got F32[12, 6]" in one_line(exc)


def test_bad_values_are_caught_when_a_layer_is_read(tmp_path):
    from moebench.kinds.traces.format import _safetensors

    out = write(tmp_path)
    _, st_ = _safetensors()
    tensors = st_.load_file(str(out / TENSORS))
    tensors["layers.1.experts"][3, 0] = 6  # E = 6: out of range
    tensors["layers.0.logits"][2, 2] = float("nan")
    st_.save_file(tensors, str(out / TENSORS))
    t = read_trace(out)
    with pytest.raises(TraceError) as exc:
        t.layer(1)
    assert "layers.1: expert index 6 outside [0, 6)" in one_line(exc)
    with pytest.raises(TraceError) as exc:
        t.layer(0)
    assert "layers.0: logits contain NaN" in one_line(exc)
    with pytest.raises(TraceError) as exc:
        t.layer(5)
    assert "out of range" in one_line(exc)


def test_cli_reports_a_bad_trace_in_one_line(tmp_path, capsys):
    out = write(tmp_path)
    (out / TENSORS).write_bytes((out / TENSORS).read_bytes()[:100])
    assert main(["trace", "stats", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"moebench: error: {out / TENSORS}: unreadable")


def test_write_refuses_inconsistent_layers(tmp_path):
    from moebench.core.errors import MoebenchError

    a, b = make_layers(5, 4, 2, 2)
    with pytest.raises(MoebenchError, match="layer 1 lacks logits"):
        write_trace(tmp_path / "t", header(4), [a, LayerTrace(b.experts, None, b.weights)])
    assert not (tmp_path / "t" / HEADER).exists()  # nothing half written

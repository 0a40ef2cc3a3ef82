"""Megatron-LM router traces (router_trace_rank*.jsonl + logits_rank*.bin), written here in that
format, read back unchanged; bad files give one-line errors naming the file."""

import json

import pytest
import torch

pytest.importorskip("safetensors")

from moebench.kinds.traces.format import TraceError, read_trace, write_trace  # noqa: E402
from moebench.kinds.traces.readers import open_trace  # noqa: E402
from moebench.kinds.traces.megatron import read_megatron  # noqa: E402

E, K, LAYERS, STEPS, RANKS, TOKENS = 12, 3, (1, 3), 3, 2, 5


def write_megatron(folder, logits=True, seed=0):
    """Write traces as Megatron-Core's RouterTracer does: per rank one JSONL record per
    (step, layer), bf16 logits appended to logits_rank{R}.bin, plus an MTP record to ignore.
    Returns {layer: (experts [N, k], logits [N, E])} in (step, rank) order."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {layer: ([], []) for layer in LAYERS}
    files = {r: (open(folder / f"router_trace_rank{r}.jsonl", "w"), open(folder / f"logits_rank{r}.bin", "wb"))
             for r in range(RANKS)}
    offsets = dict.fromkeys(range(RANKS), 0)
    chunks = {}
    for step in range(STEPS):
        for rank in range(RANKS):
            for layer in LAYERS:
                lg = torch.randn(TOKENS, E, generator=g).to(torch.bfloat16)
                idx = lg.float().topk(K, dim=1).indices
                rec = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": rank,
                       "num_tokens": TOKENS, "topk": K, "top_indices": idx.tolist()}
                if logits:
                    raw = lg.view(torch.int16).numpy().tobytes()
                    files[rank][1].write(raw)
                    rec.update(logit_offset=offsets[rank], logit_bytes=len(raw), logit_shape=[TOKENS, E])
                    offsets[rank] += len(raw)
                files[rank][0].write(json.dumps(rec) + "\n")
                chunks[(step, rank, layer)] = (idx, lg.float())
            mtp = {"step": step, "block": "mtp", "mtp_idx": 0, "layer": 0, "rank": rank, "num_tokens": 1,
                   "topk": K, "top_indices": [[0, 1, 2]]}
            files[rank][0].write(json.dumps(mtp) + "\n")
    for f, b in files.values():
        f.close()
        b.close()
    for step in range(STEPS):
        for rank in range(RANKS):
            for layer in LAYERS:
                idx, lg = chunks[(step, rank, layer)]
                expected[layer][0].append(idx)
                expected[layer][1].append(lg)
    return {layer: (torch.cat(a), torch.cat(b)) for layer, (a, b) in expected.items()}


def test_megatron_trace_round_trips(tmp_path):
    expected = write_megatron(tmp_path / "mt")
    t = open_trace(tmp_path / "mt")  # told apart from a moebench trace by its files
    assert t.header["source"] == "megatron" and t.header["layers"] == list(LAYERS)
    assert (t.tokens, t.num_experts, t.top_k) == (STEPS * RANKS * TOKENS, E, K)
    assert t.token_ids is None and t.has_logits and t.header["ranks"] == [0, 1] and t.header["steps"] == STEPS
    for j, layer in enumerate(LAYERS):
        assert torch.equal(t.layer(j).experts, expected[layer][0])
        assert torch.equal(t.layer(j).logits, expected[layer][1])
    # and converted to a moebench trace, it stays the same
    back = read_trace(write_trace(tmp_path / "mb", t.header, [t.layer(j) for j in range(t.num_layers)]))
    for j in range(t.num_layers):
        assert torch.equal(back.layer(j).experts, t.layer(j).experts)
        assert torch.equal(back.layer(j).logits, t.layer(j).logits)


def test_index_only_megatron_trace(tmp_path):
    expected = write_megatron(tmp_path / "mt", logits=False)
    t = read_megatron(tmp_path / "mt", num_experts=16)
    assert not t.has_logits and t.num_experts == 16 and not t.header["num_experts_inferred"]
    assert torch.equal(t.layer(1).experts, expected[LAYERS[1]][0])
    inferred = read_megatron(tmp_path / "mt")
    assert inferred.num_experts == max(int(x.max()) for x, _ in expected.values()) + 1
    assert inferred.header["num_experts_inferred"]
    with pytest.raises(TraceError, match=r"expert index \d+ outside \[0, 4\)"):
        read_megatron(tmp_path / "mt", num_experts=4)


def lines(path):
    return path.read_text().splitlines(keepends=True)


def test_bad_megatron_files_give_one_line_errors(tmp_path):
    write_megatron(tmp_path / "a")
    rank0 = tmp_path / "a" / "router_trace_rank0.jsonl"
    text = lines(rank0)
    rank0.write_text("".join(text[:-1]) + text[-1][:25])  # a torn last line
    with pytest.raises(TraceError) as exc:
        read_megatron(tmp_path / "a")
    assert str(exc.value) == f"{rank0}: line {len(text)}: not valid JSON (truncated last line)"

    write_megatron(tmp_path / "b")
    bin1 = tmp_path / "b" / "logits_rank1.bin"
    bin1.write_bytes(bin1.read_bytes()[:-10])
    with pytest.raises(TraceError) as exc:
        read_megatron(tmp_path / "b")
    assert str(exc.value).startswith(f"{bin1}: truncated: router_trace_rank1.jsonl line ")

    write_megatron(tmp_path / "c")
    rank1 = tmp_path / "c" / "router_trace_rank1.jsonl"
    recs = [json.loads(x) for x in lines(rank1)]
    del recs[0]["top_indices"]
    rank1.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(TraceError) as exc:
        read_megatron(tmp_path / "c")
    assert str(exc.value) == f"{rank1}: line 1: field 'top_indices' is missing"

    write_megatron(tmp_path / "d", logits=False)
    rank1 = tmp_path / "d" / "router_trace_rank1.jsonl"
    recs = [json.loads(x) for x in lines(rank1)]
    recs = [r for r in recs if not (r["layer"] == LAYERS[0] and r["step"] == 0)]  # one layer loses tokens
    rank1.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(TraceError, match="layers have different token counts"):
        read_megatron(tmp_path / "d")

    (tmp_path / "e").mkdir()
    with pytest.raises(TraceError, match="trace.json: missing"):
        open_trace(tmp_path / "e")


def test_router_state_gives_score_function_and_bias(tmp_path):
    write_megatron(tmp_path / "mt")
    bias = {layer: torch.randn(E) for layer in LAYERS}
    torch.save({("decoder", None, layer): {"weight": torch.randn(E, 4), "expert_bias": bias[layer],
                                           "score_function": "sigmoid", "topk": K} for layer in LAYERS},
               tmp_path / "mt" / "router_state_rank0.pt")
    t = read_megatron(tmp_path / "mt")
    assert t.header["score_function"] == "sigmoid" and t.header["bias"]
    assert all(torch.equal(t.layer(j).bias, bias[layer]) for j, layer in enumerate(LAYERS))
    (tmp_path / "mt" / "router_state_rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TraceError, match=r"router_state_rank0.pt: unreadable"):
        read_megatron(tmp_path / "mt")


def test_megatron_folder_is_a_trace_workload(tmp_path):
    from moebench.routers.base import RouteContext
    from moebench.routers.registry import ROUTERS
    from moebench.core.workloads import WORKLOADS, BatchShape

    expected = write_megatron(tmp_path / "mt", logits=False)
    w = WORKLOADS.create("trace", {"path": str(tmp_path / "mt"), "layer": 3})
    inputs = w.batch(BatchShape(10, 16, 4), 0, 1)  # E from the case: the trace has no logits
    assert torch.equal(inputs.experts, expected[3][0][10:20]) and inputs.token_ids is None
    r = ROUTERS.create("recorded").route(inputs, RouteContext(K, None))
    chosen = torch.empty(10, K, dtype=torch.int64)
    chosen[r.token_index, r.choice] = r.expert_index
    assert torch.equal(chosen, inputs.experts)
    from moebench.core.errors import WorkloadMismatchError

    with pytest.raises(WorkloadMismatchError, match="hash routing needs token ids"):
        ROUTERS.create("hash").route(inputs, RouteContext(K, None))

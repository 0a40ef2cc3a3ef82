"""Megatron-LM router traces, read unchanged: ``router_trace_rank{R}.jsonl`` (+ ``logits_rank{R}.bin``).

Megatron-Core's router tracer (``megatron/core/transformer/moe/router_trace.py``) writes one
JSON record per (step, block, layer) and rank::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

With logit capture a record also has ``logit_offset``, ``logit_bytes`` and ``logit_shape``
(<bfloat16>[num_tokens, E] at that byte offset of ``logits_rank{R}.bin``). MTP records
(``block: "mtp"``) are left out. Per layer, records are joined in (step, rank) order, so token
t of every layer is the same token. Megatron records no token ids and no E: E comes from the
logits, else from ``num_experts`` (the case's experts), else the largest index + 1. A
``router_state_rank{R}.pt`` (``--moe-routing-trace-dump-weights``) supplies the score function
and the expert bias when present.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from moebench.kinds.traces.format import LayerTrace, Trace, TraceError, check_layer, new_header
from moebench.store.reader import open_regular

RANK_FILE = re.compile(r"router_trace_rank(\d+)\.jsonl$")


def megatron_files(folder: Path) -> list[tuple[int, Path]]:
    """[(rank, path)] of the folder's router_trace_rank*.jsonl, by rank."""
    found = []
    for p in folder.glob("router_trace_rank*.jsonl"):
        m = RANK_FILE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _records(rank: int, path: Path) -> list[dict]:
    records = []
    fd = open_regular(path)  # a FIFO or device named like a trace file must not block (#23)
    if fd is None:
        raise TraceError(path, "missing")
    with os.fdopen(fd, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: [[[[... (#23)
                torn = not line.endswith("\n")
                raise TraceError(path, f"line {lineno}: not valid JSON" + (" (truncated last line)" if torn else "")) from None
            if not isinstance(rec, dict):
                raise TraceError(path, f"line {lineno}: expected a JSON object")
            for key in ("layer", "top_indices"):
                if key not in rec:
                    raise TraceError(path, f"line {lineno}: field {key!r} is missing")
            if rec.get("block", "decoder") != "decoder" or "mtp_idx" in rec:
                continue
            idx = rec["top_indices"]
            if not isinstance(idx, list) or any(not isinstance(r, list) for r in idx):
                raise TraceError(path, f"line {lineno}: 'top_indices' must be a list of lists of expert indices")
            if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < 1 << 31 for r in idx for e in r):
                raise TraceError(path, f"line {lineno}: 'top_indices' must hold expert indices (integers >= 0)")
            for key in ("layer", "step", "logit_offset", "logit_bytes"):  # used as numbers below (#23)
                if key in rec and (isinstance(rec[key], bool) or not isinstance(rec[key], int) or rec[key] < 0):
                    raise TraceError(path, f"line {lineno}: {key!r} must be an integer >= 0, got {str(rec[key])[:40]}")
            widths = {len(r) for r in idx}
            if len(widths) > 1:
                raise TraceError(path, f"line {lineno}: 'top_indices' rows have different lengths {sorted(widths)}")
            if "num_tokens" in rec and rec["num_tokens"] != len(idx):
                raise TraceError(path, f"line {lineno}: num_tokens={rec['num_tokens']} but top_indices has {len(idx)} rows")
            own = rec.get("rank", rank)  # it names logits_rank{R}.bin: only this file's rank (#23)
            if isinstance(own, bool) or own != rank:
                raise TraceError(path, f"line {lineno}: rank is {str(own)[:40]!r}, expected {rank} (the file's rank)")
            rec["_line"], rec["_rank"], rec["_file"] = lineno, rank, path
            if idx:  # a step with no tokens on this rank adds nothing
                records.append(rec)
    return records


def _logits(rec: dict, folder: Path) -> torch.Tensor:
    """<float32>[num_tokens, E] from the record's logits sidecar (stored as bfloat16)."""
    path = folder / f"logits_rank{rec['_rank']}.bin"
    where = f"{rec['_file'].name} line {rec['_line']}"
    if not path.is_file():
        raise TraceError(path, f"missing ({where} points at it)")
    offset, size, shape = rec["logit_offset"], rec["logit_bytes"], rec.get("logit_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] * shape[1] * 2 == size):
        raise TraceError(rec["_file"], f"line {rec['_line']}: logit_shape {shape!r} does not match logit_bytes {size}")
    total = path.stat().st_size
    if offset < 0 or offset + size > total:
        raise TraceError(path, f"truncated: {where} needs bytes {offset}..{offset + size}, the file has {total}")
    fd = open_regular(path)
    if fd is None:
        raise TraceError(path, f"missing ({where} points at it)")
    with os.fdopen(fd, "rb") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
    return torch.frombuffer(data, dtype=torch.int16).view(torch.bfloat16).reshape(shape).float()


def _router_state(folder: Path) -> dict:
    """{layer: {"score_function", "expert_bias"}} from router_state_rank*.pt where present."""
    out = {}
    for p in sorted(folder.glob("router_state_rank*.pt")):
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TraceError(p, f"unreadable ({str(exc).splitlines()[0]})") from None
        for key, value in (state.items() if isinstance(state, dict) else ()):
            if isinstance(key, tuple) and len(key) == 3 and key[0] == "decoder" and isinstance(value, dict):
                out[int(key[2])] = value
    return out


def read_megatron(folder: str | Path, num_experts: int | None = None) -> Trace:
    """Read a folder of Megatron-LM router traces as a `Trace` (layers in ascending order)."""
    folder = Path(folder)
    files = megatron_files(folder)
    if not files:
        raise TraceError(folder, "no router_trace_rank*.jsonl files")
    by_layer: dict[int, list[dict]] = {}
    for rank, path in files:
        for rec in _records(rank, path):
            by_layer.setdefault(int(rec["layer"]), []).append(rec)
    if not by_layer:
        raise TraceError(files[0][1], "no decoder records")
    layer_numbers = sorted(by_layer)
    recs0 = by_layer[layer_numbers[0]]
    with_logits = all("logit_offset" in r for recs in by_layer.values() for r in recs)
    state = _router_state(folder)
    experts, logits = [], []
    for number in layer_numbers:
        recs = sorted(by_layer[number], key=lambda r: (r.get("step", 0), r["_rank"]))
        rows = [torch.tensor(r["top_indices"], dtype=torch.int64).reshape(len(r["top_indices"]), -1) for r in recs]
        widths = {x.shape[1] for x in rows if x.numel()}
        if len(widths) > 1:
            raise TraceError(recs[0]["_file"], f"layer {number}: records have different top-k {sorted(widths)}")
        experts.append(torch.cat(rows))
        if with_logits:
            logits.append(torch.cat([_logits(r, folder) for r in recs]))
    counts = {n: x.shape[0] for n, x in zip(layer_numbers, experts)}
    if len(set(counts.values())) > 1:
        raise TraceError(files[0][1], f"layers have different token counts {counts}; cannot align them")
    k = experts[0].shape[1]
    if with_logits:
        e = logits[0].shape[1]
    elif num_experts is not None:
        e = num_experts
    else:
        e = max(int(x.max()) for x in experts) + 1
    score = next((v.get("score_function") for v in state.values() if v.get("score_function")), None)
    header = new_header(
        model=folder.name, family="megatron", source="megatron", layers=layer_numbers, num_experts=e, top_k=k,
        tokens=experts[0].shape[0], score_function=score if score in ("softmax", "sigmoid") else "softmax",
        replay=None, logits=with_logits, weights=False, token_ids=False,
        bias=bool(state) and all(torch.is_tensor(state.get(n, {}).get("expert_bias")) for n in layer_numbers),
        dtype="bfloat16" if with_logits else None, tokenizer=None, vocab_size=None, text_sha256=None,
        num_experts_inferred=not with_logits and num_experts is None,
        ranks=[r for r, _ in files], steps=len({r.get("step", 0) for r in recs0}),
    )
    layers = {}
    for j, number in enumerate(layer_numbers):
        bias = state.get(number, {}).get("expert_bias") if header["bias"] else None
        layer = LayerTrace(experts[j], logits[j] if with_logits else None, None,
                           None if bias is None else bias.float())
        layers[j] = check_layer(layer, header, folder, f"layer {number}")
    return Trace(folder, header, None, _layers=layers)

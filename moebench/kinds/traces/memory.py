"""What replaying a trace holds beyond the batches themselves: the recorded layers it loads.

A trace case is a plain routing case (moebench/run/memory_estimate.py counts its batches,
router, routing and dispatch); the `trace` and `trace_fit` workloads add these parts through
their ``memory_parts(case)`` method, read from the trace's header (trace.json) or, for a
Megatron-LM folder, from its file sizes, before anything is loaded. N tokens per layer, E
experts, k choices, L recorded layers, s bytes per stored logit, T the case's tokens:

- ``trace layers``: each layer the case replays stays loaded (format.Trace caches it): experts
  <int64>[N, k], logits <float32>[N, E] (when recorded), weights <float32>[N, k] (when
  recorded), bias <float32>[E]. A case with ``layer`` set replays 1 layer, else min(L, batches)
  (batch b replays layer b mod L); `trace_fit` fitted from a trace folder reads all L;
- ``trace load``: while one layer loads: the stored experts <int32>[N, k] and logits
  <dtype>[N, E] before their conversion, check_layer's isfinite <bool>[N, E] and sort of the
  experts (values and indices <int64>[N, k]);
- ``trace ids``: token ids <int64>[N] and the vocabulary frequencies (bincount <int64>[V],
  counts and shares <float32>[V]; V = vocab_size of the header, else N), the shuffled order's
  permutation <int64>[N];
- ``trace batch``: per batch the gathered experts <int64>[T, k] and weights <float32>[T, k],
  and, for an index-only trace, the logits it builds <float32>[T, E];
- a Megatron-LM folder (no header): its logit sidecars (logits_rank*.bin, bfloat16) are read
  whole, all layers at once: float32 copies 2x the sidecar bytes, plus the bfloat16 reads and
  the per-layer concatenation (2x more, counted as ``trace load``); its records
  (router_trace_rank*.jsonl) become Python objects, counted as `JSON_OBJECT_FACTOR` times
  their text, and the experts <int64> at most 4 bytes per character of that text (an index
  takes at least 2 characters, "7,");
- a `trace_fit` shape JSON: `JSON_OBJECT_FACTOR` times its size.

A path that cannot be read adds nothing: the run's own error row says what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from moebench.kinds.traces.format import HEADER

INT64, INT32, FLOAT32 = 8, 4, 4
STORED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
JSON_OBJECT_FACTOR = 8  # bytes of parsed Python objects per byte of JSON text (a guess)


def _header(path: Path) -> dict | None:
    folder = path.parent if path.is_file() else path
    try:
        header = json.loads((folder / HEADER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _megatron_parts(folder: Path) -> dict[str, int]:
    jsonl = sum(p.stat().st_size for p in folder.glob("router_trace_rank*.jsonl") if p.is_file())
    sidecars = sum(p.stat().st_size for p in folder.glob("logits_rank*.bin") if p.is_file())
    return {"trace layers": 2 * sidecars + 4 * jsonl, "trace load": 2 * 2 * sidecars,
            "trace records": JSON_OBJECT_FACTOR * jsonl}


def trace_parts(path: str, tokens: int, experts: int, batches: int, layer: int | None = None,
                shuffled: bool = False, all_layers: bool = False) -> dict[str, int]:
    """The parts (module doc) of replaying the trace at ``path`` in a case of ``tokens``
    tokens, ``experts`` experts and ``batches`` batches; {} where it cannot be read."""
    p = Path(path)
    try:
        folder = p.parent if p.is_file() else p
        header = _header(p)
        if header is None:
            if folder.is_dir() and any(folder.glob("router_trace_rank*.jsonl")):
                return _megatron_parts(folder)
            return {}
        n, e, k = int(header["tokens"]), int(header["num_experts"]), int(header["top_k"])
        count = len(header["layers"])
    except (OSError, KeyError, TypeError, ValueError):
        return {}
    loaded = count if all_layers else (1 if layer is not None else min(count, max(1, batches)))
    logits = bool(header.get("logits"))
    s = STORED_BYTES.get(str(header.get("dtype")), 4)
    per_layer = n * k * INT64 + (n * e * FLOAT32 if logits else 0) + (n * k * FLOAT32 if header.get("weights") else 0) \
        + e * FLOAT32
    load = n * k * INT32 + (n * e * (s + 1) if logits else 0) + 2 * n * k * INT64
    ids = 0
    if header.get("token_ids"):
        v = int(header.get("vocab_size") or n)
        ids = n * INT64 + v * (INT64 + 2 * FLOAT32)
    if shuffled:
        ids += n * INT64
    t = min(tokens, n) if n else tokens
    batch = t * k * (INT64 + FLOAT32) + (0 if logits else t * experts * FLOAT32)
    return {"trace layers": loaded * per_layer, "trace load": load, "trace ids": ids, "trace batch": batch}


def shape_parts(path: str, tokens: int, experts: int, batches: int, layer: int | None = None) -> dict[str, int]:
    """`trace_fit`'s parts: a shape JSON's parsed objects, or a trace folder read whole to fit."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json" and p.name != HEADER:
        try:
            return {"trace shape": JSON_OBJECT_FACTOR * p.stat().st_size}
        except OSError:
            return {}
    return trace_parts(path, tokens, experts, batches, layer, all_layers=True)

"""The `trace` and `trace_fit` workloads: a recorded model's traffic as batches of RouteInputs.

`trace` replays a trace's logits (index-only traces: `index_only_logits`, fixed routing),
token ids (so hash routers see the real ids, with the trace's own id frequencies as
vocab_freq) and the model's choices (for the `recorded` router). Batch b of a case with T
tokens is tokens [w·T, (w+1)·T) of one layer: with ``layer`` set, w = b; with all layers,
batch b is layer b mod L, window w = b div L (the order in which the model computes them).
``order: shuffled`` draws the windows from a seeded permutation of the token positions
(the same for every layer), which keeps popularity and destroys temporal locality. Hidden
states are not recorded: each batch gets N(0, I) hidden states of the case's size as the
payload of dispatch and combine.

`trace_fit` draws synthetic batches with a trace's per-layer first-choice popularity and
temporal locality (`moebench.kinds.traces.stats.fit_shape`), from a trace or from the shape JSON
that `moebench trace stats DIR --shape FILE` writes, so a trace's shape can be shared without
its data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from moebench.core.errors import MoebenchError, WorkloadMismatchError
from moebench.routers.base import RouteInputs
from moebench.core.workloads import WORKLOADS, BatchShape, Workload, generator, gumbel


@dataclass(frozen=True)
class TraceInputs(RouteInputs):
    """RouteInputs plus what a trace adds: experts <int64>[T, k] the model chose, its weights
    <float32>[T, k] (or None), the trace's score function, and the layer number."""

    experts: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    score_function: str = "softmax"
    layer: int | None = None


def _cache(obj) -> dict:
    # frozen dataclass: the opened trace is kept in the instance dict (one workload per case)
    return obj.__dict__.setdefault("_cache", {})


def _positions(layers: list[int], layer: int | None, path: str) -> list[int]:
    if layer is None:
        return list(range(len(layers)))
    if layer not in layers:
        raise MoebenchError(f"trace {path}: no MoE layer {layer}; recorded layers are {layers}")
    return [layers.index(layer)]


@WORKLOADS.register("trace")
@dataclass(frozen=True)
class TraceWorkload(Workload):
    """Replay a recorded router trace (moebench or Megatron-LM folder): logits, token ids, the model's choices.

    path: the trace folder.  layer: one MoE layer (its model layer number); null: all layers.
    order: stream (windows in token order) or shuffled (windows of a seeded permutation).
    """

    path: str = ""
    layer: int | None = None
    order: Literal["stream", "shuffled"] = "stream"
    makes = ("token_ids", "recorded_experts")
    description = "replay a recorded router trace (logits, token ids, the model's own choices)"

    def check(self):
        return None if self.path else "path (a trace folder) is required"

    def trace(self, num_experts: int | None = None):
        cache = _cache(self)
        if "trace" not in cache:
            from moebench.kinds.traces.readers import open_trace

            cache["trace"] = open_trace(self.path, num_experts)
        return cache["trace"]

    def memory_parts(self, case) -> dict[str, int]:
        """What replaying this trace holds beyond its batches (moebench/kinds/traces/memory.py),
        read from its header before anything loads: moebench.run.memory_estimate adds it."""
        from moebench.kinds.traces.memory import trace_parts

        return trace_parts(self.path, case.tokens, case.experts, case.batches, self.layer, self.order == "shuffled")

    def batch(self, shape: BatchShape, seed: int, batch_index: int = 0) -> RouteInputs:
        trace = self.trace(shape.experts)
        if trace.num_experts != shape.experts:
            raise WorkloadMismatchError(f"trace {self.path} has {trace.num_experts} experts; the case has {shape.experts}")
        positions = _positions(trace.header["layers"], self.layer, self.path)
        n, t = trace.tokens, shape.tokens
        j = positions[batch_index % len(positions)]
        w = batch_index // len(positions)
        if (w + 1) * t > n:
            raise WorkloadMismatchError(
                f"trace {self.path}: batch {batch_index} needs tokens {w * t}..{(w + 1) * t} of a layer; "
                f"the trace has {n} tokens per layer (lower tokens or batches)")
        cache = _cache(self)
        if self.order == "shuffled":
            key = ("perm", seed)
            if key not in cache:
                cache[key] = torch.randperm(n, generator=generator("cpu", seed, 0))
            pos = cache[key][w * t:(w + 1) * t]
        else:
            pos = torch.arange(w * t, (w + 1) * t)
        layer = trace.layer(j)
        experts = layer.experts[pos]
        if layer.logits is not None:
            logits = layer.logits[pos]
        else:
            from moebench.kinds.traces.format import index_only_logits

            logits = index_only_logits(experts, trace.num_experts)
        if "freq" not in cache:
            cache["freq"] = trace.vocab_freq()
        dev = shape.device
        hidden = torch.randn(t, shape.hidden, generator=generator(dev, seed, 1 + batch_index), device=dev)
        ids = None if trace.token_ids is None else trace.token_ids[pos].to(dev)
        return TraceInputs(
            logits=logits.to(dev, shape.dtype), hidden=hidden.to(shape.dtype), token_ids=ids,
            vocab_freq=None if cache["freq"] is None else cache["freq"].to(dev),
            experts=experts.to(dev), weights=None if layer.weights is None else layer.weights[pos].to(dev),
            score_function=trace.header.get("score_function", "softmax"), layer=trace.header["layers"][j],
        )


def load_shape(path: str) -> dict:
    """A fitted shape from a shape JSON file, or fitted now from a trace folder."""
    from moebench.kinds.traces.stats import SHAPE_FORMAT, fit_shape

    p = Path(path)
    if p.is_file() and p.suffix == ".json" and p.name != "trace.json":
        try:
            shape = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # [[[[... (#23)
            raise MoebenchError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(shape, dict) or shape.get("format") != SHAPE_FORMAT:
            raise MoebenchError(f"{p}: expected a trace shape ('format': {SHAPE_FORMAT!r})")
        e = shape.get("num_experts")
        for i, layer in enumerate(shape.get("layers") or []):
            p_ = layer.get("top1_share") if isinstance(layer, dict) else None
            if not (isinstance(p_, list) and len(p_) == e and all(isinstance(v, (int, float)) and v >= 0 for v in p_)
                    and sum(p_) > 0 and isinstance(layer.get("copy"), (int, float)) and 0 <= layer["copy"] <= 1):
                raise MoebenchError(f"{p}: layers[{i}]: expected top1_share (E={e} shares >= 0) and copy in [0, 1]")
        if not shape.get("layers"):
            raise MoebenchError(f"{p}: 'layers' is missing or empty")
        return shape
    from moebench.kinds.traces.readers import open_trace

    return fit_shape(open_trace(path))


def chain_logits(pop: torch.Tensor, copy: float, tokens: int, g: torch.Generator) -> torch.Tensor:
    """<float32>[T, E]: log(pop) + Gumbel (top-1 ~ pop); then each token t >= 1 is, with
    probability ``copy``, made to repeat the first choice of token t-1 (its row's maximum
    is raised above the rest at that expert). The chain keeps the marginal ``pop``."""
    dev = pop.device
    logits = torch.log(pop.clamp_min(1e-30))[None, :] + gumbel((tokens, pop.numel()), g, dev)
    fresh = logits.argmax(dim=1)
    copied = torch.rand(tokens, generator=g, device=dev) < copy
    copied[0] = False
    idx = torch.arange(tokens, device=dev)
    source = torch.where(copied, 0, idx).cummax(dim=0).values  # last fresh token at or before t
    top = fresh[source]
    rows = copied.nonzero().squeeze(1)
    if rows.numel():
        logits[rows, top[rows]] = logits[rows].max(dim=1).values + 1.0
    return logits


@WORKLOADS.register("trace_fit")
@dataclass(frozen=True)
class TraceFit(Workload):
    """Synthetic batches with a recorded trace's per-layer expert popularity and temporal locality.

    path: a trace folder or a shape JSON (`moebench trace stats DIR --shape FILE`).
    layer: the layer to imitate; null: batch b imitates layer b mod L.
    """

    path: str = ""
    layer: int | None = None
    description = "synthetic batches with a trace's popularity and temporal locality"

    def check(self):
        return None if self.path else "path (a trace folder or shape JSON) is required"

    def memory_parts(self, case) -> dict[str, int]:
        """A shape JSON's objects, or the trace folder it fits read whole (kinds/traces/memory.py)."""
        from moebench.kinds.traces.memory import shape_parts

        return shape_parts(self.path, case.tokens, case.experts, case.batches, self.layer)

    def make(self, shape: BatchShape, structure, noise, batch_index):
        cache = _cache(self)
        if "shape" not in cache:
            cache["shape"] = load_shape(self.path)
        fitted = cache["shape"]
        if fitted["num_experts"] != shape.experts:
            raise WorkloadMismatchError(f"trace shape {self.path} has {fitted['num_experts']} experts; "
                                        f"the case has {shape.experts}")
        numbers = [layer["layer"] for layer in fitted["layers"]]
        positions = _positions(numbers, self.layer, self.path)
        layer = fitted["layers"][positions[batch_index % len(positions)]]
        pop = torch.tensor(layer["top1_share"], dtype=torch.float32, device=shape.device)
        logits = chain_logits(pop / pop.sum(), float(layer["copy"]), shape.tokens, noise)
        return RouteInputs(logits=logits, hidden=self.noise_hidden(shape, noise))

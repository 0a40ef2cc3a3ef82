"""`recorded`: the model's own choices as a router, so its loads sit beside moebench's routers.

The `trace` workload hands every batch's recorded experts <int64>[T, k] (and the model's
weights <float32>[T, k], where recorded) in `TraceInputs`; this router returns them through
`TokenChoiceRouter.finish`, so the case's capacity and drop policy apply to the model's
routing exactly as to any other router's. Probabilities are the trace's score function
(softmax or sigmoid, rows normalised) of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.core.errors import WorkloadMismatchError
from moebench.routers.base import RouteContext, RouteInputs, TokenChoiceRouter
from moebench.routers.registry import register
from moebench.core.routing import Routing
from moebench.kinds.traces.workload import TraceInputs


@register("recorded")
@dataclass(frozen=True)
class Recorded(TokenChoiceRouter):
    """The experts the recorded model chose (needs the `trace` workload); weights: the model's,
    or 1/k where the trace has none (`uniform_weights: true` forces 1/k)."""

    uniform_weights: bool = False

    needs = ("recorded_experts",)
    paper = "the recorded model's own routing (trace workload)"

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        experts = inputs.experts if isinstance(inputs, TraceInputs) else None
        if experts is None:
            raise WorkloadMismatchError("the recorded router needs the `trace` workload (a model's recorded choices)")
        k = experts.shape[1]
        if ctx.top_k != k:
            raise WorkloadMismatchError(f"the trace records top_k={k}; this case has top_k={ctx.top_k}")
        logits = inputs.logits.float()
        if inputs.weights is not None and not self.uniform_weights:
            weight = inputs.weights.float()
        else:
            weight = torch.full(experts.shape, 1.0 / k, device=logits.device)
        if inputs.score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        else:
            probs = torch.softmax(logits, dim=-1)
        return self.finish(experts.to(logits.device), weight, probs, logits, ctx)

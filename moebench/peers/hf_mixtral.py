"""Hugging Face transformers' Mixtral router as a moebench router: `peer:hf.mixtral`.

In transformers 5 the routing lives in ``MixtralTopKRouter.forward(hidden_states)``:
``router_logits = F.linear(hidden_states, weight)``; softmax in fp32; top-k of the
probabilities; the k values divided by their sum. There is no function that takes logits, so
the adapter builds one ``MixtralTopKRouter`` with hidden size E and weight = the E x E
identity, and feeds it the logits as hidden states: ``F.linear`` then returns the logits
exactly (each output is one input times 1 plus zeros). The timed call therefore includes one
[T, E] x [E, E] matmul (the conformance script times it alone). transformers 4.x had these
steps inline in ``MixtralSparseMoeBlock.forward`` (no router module); there the adapter's rows
are skipped with that reason.

Mixtral is dropless: a case with a capacity is skipped with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from moebench.peers.base import PeerRouter, PeerSkip, rank_major
from moebench.routers.base import RouteContext, RouteInputs
from moebench.routers.registry import register
from moebench.core.routing import Routing


@dataclass(frozen=True)
class _Prepared:
    router: Any
    logits: torch.Tensor
    top_k: int


@register("peer:hf.mixtral")
@dataclass(frozen=True)
class HFMixtral(PeerRouter):
    """transformers MixtralTopKRouter (softmax, top-k, renormalise; dropless) through an identity gate."""

    package = "transformers"
    module = "transformers.models.mixtral.modeling_mixtral"
    system = "Hugging Face transformers"
    paper = "transformers MixtralTopKRouter.forward with an identity gate (needs transformers)"

    def prepare(self, inputs: RouteInputs, ctx: RouteContext, lib) -> _Prepared:
        if ctx.capacity is not None:
            raise PeerSkip(
                f"HF Mixtral routing is dropless (no capacity); this case has capacity {ctx.capacity} "
                "(run it with capacity_factor: null)"
            )
        logits = inputs.logits
        t, e = logits.shape
        config = SimpleNamespace(num_experts_per_tok=ctx.top_k, num_local_experts=e, hidden_size=e)
        router_cls = getattr(lib, "MixtralTopKRouter", None)
        if router_cls is None:
            raise PeerSkip("this transformers has no MixtralTopKRouter (transformers >= 5 expected)")
        router = router_cls(config).to(device=logits.device, dtype=logits.dtype).eval()
        with torch.no_grad():
            router.weight.copy_(torch.eye(e, dtype=logits.dtype, device=logits.device))
        router.requires_grad_(False)
        return _Prepared(router, logits, ctx.top_k)

    def call(self, p: _Prepared):
        with torch.no_grad():
            return p.router(p.logits)

    def convert(self, native, p: _Prepared) -> Routing:
        router_logits, scores, indices = native
        if not torch.equal(router_logits, p.logits):
            raise RuntimeError("identity gate changed the logits")
        kept = torch.ones_like(indices, dtype=torch.bool)
        probs = torch.softmax(p.logits.float(), dim=-1)
        return rank_major(indices, scores.float(), kept, probs, p.logits, None)

"""The MoE families moebench records, and the moebench router that reproduces each one's choices.

In transformers 5 every family's routing sits in one module per MoE layer whose forward returns
``(router_logits <[T, E]>, weights <[T, k]>, experts <int64>[T, k]>)``:

| model_type | router module | scores | selection | moebench router |
|---|---|---|---|---|
| mixtral | MixtralTopKRouter | softmax | top-k of p, renormalised | topk renormalize |
| qwen2_moe, qwen3_moe, olmoe | *TopKRouter | softmax | top-k of p, renormalised iff norm_topk_prob | topk |
| deepseek_v2 | DeepseekV2TopkRouter | softmax | greedy top-k, × routed_scaling_factor | topk route_scale |
| deepseek_v3 | DeepseekV3TopkRouter | sigmoid | top-k of s + e_score_correction_bias in the best groups | deepseek + the bias |
| gpt_oss | GptOssTopKRouter | softmax over the k | top-k of the logits (gate has a bias) | topk softmax_after_topk |

DeepSeek-V2's ``group_limited_greedy`` ranks groups by their best expert, which no moebench
router does; such traces record fine but have no replay router. This module reads configs
and modules by attribute only: it never imports transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

ROUTER_CLASS = re.compile(r"Top[Kk]Router$")
LAYER_NUMBER = re.compile(r"layers\.(\d+)\.")


def _get(config, name: str, default=None):
    value = getattr(config, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class Family:
    """score_function: what the model's scores are.  routing(config): the options recorded in
    the header.  replay(config): the moebench router {name, params} or None.  bias_attr: the
    router module's selection-only bias buffer.  sorted_choices: the model's top-k lists its
    experts in score order (DeepSeek's uses sorted=False)."""

    score_function: str
    routing: Callable[[Any], dict]
    replay: Callable[[Any], dict | None]
    bias_attr: str | None = None
    sorted_choices: bool = True


def _qwen_like(config) -> dict:
    return {"name": "topk", "params": {"renormalize": bool(_get(config, "norm_topk_prob", False))}}


def _deepseek_v2(config) -> dict | None:
    if _get(config, "topk_method", "greedy") != "greedy":
        return None
    return {"name": "topk", "params": {"route_scale": float(_get(config, "routed_scaling_factor", 1.0))}}


def _deepseek_v3(config) -> dict:
    return {"name": "deepseek", "params": {
        "num_groups": int(_get(config, "n_group", 1)), "topk_groups": int(_get(config, "topk_group", 1)),
        "route_scale": float(_get(config, "routed_scaling_factor", 1.0)), "bias_update_rate": 0.0,
    }}


def _options(*names):
    return lambda config: {n: _get(config, n) for n in names}


FAMILIES: dict[str, Family] = {
    "mixtral": Family("softmax", _options("router_jitter_noise"), lambda c: {"name": "topk", "params": {"renormalize": True}}),
    "qwen2_moe": Family("softmax", _options("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"), _qwen_like),
    "qwen3_moe": Family("softmax", _options("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"), _qwen_like),
    "olmoe": Family("softmax", _options("norm_topk_prob"), _qwen_like),
    "deepseek_v2": Family("softmax", _options("topk_method", "n_group", "topk_group", "routed_scaling_factor",
                                              "first_k_dense_replace"), _deepseek_v2, sorted_choices=False),
    "deepseek_v3": Family("sigmoid", _options("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                                              "first_k_dense_replace"), _deepseek_v3,
                          bias_attr="e_score_correction_bias", sorted_choices=False),
    "gpt_oss": Family("softmax", lambda c: {"softmax_after_topk": True, "gate_bias": True},
                      lambda c: {"name": "topk", "params": {"softmax_after_topk": True}}),
}


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", ""))


def router_modules(model) -> list[tuple[int, str, Any]]:
    """[(layer number, module name, module)] of every router module, in layer order."""
    found = []
    for name, module in model.named_modules():
        if ROUTER_CLASS.search(type(module).__name__):
            m = LAYER_NUMBER.search(name + ".")
            found.append((int(m.group(1)) if m else len(found), name, module))
    return sorted(found, key=lambda x: x[0])


def matching_router(header: dict, bias: torch.Tensor | None = None):
    """(router, RouterState) of the header's replay router, the state holding the recorded
    selection bias <float32>[E] (DeepSeek-V3) so it routes as the model did; None if none."""
    from moebench.routers.base import RouterState
    from moebench.routers.registry import ROUTERS

    spec = header.get("replay")
    if not spec:
        return None
    router = ROUTERS.create(spec["name"], spec.get("params", {}))
    state = router.init_state(header["num_experts"], torch.device("cpu"))
    if bias is not None:
        state = RouterState(bias=bias.float().clone(), extra=state.extra)
    return router, state


def replay_layer(header: dict, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """<int64>[N, k]: the experts the header's replay router picks from logits <float32>[N, E]
    (dropless, no randomness); None when the family has no replay router."""
    from moebench.routers.base import RouteContext, RouteInputs

    made = matching_router(header, bias)
    if made is None:
        return None
    router, state = made
    n, k = logits.shape[0], header["top_k"]
    problem = router.applicable(k, logits.shape[1])  # e.g. BASE (top-1) at k=2 filled half of `out`
    if problem:
        from moebench.core.errors import MoebenchError

        raise MoebenchError(f"trace header: replay router {header['replay'].get('name')!r} cannot replay it: {problem}")
    ctx = RouteContext(k, None, "position", torch.Generator().manual_seed(0), state)
    routing = router.route(RouteInputs(logits=logits.float()), ctx)
    out = torch.full((n, k), -1, dtype=torch.int64)  # never uninitialised memory: unfilled slots stay -1
    out[routing.token_index, routing.choice] = routing.expert_index
    return out


def same_choices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<bool>[N]: whether each token chose the same set of experts in a and b (<int64>[N, k])."""
    return (a.sort(dim=1).values == b.sort(dim=1).values).all(dim=1)


def selection_scores(header: dict, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """<float32>[N, E]: what the family ranks experts by: softmax (or sigmoid) of the logits,
    plus the selection bias where there is one."""
    x = logits.float()
    s = torch.sigmoid(x) if header.get("score_function") == "sigmoid" else torch.softmax(x, dim=-1)
    return s if bias is None else s + bias.float()


def equivalent_choices(scores: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<bool>[N]: a and b (<int64>[N, k]) pick the same experts, or experts whose selection
    scores <[N, E]> are equal (low-precision logits tie often: bfloat16 keeps 8 bits, and
    torch.topk breaks ties in no fixed order, moebench by the lower index)."""
    sa = scores.gather(1, a).sort(dim=1).values
    sb = scores.gather(1, b).sort(dim=1).values
    return same_choices(a, b) | (sa == sb).all(dim=1)

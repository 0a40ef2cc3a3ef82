"""Token-choice routers: top-k (Mixtral/Qwen/Megatron), Switch, noisy top-k, GShard, DeepSeek.

All share `TokenChoiceRouter.finish` for capacity and drops, and its expert-bias option.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from moebench.routers.base import (CAPTURE_ALL, RouteContext, RouteInputs, TokenChoiceRouter, normalize_weights,
                                   top_k_experts)
from moebench.routers.registry import register
from moebench.core.routing import Routing


def affinities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """<float32>[T, E]: softmax or sigmoid affinities of fp32 logits."""
    return torch.softmax(logits, dim=-1) if kind == "softmax" else torch.sigmoid(logits)


def as_probs(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Row-normalised scores: what the load-balancing loss averages (sigmoid rows sum to 1)."""
    if kind == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


@register("topk")
@dataclass(frozen=True)
class TopK(TokenChoiceRouter):
    """General token choice: pick the k experts with the highest score (+ bias).

    score: softmax or sigmoid of the logits.
    softmax_after_topk: weights = softmax over the k chosen logits (Mixtral), computed as the
        chosen softmax probabilities divided by their sum (equal up to rounding); needs softmax.
    renormalize: divide the k weights by their sum (Qwen-MoE `norm_topk_prob`).
    route_scale: multiply the weights (DeepSeek-V3 `routed_scaling_factor`).
    """

    score: Literal["softmax", "sigmoid"] = "softmax"
    softmax_after_topk: bool = False
    renormalize: bool = False
    route_scale: float = 1.0

    paper = "Mixtral (Jiang et al. 2024), Qwen-MoE, Megatron-Core topk_routing_with_score_function"
    capturable_phases = CAPTURE_ALL

    def check(self) -> str | None:
        if self.softmax_after_topk and self.score != "softmax":
            return "softmax_after_topk needs score: softmax"
        if self.route_scale <= 0:
            return f"route_scale must be > 0, got {self.route_scale}"
        return None

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        scores = affinities(logits, self.score)
        # softmax over the k chosen logits = the chosen probabilities over their sum (how HF
        # Mixtral computes it); one division instead of a second exp, fused into the selection
        normalizations = int(self.softmax_after_topk) + int(self.renormalize)
        if normalizations < 2 and self.route_scale == 1.0:  # decode sizes: one kernel call
            fused = self.fused(scores, ctx.top_k, ctx, normalizations > 0, as_probs(scores, self.score), logits)
            if fused is not None:
                return fused
        expert, weight = self.choose(scores, ctx.top_k, ctx, normalize=normalizations > 0)
        if normalizations == 2:
            weight = normalize_weights(weight)
        if self.route_scale != 1.0:
            weight = weight * self.route_scale
        return self.finish(expert, weight, as_probs(scores, self.score), logits, ctx, scores=scores)


@register("switch")
@dataclass(frozen=True)
class Switch(TokenChoiceRouter):
    """Switch Transformer: e* = argmax softmax(x), capacity with k = 1, weight p[e*] (not renormalised)."""

    fixed_top_k = 1
    paper = "Fedus, Zoph, Shazeer 2021, Switch Transformers"
    capturable_phases = CAPTURE_ALL

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        probs = torch.softmax(logits, dim=-1)
        fused = self.fused(probs, 1, ctx, False, probs, logits)  # decode sizes: one kernel call
        if fused is not None:
            return fused
        top, weight = self.choose(probs, 1, ctx)
        return self.finish(top, weight, probs, logits, ctx)


@register("noisy_topk")
@dataclass(frozen=True)
class NoisyTopK(TokenChoiceRouter):
    """Shazeer et al. 2017: H = x + eps * sigma, keep the top-k of H, weights = softmax of the kept H.

    noise_std: sigma when there is no noise gate.
    noise_gate: sigma = softplus(h · W_noise) with W_noise ~ N(0, 1/d) drawn once from
        `noise_seed` (fixed across a stream, like a trained parameter; needs hidden).
    """

    noise_std: float = 1.0
    noise_gate: bool = False
    noise_seed: int = 0

    paper = "Shazeer et al. 2017, Outrageously Large Neural Networks"
    capturable_phases = CAPTURE_ALL

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("hidden",) if self.noise_gate else ()

    def check(self) -> str | None:
        return None if self.noise_std >= 0 else f"noise_std must be >= 0, got {self.noise_std}"

    def _noise_weights(self, d: int, e: int, device, ctx: RouteContext) -> torch.Tensor:
        """<float32>[d, E]: W_noise, drawn on CPU from `noise_seed` once per stream (cached in state)."""
        cache = ctx.state.extra if ctx.state is not None else {}
        key = ("noise_gate", d, e, str(device))
        if key not in cache:
            g = torch.Generator().manual_seed(self.noise_seed)
            cache[key] = (torch.randn(d, e, generator=g) / d**0.5).to(device)
        return cache[key]

    def choose(self, inputs: RouteInputs, ctx: RouteContext) -> tuple[torch.Tensor, ...]:
        """(experts <int64>[T, k], weights <float32>[T, k], probs <float32>[T, E], logits
        <float32>[T, E]) before capacity: the noisy top-k (also the CUDA-graph form's, which
        only finishes them differently)."""
        logits = inputs.logits.float()
        t, e = logits.shape
        eps = torch.randn(t, e, generator=ctx.generator, device=logits.device)
        if self.noise_gate:
            h = inputs.hidden.float()
            sigma = F.softplus(h @ self._noise_weights(h.shape[1], e, h.device, ctx))
        else:
            sigma = self.noise_std
        noisy = logits + eps * sigma
        probs = torch.softmax(noisy, dim=-1)
        top = torch.topk(self.selection_scores(noisy, ctx), ctx.top_k, dim=-1)
        weight = torch.softmax(noisy.gather(1, top.indices), dim=-1)
        return top.indices, weight, probs, logits

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        return self.finish(*self.choose(inputs, ctx), ctx)


@register("gshard")
@dataclass(frozen=True)
class GShard(TokenChoiceRouter):
    """GShard top-2 (Algorithm 1): g1, g2 from softmax(x), renormalised to sum 1; the 2nd expert
    is kept only with probability min(1, 2 * g2) (random routing). With the `position` policy all
    1st choices take capacity slots before any 2nd choice; a 2nd choice the coin declines still
    advances its expert's position counter (uses a slot) and is then not kept (nor an assignment
    of the Routing). The aux loss counts 1st choices only (f_e = c_e/T, before capacity).
    """

    fixed_top_k = 2
    second_expert_sampling: bool = True
    paper = "Lepikhin et al. 2020, GShard"
    capture_reason = "declined 2nd choices are left out of the Routing, so its size depends on the coin flips"

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        probs = torch.softmax(logits, dim=-1)
        expert = torch.topk(self.selection_scores(probs, ctx), 2, dim=-1).indices
        gates = probs.gather(1, expert)
        weight = normalize_weights(gates)
        active = torch.ones_like(expert, dtype=torch.bool)
        if self.second_expert_sampling:
            u = torch.rand(expert.shape[0], generator=ctx.generator, device=logits.device)
            active[:, 1] = u < (2 * weight[:, 1]).clamp(max=1.0)
        routing = self.finish(expert, weight, probs, logits, ctx, active=active)
        return replace(routing, aux_counts="first")


@register("deepseek")
@dataclass(frozen=True)
class DeepSeek(TokenChoiceRouter):
    """DeepSeek-V3: s = sigmoid(x); select on s + b with an optional group limit; weights are the
    chosen s normalised to sum 1, times route_scale. The bias b is on by default (aux-loss-free).

    num_groups: experts split into this many equal groups (1 = no group limit).
    topk_groups: groups kept, ranked by the sum of each group's top-2 (s + b).
    """

    expert_bias: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0

    paper = "DeepSeek-V3 technical report 2024; Wang et al. 2024, Auxiliary-Loss-Free Load Balancing"
    capturable_phases = CAPTURE_ALL
    case_notes = {"single_batch": "its expert bias starts at zero and updates only after a batch: with batches: 1 it "
                                  "never updates, so the aux-loss-free balancing plays no part (without a group "
                                  "limit it picks the same experts as topk)"}

    def check(self) -> str | None:
        if self.num_groups < 1 or self.topk_groups < 1 or self.topk_groups > self.num_groups:
            return f"need 1 <= topk_groups <= num_groups, got topk_groups={self.topk_groups}, num_groups={self.num_groups}"
        if self.route_scale <= 0:
            return f"route_scale must be > 0, got {self.route_scale}"
        return None

    def applicable(self, top_k: int, num_experts: int) -> str | None:
        if num_experts % self.num_groups:
            return f"num_groups={self.num_groups} does not divide experts={num_experts}"
        per_group = num_experts // self.num_groups
        if self.num_groups > 1 and per_group < 2:
            return f"group scores need >= 2 experts per group, got {per_group}"
        if top_k > self.topk_groups * per_group:
            return f"top_k={top_k} exceeds the {self.topk_groups * per_group} experts in the kept groups"
        return None

    def route(self, inputs: RouteInputs, ctx: RouteContext) -> Routing:
        logits = inputs.logits.float()
        t, e = logits.shape
        scores = torch.sigmoid(logits)
        if self.num_groups == 1:
            expert, weight = self.choose(scores, ctx.top_k, ctx, normalize=True)
        else:
            select = self.selection_scores(scores, ctx)
            grouped = select.view(t, self.num_groups, e // self.num_groups)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = torch.topk(group_score, self.topk_groups, dim=-1).indices
            group_mask = torch.zeros(t, self.num_groups, dtype=torch.bool, device=logits.device)
            group_mask.scatter_(1, keep, True)
            select = select.masked_fill(~group_mask.repeat_interleave(e // self.num_groups, dim=1), float("-inf"))
            expert = top_k_experts(select, ctx.top_k)
            weight = normalize_weights(scores.gather(1, expert))
        if self.route_scale != 1.0:
            weight = weight * self.route_scale
        return self.finish(expert, weight, as_probs(scores, "sigmoid"), logits, ctx, scores=scores)

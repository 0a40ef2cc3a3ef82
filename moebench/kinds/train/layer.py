"""A small MoE layer whose gate is a moebench router: what `moebench run` trains per router.

    logits x = h . W_gate + b_gate      <float32>[T, E]   (+ gate noise while training)
    routing  = router.route(x, ...)     the router's own pipeline: selection, capacity, drops, bias
    y_t      = sum_{kept (t, e)} w_te * expert_e(h_t)     (sparse and dense routers)
    Soft MoE:  slots = D^T h, y = C . expert(slots)      (its dispatch/combine matrices)

Gradients reach the gate through the combine weights w (and D, C for Soft MoE), as in the
papers (or not at all under `combine: ones`: weight 1 per kept assignment, gate frozen, as
moe-routing-bench's top1/topk_hard); the aux and z losses reach it through the Routing's probs and logits. Each expert is a
ReLU MLP d -> f -> out; the E experts' weights are stacked (<float32>[E, d, f], [E, f, out]).

`trainable(router)` returns the router set up for autograd: routers with an `impl` option run
their torch path (the numba kernels compute weights outside autograd; torch gives the same
selection bit for bit). Soft MoE's slot parameters Phi become a learned parameter of the layer,
handed to the router through its RouterState cache, so the router's own route uses them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from moebench.routers.base import RouteContext, RouteInputs, Router, RouterState
from moebench.core.routing import Routing
from moebench.core.routing_check import check_routing


def trainable(router: Router) -> Router:
    """The router with its torch implementation selected where it has a choice."""
    names = {f.name for f in dataclasses.fields(router)} if dataclasses.is_dataclass(router) else set()
    return dataclasses.replace(router, impl="torch") if "impl" in names else router


class Experts(nn.Module):
    """E ReLU MLPs d -> f -> out, stacked. w1 <float32>[E, d, f], w2 <float32>[E, f, out]."""

    def __init__(self, experts: int, dim: int, hidden: int, out: int, g: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden, generator=g) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.randn(experts, hidden, out, generator=g) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(experts, out))

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """<float32>[n, out]: expert e on x <float32>[n, d]."""
        return torch.relu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """<float32>[E, n, out]: every expert on its own rows x <float32>[E, n, d]."""
        return torch.relu(torch.baddbmm(self.b1[:, None], x, self.w1)).bmm(self.w2) + self.b2[:, None]


def sparse_groups(routing: Routing) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(expert, token <int64>[n_e], weight <float32>[n_e])] of the kept assignments, per expert
    with any (one stable sort; weights keep their autograd graph)."""
    kept = routing.kept.nonzero().squeeze(1)
    expert = routing.expert_index[kept]
    order = torch.sort(expert, stable=True).indices
    kept = kept[order]
    counts = torch.bincount(expert, minlength=routing.num_experts).tolist()
    tokens, weights = routing.token_index[kept], routing.weight[kept]
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, tokens[start:start + n], weights[start:start + n]))
        start += n
    return out


class MoELayer(nn.Module):
    """Gate + E experts, routed by a moebench router.

    dim: d (input width).  hidden: f.  out: output width.  experts: E.
    gate_std: W_gate ~ N(0, gate_std^2 / d).  gate_skew, favoured: b_gate starts at +gate_skew on
    the first `favoured` experts, 0 elsewhere (a gate that starts out favouring a few experts).
    soft_slots: S for a Soft MoE router (its Phi <float32>[d, E*S] becomes a parameter).
    """

    def __init__(self, dim: int, hidden: int, out: int, experts: int, g: torch.Generator,
                 gate_std: float = 1.0, gate_skew: float = 0.0, favoured: int = 1,
                 soft_slots: int | None = None, phi: torch.Tensor | None = None):
        super().__init__()
        self.gate_w = nn.Parameter(gate_std * torch.randn(dim, experts, generator=g) / math.sqrt(dim))
        bias = torch.zeros(experts)
        bias[: min(favoured, experts)] = gate_skew
        self.gate_b = nn.Parameter(bias)
        self.experts = Experts(experts, dim, hidden, out, g)
        self.phi = nn.Parameter(phi.clone()) if phi is not None else None
        self.soft_slots = soft_slots
        self.out_dim = out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """<float32>[T, E]: x = h . W_gate + b_gate."""
        return torch.addmm(self.gate_b, h, self.gate_w)

    def freeze_gate(self) -> None:
        """Keep W_gate and b_gate at their initialisation (`combine: ones`)."""
        self.gate_w.requires_grad_(False)
        self.gate_b.requires_grad_(False)

    def forward(self, h: torch.Tensor, router: Router, ctx: RouteContext, token_ids=None, vocab_freq=None,
                noise: torch.Tensor | None = None, ones: bool = False,
                name: str = "router") -> tuple[torch.Tensor, Routing]:
        """(y <float32>[T, out], routing) for h <float32>[T, d]; noise <float32>[T, E] is added
        to the logits (gate noise while training). The routing is checked (`check_routing`,
        as `moebench run` checks it) before combine reads it: a plugin's out-of-range ids or NaN
        weights become the row's InvalidRouting, named ``name``. Logits that are no longer
        finite are the training's divergence, not the router's fault: FloatingPointError."""
        logits = self.logits(h)
        if noise is not None:
            logits = logits + noise
        if not bool(torch.isfinite(logits.detach()).all()):
            raise FloatingPointError("training diverged: the gate's logits are no longer finite")
        if self.phi is not None and ctx.state is not None:
            self._share_phi(router, h, ctx.state)
        routing = router.route(RouteInputs(logits, hidden=h, token_ids=token_ids, vocab_freq=vocab_freq), ctx)
        with torch.no_grad():
            check_routing(routing, name, finite=(logits,))
        if ones:  # moe-routing-bench's hard routers: y_t = sum over kept e of expert_e(h_t); the
            # routing itself (its weights decide the chosen expert for NMI) is what gets measured
            return self.combine(h, dataclasses.replace(routing, weight=torch.ones_like(routing.weight))), routing
        return self.combine(h, routing), routing

    def _share_phi(self, router: Router, h: torch.Tensor, state: RouterState) -> None:
        """Put the learned Phi where SoftMoE.route looks for its cached Phi."""
        key = (h.shape[1], self.phi.shape[1], getattr(router, "phi_seed", 0), str(h.device))
        state.extra["soft_moe_phi"] = (key, self.phi)

    def combine(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """<float32>[T, out]: the experts' outputs weighted by the routing."""
        if routing.soft is not None:
            return self._soft(h, routing)
        out = h.new_zeros(h.shape[0], self.out_dim)
        for e, tokens, weight in sparse_groups(routing):
            out = out.index_add(0, tokens, weight[:, None] * self.experts.one(e, h[tokens]))
        return out

    def _soft(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Soft MoE: slot inputs D^T h per sequence, experts on their S slots, combined by C."""
        soft = routing.soft
        e, s = routing.num_experts, soft.slots_per_expert
        d_blocks, c_blocks = soft.blocks(soft.dispatch), soft.blocks(soft.combine)  # [B, n, E*S]
        b = d_blocks.shape[0]
        slots = d_blocks.transpose(1, 2) @ h.view(b, -1, h.shape[1])  # [B, E*S, d]
        per_expert = slots.view(b, e, s, -1).transpose(0, 1).reshape(e, b * s, -1)  # [E, B*S, d]
        y = self.experts.stacked(per_expert).view(e, b, s, -1).transpose(0, 1).reshape(b, e * s, -1)
        return (c_blocks @ y).reshape(h.shape[0], -1)


def competitive_loss(layer: MoELayer, h: torch.Tensor, routing: Routing, target: torch.Tensor) -> torch.Tensor:
    """Jacobs et al. 1991's error for a mixture of competing local experts:
    mean_t -log sum_{kept (t, e)} w_te exp(-||y_t - o_e(h_t)||^2 / 2), so each expert must fit the
    target alone (the blended error lets experts cooperate and does not localise them).
    Sparse routers only (Soft MoE experts see slots, not tokens). A token no expert kept
    contributes -log(exp(-||y_t||^2 / 2)) (its output is 0)."""
    t = h.shape[0]
    logs, tokens = [], []
    for e, tok, weight in sparse_groups(routing):
        err = (layer.experts.one(e, h[tok]) - target[tok]).square().sum(1)
        logs.append(torch.log(weight.clamp_min(1e-30)) - 0.5 * err)
        tokens.append(tok)
    kept = torch.zeros(t, dtype=torch.bool, device=h.device)
    if tokens:
        tok, term = torch.cat(tokens), torch.cat(logs)
        kept[tok] = True
        top = torch.full((t,), -torch.inf, device=h.device).scatter_reduce(0, tok, term.detach(), "amax")
        top = torch.where(kept, top, 0.0)
        total = torch.zeros(t, device=h.device).index_add(0, tok, torch.exp(term - top[tok]))
        per_token = -(top + torch.log(torch.where(kept, total, 1.0)))
    else:
        per_token = torch.zeros(t, device=h.device)
    missing = 0.5 * target.square().sum(1)
    return torch.where(kept, per_token, missing).mean()


def aux_loss(routing: Routing) -> torch.Tensor:
    """Differentiable load-balancing loss E * sum_e f_e P_e (metrics.py's aux_loss; gshard's
    Algorithm 1 counts 1st choices only): f_e are counts (no gradient), P_e = mean_t p_te."""
    e, t = routing.num_experts, routing.num_tokens
    if getattr(routing, "aux_counts", "all") == "first":
        first = routing.choice == 0
        f = torch.bincount(routing.expert_index[first], minlength=e).float() / t
    else:
        f = routing.demand().float() / (routing.top_k * t)
    return e * (f * routing.probs.mean(0)).sum()


def z_loss(routing: Routing) -> torch.Tensor:
    """Differentiable router z-loss mean_t logsumexp(x_t)^2 (ST-MoE)."""
    return (torch.logsumexp(routing.logits, dim=-1) ** 2).mean()


def learns(routing: Routing) -> str | None:
    """How the gate learns through this routing: None if the combine weights carry gradient,
    "fixed" if the router ignores the logits (hash, random, round robin: only the experts
    learn), else the reason the router cannot be trained (its weights are cut from the gate)."""
    weights = routing.soft.combine if routing.soft is not None else routing.weight
    if weights.requires_grad:
        return None
    if not routing.probs.requires_grad:
        return "fixed"
    return "its combine weights carry no gradient to the gate (computed outside autograd)"

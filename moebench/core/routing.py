"""`Routing`: the one type every router returns, so no consumer branches on a router's class.

Shapes follow flaxformer's docstring convention: ``<dtype>[dims]``. T tokens, E experts, k
choices per token, A assignments (token, expert pairs a router asked for before capacity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SoftSlots:
    """Soft MoE's dense slot matrices (Puigcerver et al. 2023), one set of slots per sequence.

    The T tokens are B = T / n sequences of n = sequence_length consecutive tokens (None: one
    sequence of all T tokens, B = 1); each sequence has its own E*S slots, so the batch has
    E*B*S. Row t of both matrices refers to the slots of token t's sequence: viewed as
    [B, n, E*S] (`blocks`) they are the per-sequence matrices, the diagonal blocks of the
    batch's block-diagonal [T, E*B*S] matrices, which are never built.

    dispatch <float32>[T, E*S]: softmax over a sequence's tokens per slot (within each
        sequence each column sums to 1).
    combine  <float32>[T, E*S]: softmax over the slots of the token's sequence (each row sums to 1).
    slots_per_expert: S, per sequence. Slot s of expert e is column e*S + s.
    sequence_length: n, or None for one sequence.
    """

    dispatch: torch.Tensor
    combine: torch.Tensor
    slots_per_expert: int
    sequence_length: int | None = None

    @property
    def num_sequences(self) -> int:
        """B: sequences in the batch."""
        t = self.dispatch.shape[0]
        return 1 if self.sequence_length is None or t == 0 else t // self.sequence_length

    def blocks(self, matrix: torch.Tensor) -> torch.Tensor:
        """<dtype>[B, n, E*S]: ``dispatch`` or ``combine`` (or anything of their shape) per sequence."""
        b = self.num_sequences
        return matrix.view(b, matrix.shape[0] // b, matrix.shape[-1])


@dataclass(frozen=True)
class Routing:
    """A router's decision for one batch.

    token_index  <int64>[A]: token of each assignment.
    expert_index <int64>[A]: expert of each assignment.
    choice       <int64>[A]: 0 for a token's first choice, 1 for its second, ...
                             (expert choice: the token's rank within the expert).
    weight       <float32>[A]: combine weight of each assignment as the router gave it.
    kept         <bool>[A]: the assignment got a capacity slot.
    probs        <float32>[T, E]: router probabilities p over all experts (for losses).
    logits       <float32>[T, E]: the raw router logits x.
    top_k: choices per token the router was asked for (expert choice: mean experts per token).
    capacity: slots per expert, or None when dropless.
    soft: Soft MoE slot matrices, else None.
    aux_counts: what f_e of the aux loss counts (docs/spec.md §4): "all" assignments,
        f_e = d_e/(k·T); or "first" choices only, f_e = #{1st choices of e}/T (GShard's
        Algorithm 1, DeepSpeed top2gating), before capacity either way.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    choice: torch.Tensor
    weight: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    top_k: int
    capacity: int | None
    soft: SoftSlots | None = None
    aux_counts: str = "all"

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    def demand(self) -> torch.Tensor:
        """<int64>[E]: assignments that asked for each expert, before capacity."""
        return torch.bincount(self.expert_index, minlength=self.num_experts)

    def load(self) -> torch.Tensor:
        """<int64>[E]: assignments each expert kept, after capacity."""
        return torch.bincount(self.expert_index[self.kept], minlength=self.num_experts)

    def kept_weight_per_token(self) -> torch.Tensor:
        """<float32>[T]: sum of kept combine weights of each token."""
        out = torch.zeros(self.num_tokens, dtype=torch.float32, device=self.weight.device)
        return out.index_add_(0, self.token_index, torch.where(self.kept, self.weight.float(), 0.0))

    def kept_experts_per_token(self) -> torch.Tensor:
        """<int64>[T]: number of kept assignments of each token."""
        out = torch.zeros(self.num_tokens, dtype=torch.int64, device=self.kept.device)
        return out.index_add_(0, self.token_index, self.kept.long())


@dataclass(frozen=True)
class RouteInputs:
    """One batch as a router sees it.

    logits    <dtype>[T, E]: router logits x = h · W_gate.
    hidden    <dtype>[T, d] or None: hidden states h (noise gates, dispatch).
    token_ids <int64>[T] or None: vocabulary ids (hash routing).
    vocab_freq <float32>[V] or None: frequency of each vocabulary id (balanced hash).
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    vocab_freq: torch.Tensor | None = None


@dataclass
class RouterState:
    """State carried across the batches of a stream.

    bias <float32>[E] or None: the aux-loss-free expert bias (selection only).
    extra: router-specific state (e.g. a hash map built once per stream).
    """

    bias: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RouteContext:
    """Everything about a case a router needs besides the batch.

    top_k: choices per token.  capacity: slots per expert or None (dropless).
    drop_policy: registry key of the drop policy.  generator: the seeded RNG for any
    randomness (noise, random routing, random drops).  state: the stream's RouterState.
    """

    top_k: int
    capacity: int | None
    drop_policy: str = "position"
    generator: torch.Generator | None = None
    state: RouterState | None = None

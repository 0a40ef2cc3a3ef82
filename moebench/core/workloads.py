"""Workloads (docs/spec.md §5): seeded token distributions that yield router inputs on a device.

Each workload is a frozen dataclass of its options, registered by name. ``batch`` returns the
`RouteInputs` of one batch of a stream: logits <dtype>[T, E], hidden <dtype>[T, d] and, for
`tokens`, token ids. What stays fixed across a stream (gate weights, cluster centres, the
embedding table, which experts are popular) is drawn from a *structure* generator seeded by
the case seed alone; per-batch noise from a generator seeded by (seed, batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moebench.core.errors import WorkloadMismatchError
from moebench.core.routing import RouteInputs
from moebench.core.workload_registry import WORKLOADS  # light: the suite validator reads it without torch


@dataclass(frozen=True)
class BatchShape:
    """tokens T, experts E, hidden size d, and where and in what dtype to make tensors."""

    tokens: int
    experts: int
    hidden: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def generator(device: str, seed: int, stream: int) -> torch.Generator:
    """A generator on ``device`` for one random stream of one seed (stream 0: structure)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + stream) % (2**63 - 1))
    return g


def zipf_weights(n: int, s: float, device: str) -> torch.Tensor:
    """<float32>[n]: rank^-s normalised to sum 1 (rank 1 first)."""
    w = torch.arange(1, n + 1, dtype=torch.float32, device=device) ** -s
    return w / w.sum()


def gumbel(shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    u = torch.rand(shape, generator=g, device=device).clamp_(1e-12, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def popularity_logits(pop: torch.Tensor, tokens: int, g: torch.Generator) -> torch.Tensor:
    """<float32>[T, E]: log(pop) + Gumbel noise, so argmax picks expert e with probability pop[e]."""
    return torch.log(pop.clamp_min(1e-30))[None, :] + gumbel((tokens, pop.numel()), g, pop.device)


class Workload:
    """Base of every workload. ``makes``: inputs beyond logits and hidden ("token_ids")."""

    name: ClassVar[str] = ""
    makes: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def batch(self, shape: BatchShape, seed: int, batch_index: int = 0) -> RouteInputs:
        s = generator(shape.device, seed, 0)
        b = generator(shape.device, seed, 1 + batch_index)
        inputs = self.make(shape, s, b, batch_index)
        return RouteInputs(
            logits=inputs.logits.to(shape.dtype),
            hidden=None if inputs.hidden is None else inputs.hidden.to(shape.dtype),
            token_ids=inputs.token_ids,
            vocab_freq=inputs.vocab_freq,
        )

    def make(self, shape: BatchShape, structure: torch.Generator, noise: torch.Generator, batch_index: int) -> RouteInputs:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def gate(shape: BatchShape, structure: torch.Generator) -> torch.Tensor:
        """<float32>[d, E]: a random router gate with unit-norm columns, fixed for the stream.

        Equal column norms make every logit N(0, 1) for h ~ N(0, I): no expert is favoured.
        """
        w = torch.randn(shape.hidden, shape.experts, generator=structure, device=shape.device)
        return w / w.norm(dim=0, keepdim=True)

    @staticmethod
    def noise_hidden(shape: BatchShape, noise: torch.Generator) -> torch.Tensor:
        return torch.randn(shape.tokens, shape.hidden, generator=noise, device=shape.device)

    @staticmethod
    def expert_order(shape: BatchShape, structure: torch.Generator) -> torch.Tensor:
        """<int64>[E]: which expert holds each popularity rank (a seeded permutation)."""
        return torch.randperm(shape.experts, generator=structure, device=shape.device)


def _popular(shape, structure, noise, pop_by_rank: torch.Tensor) -> RouteInputs:
    pop = torch.empty_like(pop_by_rank)
    pop[Workload.expert_order(shape, structure)] = pop_by_rank
    return RouteInputs(logits=popularity_logits(pop, shape.tokens, noise), hidden=Workload.noise_hidden(shape, noise))


def _hot(experts: int, hot: int, fraction: float, device: str) -> torch.Tensor:
    """<float32>[E] by rank: `hot` experts share `fraction` of the traffic, the rest share the remainder."""
    pop = torch.full((experts,), (1 - fraction) / max(experts - hot, 1), device=device)
    pop[:hot] = fraction / hot
    return pop


def _check_hot(hot: int, fraction: float) -> str | None:
    if hot < 1:
        return f"hot must be >= 1, got {hot}"
    if not 0 < fraction <= 1:
        return f"fraction must be in (0, 1], got {fraction}"
    return None


@WORKLOADS.register("uniform")
@dataclass(frozen=True)
class Uniform(Workload):
    """iid hidden h ~ N(0, I) through a random unit-norm gate: logits h·W, near balance."""

    description = "iid hidden states through a random gate: near balance"

    def make(self, shape, structure, noise, batch_index):
        w = self.gate(shape, structure)
        h = self.noise_hidden(shape, noise)
        return RouteInputs(logits=h @ w, hidden=h)


@WORKLOADS.register("zipf")
@dataclass(frozen=True)
class Zipf(Workload):
    """Expert popularity ∝ rank^-s: logits = log(pop) + Gumbel, so top-1 frequencies follow Zipf."""

    s: float = 1.2
    description = "expert popularity proportional to rank^-s"

    def check(self):
        return None if self.s >= 0 else f"s must be >= 0, got {self.s}"

    def make(self, shape, structure, noise, batch_index):
        return _popular(shape, structure, noise, zipf_weights(shape.experts, self.s, shape.device))


@WORKLOADS.register("hot_experts")
@dataclass(frozen=True)
class HotExperts(Workload):
    """`hot` experts draw `fraction` of the top-1 traffic; the rest share the remainder evenly."""

    hot: int = 2
    fraction: float = 0.5
    description = "a few hot experts draw a fixed fraction of the traffic"

    def check(self):
        return _check_hot(self.hot, self.fraction)

    def make(self, shape, structure, noise, batch_index):
        if self.hot >= shape.experts:
            raise WorkloadMismatchError(f"hot_experts: hot={self.hot} needs more than {shape.experts} experts")
        return _popular(shape, structure, noise, _hot(shape.experts, self.hot, self.fraction, shape.device))


@WORKLOADS.register("clustered")
@dataclass(frozen=True)
class Clustered(Workload):
    """Hidden states from a Gaussian mixture (Zipf cluster weights, rank^-s) through a random gate."""

    clusters: int = 8
    s: float = 1.0
    spread: float = 0.5
    description = "hidden states from a Gaussian mixture with Zipf cluster weights"

    def check(self):
        if self.clusters < 1:
            return f"clusters must be >= 1, got {self.clusters}"
        return None if self.spread >= 0 else f"spread must be >= 0, got {self.spread}"

    def make(self, shape, structure, noise, batch_index):
        w = self.gate(shape, structure)
        centres = torch.randn(self.clusters, shape.hidden, generator=structure, device=shape.device) * 2.0
        weights = zipf_weights(self.clusters, self.s, shape.device)
        which = torch.multinomial(weights, shape.tokens, replacement=True, generator=noise)
        h = centres[which] + self.spread * self.noise_hidden(shape, noise)
        return RouteInputs(logits=h @ w, hidden=h)


@WORKLOADS.register("zero_load")
@dataclass(frozen=True)
class ZeroLoad(Workload):
    """Like `uniform`, but `idle` experts get logits 30 below the rest: they never win a top-k slot."""

    idle: int = 2
    description = "some experts never win"

    def check(self):
        return None if self.idle >= 1 else f"idle must be >= 1, got {self.idle}"

    def make(self, shape, structure, noise, batch_index):
        if self.idle >= shape.experts:
            raise WorkloadMismatchError(f"zero_load: idle={self.idle} needs more than {shape.experts} experts")
        inputs = Uniform().make(shape, structure, noise, batch_index)
        dead = self.expert_order(shape, structure)[: self.idle]
        logits = inputs.logits.clone()
        logits[:, dead] = logits.min() - 30.0
        return RouteInputs(logits=logits, hidden=inputs.hidden)


@WORKLOADS.register("collapsed")
@dataclass(frozen=True)
class Collapsed(Workload):
    """Near-identical tokens (one hidden vector + `noise`·N(0, I)): router collapse."""

    noise: float = 0.01
    description = "near-identical tokens: router collapse"

    def check(self):
        return None if self.noise >= 0 else f"noise must be >= 0, got {self.noise}"

    def make(self, shape, structure, noise, batch_index):
        w = self.gate(shape, structure)
        base = torch.randn(1, shape.hidden, generator=structure, device=shape.device)
        h = base + self.noise * self.noise_hidden(shape, noise)
        return RouteInputs(logits=h @ w, hidden=h)


@WORKLOADS.register("rotating_hotspot")
@dataclass(frozen=True)
class RotatingHotspot(Workload):
    """`hot` experts draw `fraction` of the traffic; the hot set moves by `step` experts per batch."""

    hot: int = 2
    fraction: float = 0.5
    step: int = 1
    description = "the hot set moves across the batches of a stream"

    def check(self):
        return _check_hot(self.hot, self.fraction)

    def make(self, shape, structure, noise, batch_index):
        if self.hot >= shape.experts:
            raise WorkloadMismatchError(f"rotating_hotspot: hot={self.hot} needs more than {shape.experts} experts")
        pop = _hot(shape.experts, self.hot, self.fraction, shape.device).roll(batch_index * self.step)
        return RouteInputs(logits=popularity_logits(pop, shape.tokens, noise), hidden=self.noise_hidden(shape, noise))


@WORKLOADS.register("burst")
@dataclass(frozen=True)
class Burst(Workload):
    """Mostly `uniform` batches; with probability `probability` a batch is a burst in which one
    expert draws `fraction` of the traffic (which expert: drawn per burst)."""

    probability: float = 0.25
    fraction: float = 0.9
    description = "occasional extreme batches"

    def check(self):
        if not 0 <= self.probability <= 1:
            return f"probability must be in [0, 1], got {self.probability}"
        return _check_hot(1, self.fraction)

    def make(self, shape, structure, noise, batch_index):
        draw = torch.rand(2, generator=noise, device=shape.device).tolist()
        if draw[0] >= self.probability:
            return Uniform().make(shape, structure, noise, batch_index)
        pop = _hot(shape.experts, 1, self.fraction, shape.device).roll(int(draw[1] * shape.experts))
        return RouteInputs(logits=popularity_logits(pop, shape.tokens, noise), hidden=self.noise_hidden(shape, noise))


@WORKLOADS.register("tokens")
@dataclass(frozen=True)
class Tokens(Workload):
    """Token ids from a Zipf(s) vocabulary of `vocab` ids; hidden = embedding[id] + `noise`·N(0, I);
    logits through a random gate. Supplies token_ids and vocab_freq (what hash routing needs)."""

    vocab: int = 4096
    s: float = 1.1
    noise: float = 0.1
    makes = ("token_ids",)
    description = "Zipf-distributed token ids with embeddings: what hash routing needs"

    def check(self):
        if self.vocab < 1:
            return f"vocab must be >= 1, got {self.vocab}"
        return None if self.noise >= 0 else f"noise must be >= 0, got {self.noise}"

    def make(self, shape, structure, noise, batch_index):
        w = self.gate(shape, structure)
        table = torch.randn(self.vocab, shape.hidden, generator=structure, device=shape.device)
        freq = zipf_weights(self.vocab, self.s, shape.device)
        ids = torch.multinomial(freq, shape.tokens, replacement=True, generator=noise)
        h = table[ids] + self.noise * self.noise_hidden(shape, noise)
        return RouteInputs(logits=h @ w, hidden=h, token_ids=ids, vocab_freq=freq)


create_workload = WORKLOADS.create
workload_classes = WORKLOADS.classes

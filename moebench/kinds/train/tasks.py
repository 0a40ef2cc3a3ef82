"""Training tasks with known structure: what a trained MoE layer should discover.

Each task is a frozen dataclass registered in `TASKS` (options = fields, so a suite's
``train.task.params`` are type-checked like a router's). ``task.build(dim, seed)`` draws the
task's fixed structure (region centres, target maps, a teacher, a vocabulary) from ``seed``;
``instance.sample(n, generator)`` draws n examples from it. Every example carries its ground
truth group (`truth`), against which specialisation (NMI) is measured.

- `local_experts` (Jacobs, Jordan, Nowlan, Hinton 1991): K regions with centres
  c_k = separation * z_k, z_k ~ N(0, I_d); an example picks k uniformly, x = c_k + spread * u,
  u ~ N(0, I_d), and its target is region k's own linear map y = x . A_k / sqrt(d),
  A_k ~ N(0, 1) <float32>[d, o]. Ground truth: k.
- `teacher`: a random teacher MoE. x ~ N(0, I_d); teacher gate W_t ~ N(0, 1) [d, K];
  teacher expert k* = argmax_k x . W_t[:, k]; y = tanh(x . U_k* / sqrt(d)) . V_k* / sqrt(f),
  U ~ N(0, 1) [K, d, f], V ~ N(0, 1) [K, f, o]. Ground truth: k*.
  A random W_t does not split N(0, I) evenly (on d=32, K=8 the largest expert takes 20-35% more
  than the mean). `balanced: true` adds a per-expert logit bias b, k* = argmax_k (x . W_t[:, k] +
  b_k), calibrated at build time so that the teacher's own partition is uniform: on a seeded
  sample of `CALIBRATION_INPUTS` inputs, b_e -= step * (c_e / mean c - 1) (subgradient descent on
  the convex mean_t max_k (s_tk + b_k) - mean_k b_k, whose minimum has equal loads; the step halves
  when MaxVio stops improving) until the sample's MaxVio < `CALIBRATION_MAXVIO`. The calibration
  sample has its own generator, so W_t, U, V are the same as with `balanced: false`.
- `language`: next-token prediction on i.i.d. bigram pairs over a Zipf vocabulary of V ids.
  The current token c has probability (c + 1)^-s / Z (id 0 is the most frequent); its class
  is c mod K; the next token is drawn with probability `mix` from its class's own Zipf
  distribution over a class permutation pi_k (next = pi_k[r] with probability (r + 1)^-s / Z),
  else from the unigram. Ground truth: the class of the current token. Loss: cross-entropy;
  reported as perplexity exp(loss). `floor_perplexity` is exp of the true conditional entropy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from moebench.kinds.train.measures import maxvio
from moebench.kinds.train.task_registry import TASKS  # the built-in tasks register below, on import


@dataclass(frozen=True)
class TaskData:
    """n examples. x <float32>[n, d] (regression) or None; ids <int64>[n] current tokens
    (language) or None; y <float32>[n, o] targets or <int64>[n] next tokens; truth <int64>[n]."""

    x: torch.Tensor | None
    ids: torch.Tensor | None
    y: torch.Tensor
    truth: torch.Tensor

    def to(self, device: str) -> "TaskData":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TaskData(move(self.x), move(self.ids), move(self.y), move(self.truth))

    def __len__(self) -> int:
        return self.truth.shape[0]

    def slice(self, start: int, stop: int) -> "TaskData":
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return TaskData(cut(self.x), cut(self.ids), cut(self.y), cut(self.truth))


class TaskInstance:
    """A task's drawn structure. kind: "regression" (MSE on y) or "language" (cross-entropy).
    groups: number of ground-truth groups.  output_dim: o (regression) or V (language)."""

    kind: ClassVar[str] = "regression"
    groups: int
    output_dim: int
    vocab: int | None = None
    vocab_freq: torch.Tensor | None = None

    def sample(self, n: int, g: torch.Generator) -> TaskData:  # pragma: no cover
        raise NotImplementedError


@TASKS.register("local_experts")
@dataclass(frozen=True)
class LocalExperts:
    """K regions, each with its own linear target map (see the module docstring)."""

    regions: int = 4
    separation: float = 3.0
    spread: float = 0.5
    output_dim: int = 4
    noise: float = 0.0

    def check(self) -> str | None:
        if self.regions < 2 or self.output_dim < 1:
            return f"need regions >= 2 and output_dim >= 1, got {self.regions}, {self.output_dim}"
        if min(self.separation, self.spread, self.noise) < 0:
            return "separation, spread and noise must be >= 0"
        return None

    def build(self, dim: int, seed: int) -> "_LocalExpertsInstance":
        g = torch.Generator().manual_seed(seed)
        centres = self.separation * torch.randn(self.regions, dim, generator=g)
        maps = torch.randn(self.regions, dim, self.output_dim, generator=g)
        return _LocalExpertsInstance(self, centres, maps)


class _LocalExpertsInstance(TaskInstance):
    def __init__(self, task: LocalExperts, centres: torch.Tensor, maps: torch.Tensor):
        self.task, self.centres, self.maps = task, centres, maps  # [K, d], [K, d, o]
        self.groups, self.output_dim = task.regions, task.output_dim

    def sample(self, n: int, g: torch.Generator) -> TaskData:
        k, d = self.centres.shape
        region = torch.randint(0, k, (n,), generator=g)
        x = self.centres[region] + self.task.spread * torch.randn(n, d, generator=g)
        y = torch.bmm(x[:, None, :], self.maps[region])[:, 0] / math.sqrt(d)
        if self.task.noise:
            y = y + self.task.noise * torch.randn(y.shape, generator=g)
        return TaskData(x, None, y, region)


CALIBRATION_INPUTS = 65536  # inputs of the sample a balanced teacher's gate bias is calibrated on
CALIBRATION_MAXVIO = 0.01  # MaxVio of that sample the calibration reaches
BALANCED_MAX_EXPERTS = 256  # a balanced teacher's most experts (256: calibrated in ~1 s)
CALIBRATION_STEPS = 5000  # most bias updates before the calibration gives up (an error)


def _calibration_seed(seed: int) -> int:
    """The calibration sample's own stream: independent of the teacher's W_t, U, V."""
    return (seed * 1_000_003 + 424_242) % (2**62)


def calibrate_bias(gate: torch.Tensor, seed: int, inputs: int = CALIBRATION_INPUTS,
                   target: float = CALIBRATION_MAXVIO, max_steps: int = CALIBRATION_STEPS) -> torch.Tensor:
    """<float32>[K]: a logit bias b such that argmax_k (x . gate[:, k] + b_k) splits a seeded sample
    of ``inputs`` x ~ N(0, I_d) (gate <float32>[d, K]) with MaxVio < ``target``, or < 4 / (mean
    load) where that is larger (module docstring).
    Deterministic per (gate, seed); raises RuntimeError if ``max_steps`` updates do not get there."""
    g = torch.Generator().manual_seed(_calibration_seed(seed))
    scores = torch.randn(inputs, gate.shape[0], generator=g) @ gate  # [n, K]
    experts = gate.shape[1]
    mean = inputs / experts
    target = max(target, 4 / mean)  # loads are integers: with many experts 1% is below one token
    bias = torch.zeros(experts)
    step = 0.5 * float(scores.std())
    best, best_vio, stalled = bias, math.inf, 0
    for _ in range(max_steps):
        load = torch.bincount((scores + bias).argmax(dim=1), minlength=experts).double()
        vio = maxvio(load)
        if vio < best_vio:
            best, best_vio, stalled = bias, vio, 0
        else:
            stalled += 1
            if stalled >= 3:
                step, stalled = step / 2, 0
        if best_vio < target:
            return best
        bias = bias - step * (load / mean - 1).float()
    raise RuntimeError(f"teacher: the balanced gate's calibration reached MaxVio {best_vio:.3g}, "
                       f"not < {target}, in {max_steps} steps")


@functools.lru_cache(maxsize=64)
def _balanced_bias(dim: int, experts: int, seed: int) -> torch.Tensor:
    """The calibrated bias of the teacher gate that build(dim, seed) draws (a gate depends only
    on d, K and the seed; Trainer builds the task once per router and seed)."""
    gate = torch.randn(dim, experts, generator=torch.Generator().manual_seed(seed))
    return calibrate_bias(gate, seed)


@TASKS.register("teacher")
@dataclass(frozen=True)
class Teacher:
    """A random top-1 teacher MoE of `experts` tanh MLPs (see the module docstring). `balanced`
    (default false, so existing suites keep their targets bit for bit): calibrate a gate bias
    that makes the teacher's own partition of the inputs uniform."""

    experts: int = 4
    expert_hidden: int = 16
    output_dim: int = 4
    noise: float = 0.0
    balanced: bool = False

    def check(self) -> str | None:
        if self.experts < 2 or self.expert_hidden < 1 or self.output_dim < 1:
            return "need experts >= 2, expert_hidden >= 1, output_dim >= 1"
        if self.balanced and self.experts > BALANCED_MAX_EXPERTS:
            # the calibration sample holds 65536 inputs: with more experts its loads are too
            # small to calibrate on, and each step costs an argmax over [65536, K]
            return f"balanced: true supports up to {BALANCED_MAX_EXPERTS} experts, got {self.experts}"
        return None if self.noise >= 0 else f"noise must be >= 0, got {self.noise}"

    def build(self, dim: int, seed: int) -> "_TeacherInstance":
        g = torch.Generator().manual_seed(seed)
        gate = torch.randn(dim, self.experts, generator=g)
        u = torch.randn(self.experts, dim, self.expert_hidden, generator=g)
        v = torch.randn(self.experts, self.expert_hidden, self.output_dim, generator=g)
        bias = _balanced_bias(dim, self.experts, seed).clone() if self.balanced else None
        return _TeacherInstance(self, gate, u, v, bias)


class _TeacherInstance(TaskInstance):
    """gate <float32>[d, K], u [K, d, f], v [K, f, o]; bias <float32>[K] (balanced) or None."""

    def __init__(self, task: Teacher, gate: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None = None):
        self.task, self.gate, self.u, self.v, self.bias = task, gate, u, v, bias
        self.groups, self.output_dim = task.experts, task.output_dim

    def expert(self, x: torch.Tensor) -> torch.Tensor:
        """<int64>[n]: the teacher's expert k* of each input x <float32>[n, d]."""
        scores = x @ self.gate
        return (scores if self.bias is None else scores + self.bias).argmax(dim=1)

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y <float32>[n, o], k* <int64>[n]) of the noiseless teacher."""
        d, f = self.u.shape[1], self.u.shape[2]
        k = self.expert(x)
        y = x.new_empty(x.shape[0], self.v.shape[2])
        for e in range(self.u.shape[0]):  # one matmul per teacher expert on its own rows
            rows = (k == e).nonzero().squeeze(1)
            y[rows] = torch.tanh(x[rows] @ self.u[e] / math.sqrt(d)) @ self.v[e] / math.sqrt(f)
        return y, k

    def sample(self, n: int, g: torch.Generator) -> TaskData:
        x = torch.randn(n, self.u.shape[1], generator=g)
        y, k = self.targets(x)
        if self.task.noise:
            y = y + self.task.noise * torch.randn(y.shape, generator=g)
        return TaskData(x, None, y, k)


def zipf(n: int, s: float) -> torch.Tensor:
    """<float64>[n]: (r + 1)^-s / Z for r = 0..n-1."""
    w = torch.arange(1, n + 1, dtype=torch.float64) ** -s
    return w / w.sum()


@TASKS.register("language")
@dataclass(frozen=True)
class Language:
    """Bigram next-token prediction over a Zipf vocabulary with K token classes (module docstring)."""

    vocab: int = 256
    classes: int = 4
    s: float = 1.1
    mix: float = 0.9

    def check(self) -> str | None:
        if self.vocab < 2 or not 2 <= self.classes <= self.vocab:
            return f"need vocab >= 2 and 2 <= classes <= vocab, got vocab={self.vocab}, classes={self.classes}"
        if self.s <= 0 or not 0 <= self.mix <= 1:
            return f"need s > 0 and 0 <= mix <= 1, got s={self.s}, mix={self.mix}"
        return None

    def build(self, dim: int, seed: int) -> "_LanguageInstance":
        g = torch.Generator().manual_seed(seed)
        perms = torch.stack([torch.randperm(self.vocab, generator=g) for _ in range(self.classes)])
        return _LanguageInstance(self, perms)


class _LanguageInstance(TaskInstance):
    kind = "language"

    def __init__(self, task: Language, perms: torch.Tensor):
        self.task, self.perms = task, perms  # perms <int64>[K, V]
        self.groups, self.output_dim, self.vocab = task.classes, task.vocab, task.vocab
        self.unigram = zipf(task.vocab, task.s)  # <float64>[V]
        self.vocab_freq = self.unigram.float()

    def conditional(self) -> torch.Tensor:
        """<float64>[K, V]: P(next | class) = mix * Zipf(pi_k) + (1 - mix) * unigram."""
        k, v = self.perms.shape
        own = torch.zeros(k, v, dtype=torch.float64).scatter_(1, self.perms, self.unigram.expand(k, v).clone())
        return self.task.mix * own + (1 - self.task.mix) * self.unigram

    def floor_perplexity(self) -> float:
        """exp(H(next | current)): the perplexity of the true conditional (no model beats it)."""
        cond = self.conditional()
        p_class = torch.zeros(self.groups, dtype=torch.float64).index_add_(
            0, torch.arange(self.task.vocab) % self.groups, self.unigram)
        h = -(cond * cond.clamp_min(1e-300).log()).sum(1)
        return float(torch.exp((p_class * h).sum()))

    def sample(self, n: int, g: torch.Generator) -> TaskData:
        current = torch.multinomial(self.unigram, n, replacement=True, generator=g)
        cls = current % self.groups
        rank = torch.multinomial(self.unigram, n, replacement=True, generator=g)
        other = torch.multinomial(self.unigram, n, replacement=True, generator=g)
        own = torch.rand(n, generator=g, dtype=torch.float64) < self.task.mix
        nxt = torch.where(own, self.perms[cls, rank], other)
        return TaskData(None, current, nxt, cls)

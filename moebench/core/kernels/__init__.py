"""JIT-compiled CPU fast paths (numba) for token-choice routing, capacity, dispatch and combine.

Each function here returns exactly what the plain-torch code it stands in for returns (same
tensors, bit for bit); `tests/test_fast_paths.py` checks that on adversarial inputs. Which
path runs is a router option (`impl: auto|torch|numba`, see `TokenChoiceRouter`) and an
argument of `dispatch`/`combine`, never an environment variable.

- `topk_select`: the k largest of scores (+ bias) per token, descending, ties broken by the
  lowest expert index (the convention `moebench.routers.base.top_k_experts` gives the torch
  path), and the scores at those experts: bias, selection and gather fused, each row of scores
  read from memory once, parallel over blocks of tokens.
  The scores themselves (softmax/sigmoid) come from torch: a numba exp would differ from
  torch's vectorised one in the last ulp, which changes the weights and, at near-ties, the
  selection; exact equality with the torch path is the contract. Routing.probs is that
  softmax, so it costs nothing extra.
- `keep_position`, `keep_by_score`: capacity under the `position` and `probs` drop policies,
  O(A) passes instead of two sorts of the A = k*T assignments: one serial pass for `position`,
  a radix select for `probs`; a parallel form only with >= 4 threads and much work (each
  parallel loop costs ~50 us to launch).
- `dispatch_rows`: dispatch as a counting pass plus one parallel scatter pass that writes each
  kept row, its token and its weight straight to its expert-contiguous slot, instead of
  nonzero + a stable sort + three gathers (index_select alone took 1.7-3x a copy_ of its
  output, and each torch op after a kernel waits for torch's thread pool to wake up).
- `combine_rows`: combine in one parallel pass over tokens, without the [N, d] temporary of
  `rows * weight[:, None]` and without index_add_ (several times a memcopy on CPU).
The dispatch/combine kernels live in `_numba_dispatch`.
- Decode sizes (`_numba_small`): below PARALLEL_MIN_WORK every kernel has a serial form that
  runs on the calling thread without touching numba's thread count (a parallel launch wakes a
  thread: more than the work at T <= 1024), `assignments` builds a Routing's token, choice and
  kept in one pass (the `position` capacity fused, expert ids bound-checked) and `route_fused`
  runs a whole top-k route after the scores in one call that allocates its own outputs.
- Every kernel that indexes by an expert id bound-checks it in a pass it makes anyway and
  reports it (`ExpertOutOfRange`) before anything is written there: a plugin router's bad ids
  become an `InvalidRouting` row, never an out-of-bounds write.
- `sinkhorn_scale` (`_numba_sinkhorn`): Sinkhorn's whole scaling iteration in one call.

numba is imported on first use, so `import moebench` stays fast; kernels compile on their
first call (cached on disk afterwards). They run on `torch.get_num_threads()` threads, so
moebench's thread pinning applies to them too.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

Impl = Literal["auto", "torch", "numba"]
IMPLS = ("auto", "torch", "numba")

_numba_error: str | None = None
_numba_mod = None


def _load():
    """The kernel module, or None when numba cannot be imported (the reason is kept)."""
    global _numba_mod, _numba_error
    if _numba_mod is None and _numba_error is None:
        try:
            import numba

            if numba.config.THREADING_LAYER == "default" and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
                # Nobody chose a layer (a library user's process: the moebench command sets the
                # omp-first priority with a short GOMP spin, moebench/run/threads.py). numba's own
                # pool, not an OpenMP pool beside torch's spinning at libgomp's default spin
                # count: each hand-over between a torch op and a kernel would wait on it (route
                # phase 10-20x slower on 2 cores). workqueue is not meant for parallel kernels
                # launched from several Python threads at once, which moebench never does.
                numba.config.THREADING_LAYER = "workqueue"
            from moebench.core.kernels import _numba as mod
        except Exception as exc:  # ImportError, or numba refusing this numpy/llvm
            _numba_error = f"{type(exc).__name__}: {exc}"
        else:
            _numba_mod = mod
    return _numba_mod


def available() -> bool:
    """True when numba imports (the kernels themselves compile lazily)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why numba could not be imported, or None."""
    _load()
    return _numba_error


def use_numba(impl: str, *tensors: torch.Tensor, float32: bool = True) -> bool:
    """Whether a fast path runs for these tensors under ``impl``.

    auto: numba when it imports and every tensor is on the CPU (and float32 where ``float32``
    asks it of the floating tensors); torch otherwise. torch: never. numba: always; a tensor
    the kernels cannot take raises ValueError instead of silently running torch.
    """
    if impl == "torch":
        return False
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    problem = None
    for x in tensors:
        if x.device.type != "cpu":
            problem = f"numba kernels run on CPU tensors, got one on {x.device}"
        elif float32 and x.is_floating_point() and x.dtype != torch.float32:
            problem = f"numba kernels take float32, got {x.dtype}"
        if problem:
            break
    if problem is None and not available():
        problem = f"numba is not importable ({_numba_error})"
    if problem is None:
        return True
    if impl == "numba":
        raise ValueError(f"impl='numba': {problem}")
    return False


# Below this many elements a kernel runs on the calling thread alone: waking a second thread
# costs more than it saves (and far more on a busy machine).
PARALLEL_MIN_WORK = 1 << 17


def _kernels(work: int):
    """The kernel module, with numba's thread count set for ``work`` elements of work:
    ``torch.get_num_threads()`` (so moebench's thread pinning applies), or 1 for small work."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"numba is not importable ({_numba_error})")
    import numba

    threads = torch.get_num_threads() if work >= PARALLEL_MIN_WORK else 1
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return mod


def _serial():
    """The kernel module, for a kernel that runs on the calling thread (numba's thread count is
    left as it is: setting it costs ~1.5 us, a tenth of a decode-size route)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"numba is not importable ({_numba_error})")
    return mod


class ExpertOutOfRange(IndexError):
    """Assignments name an expert outside [0, E) (a plugin router's bad ids): found by the
    kernels' bound check before anything is written at such an index."""


def _out_of_range(expert: torch.Tensor, num_experts: int) -> ExpertOutOfRange:
    lo, hi = (int(v) for v in torch.aminmax(expert.reshape(-1)))
    return ExpertOutOfRange(f"expert_index out of range [0, {num_experts}): min {lo}, max {hi}")


_ZEROS: dict[int, np.ndarray] = {}  # the no-bias bias of each E (read only)


def _np(x: torch.Tensor):
    """A numpy view of a CPU tensor (contiguous copy when needed)."""
    return x.detach().contiguous().numpy()


def topk_select(scores: torch.Tensor, k: int, bias: torch.Tensor | None = None, normalize: bool = False):
    """(expert <int64>[T, k], weight <float32>[T, k]) for scores <float32>[T, E].

    expert: the k largest ``scores + bias`` per row, descending, ties -> lowest index first
    (= ``torch.sort(scores + bias, dim=-1, descending=True, stable=True).indices[:, :k]``).
    weight: ``scores.gather(1, expert)`` (the bias selects, it never weighs), and with
    ``normalize`` then ``moebench.routers.base.normalize_weights`` of it. NaN-free input.
    Both are transposed views of rank-major [k, T] storage (``expert.t()`` is contiguous),
    the layout `TokenChoiceRouter.finish` consumes, so it needs no copy.
    """
    t, e = scores.shape
    parallel = t * e >= PARALLEL_MIN_WORK
    mod = _kernels(t * e) if parallel else _serial()
    if not 1 <= k <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {k}")
    expert = torch.empty(k, t, dtype=torch.int64)
    weight = torch.empty(k, t, dtype=torch.float32)
    if t == 0:
        return expert.t(), weight.t()
    has_bias = bias is not None
    if has_bias:
        b = _np(bias.float())
    else:
        b = _ZEROS.get(e)
        if b is None:
            b = _ZEROS[e] = np.zeros(e, np.float32)
    s = _np(scores)
    if k <= 8:  # k SIMD max reductions over packed (score, -index) keys
        fn = mod.topk_select_packed if parallel else mod.topk_select_packed_serial
        fn(s, s.view(np.int32), b, has_bias, k, normalize, expert.numpy(), weight.numpy())
    else:  # one insertion pass per row: fewer operations once k is large
        fn = mod.topk_select_insertion if parallel else mod.topk_select_insertion_serial
        fn(s, b, has_bias, k, normalize, expert.numpy(), weight.numpy())
    return expert.t(), weight.t()


def _parallel_pays(work: int) -> bool:
    """Whether a capacity kernel should run its parallel (two-pass) form: each parallel loop
    costs ~50 us to launch on numba's workqueue, and the serial form is one ~1 ns/element
    pass, so splitting pays only with many threads and much work."""
    return work >= PARALLEL_CAPACITY_MIN_WORK and torch.get_num_threads() >= 4


# Assignments from which the capacity kernels go parallel (with >= 4 threads).
PARALLEL_CAPACITY_MIN_WORK = 1 << 19


def keep_position(expert: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """<bool>[A]: `keep_within_capacity(expert, position_priority(...), capacity, E)` for the
    flat rank-major assignments expert <int64>[A] (priority = index).
    Raises ExpertOutOfRange for an expert outside [0, E) (bound-checked in the kernel's pass)."""
    parallel = _parallel_pays(expert.numel())
    mod = _kernels(expert.numel()) if parallel else _serial()
    kept = torch.empty(expert.numel(), dtype=torch.bool)
    if expert.numel():
        fn = mod.keep_position if parallel else mod.keep_position_serial
        if fn(_np(expert.reshape(-1)), int(capacity), int(num_experts), kept.numpy()):
            raise _out_of_range(expert, num_experts)
    return kept


def keep_by_score(expert: torch.Tensor, score: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """<bool>[A]: `keep_within_capacity(expert, probs_priority(score), capacity, E)`: per expert
    the ``capacity`` highest scores, ties -> lower index. score <float32>[A], NaN-free.
    Raises ExpertOutOfRange for an expert outside [0, E)."""
    parallel = _parallel_pays(expert.numel())
    mod = _kernels(expert.numel()) if parallel else _serial()
    kept = torch.empty(expert.numel(), dtype=torch.bool)
    if expert.numel():
        fn = mod.keep_by_score if parallel else mod.keep_by_score_serial
        if fn(_np(expert.reshape(-1)), _np(score.reshape(-1).float()), int(capacity), int(num_experts), kept.numpy()):
            raise _out_of_range(expert, num_experts)
    return kept


def assignments(expert_kt: torch.Tensor, capacity: int | None, num_experts: int, policy: str,
                weight_kt: torch.Tensor | None = None):
    """(token <int64>[A], choice <int64>[A], kept <bool>[A]) of a token-choice Routing, A = k*T,
    for rank-major experts expert_kt <int64>[k, T] (contiguous): token[j*T + t] = t, choice = j,
    kept = the `position` policy's (``policy`` "position"), the `probs` policy's by weight_kt
    <float32>[k, T] ("probs"), or all (capacity None). One serial pass (the `position`
    capacity fused into it) instead of ~10 torch ops: the decode-size floor.
    Raises ExpertOutOfRange for an expert outside [0, E), before anything indexes with it."""
    mod = _serial()
    from moebench.core.kernels import _numba_small

    a = expert_kt.numel()
    token = torch.empty(a, dtype=torch.int64)
    choice = torch.empty(a, dtype=torch.int64)
    kept = torch.empty(a, dtype=torch.bool)
    parallel = _parallel_pays(a)  # many threads and much work: the parallel capacity kernels
    cap = -1 if capacity is None or policy != "position" or parallel else int(capacity)
    if a and _numba_small.assignments(expert_kt.numpy(), cap, int(num_experts), token.numpy(), choice.numpy(),
                                      kept.numpy()):
        raise _out_of_range(expert_kt, num_experts)
    if capacity is not None and parallel:
        kept = (keep_position(expert_kt, capacity, num_experts) if policy == "position"
                else keep_by_score(expert_kt, weight_kt, capacity, num_experts))
    elif capacity is not None and policy == "probs" and a:
        mod.keep_by_score_serial(expert_kt.numpy().reshape(-1), _np(weight_kt.reshape(-1)), int(capacity),
                                 int(num_experts), kept.numpy())
    return token, choice, kept


def fused_route_pays(scores: torch.Tensor) -> bool:
    """Whether `route_fused` is the faster path for scores <float32>[T, E]: below the size at
    which the selection goes parallel (there the per-call floor is most of a route)."""
    return scores.shape[0] * scores.shape[1] < PARALLEL_MIN_WORK and not _parallel_pays(scores.numel())


def route_fused(scores: torch.Tensor, k: int, bias: torch.Tensor | None, normalize: bool, capacity: int | None,
                policy: str):
    """(expert <int64>[k, T], weight <float32>[k, T], token, choice <int64>[A], kept <bool>[A])
    for scores <float32>[T, E] (CPU, contiguous): `topk_select` then `assignments` (policy
    "position" or "probs", or capacity None), in one serial kernel call whose outputs are
    numpy arrays it allocates: at decode sizes each torch op around the work costs as much as
    the work."""
    _serial()
    from moebench.core.kernels import _numba_small

    t, e = scores.shape
    if not 1 <= k <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {k}")
    has_bias = bias is not None
    if has_bias:
        b = _np(bias.float())
    else:
        b = _ZEROS.get(e)
        if b is None:
            b = _ZEROS[e] = np.zeros(e, np.float32)
    s = scores.detach().numpy()  # weights computed outside autograd (a trained gate needs impl torch)
    out = _numba_small.route_fused(s, s.view(np.int32), b, has_bias, k, normalize,
                                   -1 if capacity is None else int(capacity), policy == "probs", e)
    return tuple(torch.from_numpy(x) for x in out)


def _dispatch_kernels(work: int):
    """`_kernels` (threads set for ``work``), but the dispatch/combine module."""
    _kernels(work)
    from moebench.core.kernels import _numba_dispatch

    return _numba_dispatch


# Same-size integer dtypes: dispatch copies rows (and weights) as bits, so one kernel serves
# every dtype numpy lacks (bfloat16, float8) and copies NaN payloads unchanged.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor):
    """A numpy view of x's elements as same-size integers (strides kept: no copy)."""
    return x.detach().view(_BITS[x.element_size()]).numpy()


def dispatch_rows(kept: torch.Tensor, expert: torch.Tensor, token: torch.Tensor, weight: torch.Tensor,
                  hidden: torch.Tensor, num_experts: int):
    """(rows <dtype>[N, d], token <int64>[N], weight <weight's dtype>[N], counts <int64>[E]) for
    the assignments kept <bool>[A], expert <int64>[A], token <int64>[A], weight [A] and hidden
    <dtype>[T, d] (any strides): the kept assignments sorted stably by expert, i.e. with
    ``picked = kept.nonzero()[sort(expert[kept], stable=True)]``: ``hidden[token[picked]]``,
    ``token[picked]``, ``weight[picked]`` and ``bincount(expert[kept], minlength=E)``.

    Raises IndexError for a kept assignment whose expert is outside [0, E) or token outside
    [0, T) (the torch path raises, or counts it in a longer ``counts``).
    """
    a = expert.numel()
    d = hidden.shape[1]
    mod = _dispatch_kernels(a * max(1, d))
    kept_, expert_ = _np(kept.reshape(-1)), _np(expert.reshape(-1))
    offset, count, bad = mod.dispatch_counts(kept_, expert_, int(num_experts))
    if bad:
        raise IndexError(f"dispatch: {bad} kept assignments have an expert outside [0, {num_experts})")
    n = int(count.sum())
    token_out = torch.empty(n, dtype=token.dtype)
    weight_out = torch.empty(n, dtype=weight.dtype)
    by_bits = not hidden.dtype.is_complex and hidden.element_size() in _BITS  # else index_select below
    rows = torch.empty(n, d if by_bits else 0, dtype=hidden.dtype)
    src = _bits(hidden) if by_bits else np.empty((hidden.shape[0], 0), np.int8)
    dst = _bits(rows) if by_bits else np.empty((n, 0), np.int8)
    bad = mod.dispatch_rows(kept_, expert_, _np(token.reshape(-1)), _bits(weight.reshape(-1).contiguous()), src,
                            offset, token_out.numpy(), _bits(weight_out), dst)
    if bad:
        raise IndexError(f"dispatch: {bad} kept assignments have a token outside [0, {hidden.shape[0]})")
    if not by_bits:
        rows = hidden.index_select(0, token_out)
    return rows, token_out, weight_out, torch.from_numpy(count)


def combine_rows(token_index: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``zeros(T, d).index_add_(0, token_index, rows * weight[:, None])`` for float32 rows
    <float32>[N, d] (any strides), token_index <int64>[N], weight <float32>[N]: <float32>[T, d].

    Raises IndexError for a token outside [0, T).
    """
    mod = _dispatch_kernels(rows.numel())
    out = torch.empty(num_tokens, rows.shape[1], dtype=rows.dtype)
    bad = mod.combine_rows(_np(token_index), _np(weight), rows.detach().numpy(), out.numpy())
    if bad:
        raise IndexError(f"combine: {bad} rows have a token outside [0, {num_tokens})")
    return out



def sinkhorn_scale(kernel: torch.Tensor, tol: float, max_iters: int):
    """(d0 <float64>[T], d1 <float64>[E], iterations) of Sinkhorn's scaling of kernel
    <float32|float64>[T, E] (CPU, contiguous, T >= 1): what the torch loop of
    `moebench.routers.sinkhorn.sinkhorn_scaling` computes, in one kernel call
    (`_numba_sinkhorn`; float64 sums in another order: equal to ~1e-15 relative)."""
    t, e = kernel.shape
    parallel = t * e >= PARALLEL_MIN_WORK
    _kernels(t * e) if parallel else _serial()
    from moebench.core.kernels import _numba_sinkhorn

    d0 = torch.empty(t, dtype=torch.float64)
    d1 = torch.empty(e, dtype=torch.float64)
    fn = _numba_sinkhorn.sinkhorn_iterate if parallel else _numba_sinkhorn.sinkhorn_iterate_serial
    iters = fn(_np(kernel), float(tol), int(max_iters), d0.numpy(), d1.numpy())
    return d0, d1, int(iters)


def expert_choice_pays(num_tokens: int) -> bool:
    """Whether `expert_choice_select` beats a torch.topk per expert at T = num_tokens (CPU):
    from the size where it samples the threshold and reads probs once (below it the exact
    radix path and torch.topk are level, and the per-call cost of torch is lower)."""
    from moebench.core.kernels import _numba_expert_choice as mod

    return num_tokens >= mod.SAMPLED_MIN_TOKENS


def expert_choice_select(probs: torch.Tensor, capacity: int):
    """(token <int64>[E, C], weight <float32>[E, C]) for probs <float32>[T, E] (CPU), C =
    ``capacity`` in [1, T]: per expert e the C tokens with the highest probs[t, e], descending,
    ties to the lower token, and those values (= ``torch.sort(probs.t(), dim=1, descending=True,
    stable=True)`` cut to C columns). A radix select per expert (`_numba_expert_choice`): O(T)
    per expert where a top-k over T is O(T + C log C), and the [T, E] probs are read row-major,
    so no [E, T] copy is made."""
    t, e = probs.shape
    if not 1 <= capacity <= t:
        raise ValueError(f"capacity must be in [1, T={t}], got {capacity}")
    parallel = t * e >= PARALLEL_MIN_WORK
    _kernels(t * e) if parallel else _serial()
    from moebench.core.kernels import _numba_expert_choice as mod

    p = _np(probs)
    token = torch.empty(e, capacity, dtype=torch.int64)
    weight = torch.empty(e, capacity, dtype=torch.float32)
    threads = torch.get_num_threads() if parallel else 1
    # experts per task: adjacent columns share cache lines (16 float32 per 64-byte line), and
    # enough tasks to keep every thread busy
    group = max(1, min(16, -(-e // threads)))
    # bins of the exact path's first pass: ~T/8 per expert (a histogram near T's size costs
    # more to clear and scan than the pass itself), at most 2^11
    first_bits = max(4, min(mod.LEVEL_BITS, t.bit_length() - 3))
    fn = mod.expert_choice_select if parallel else mod.expert_choice_select_serial
    fn(p.view(np.int32), int(capacity), group, first_bits, token.numpy(), weight.numpy().view(np.int32))
    return token, weight

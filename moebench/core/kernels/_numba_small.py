"""Serial numba kernels for the per-call floor (imported lazily, with `moebench.core.kernels._numba`).

At decode sizes (T = 1..1024) a route's work is microseconds, so what it costs is the number of
calls around the work: each torch op (arange, expand, a copying reshape) and each parallel kernel
launch (a thread wake-up) costs about as much as the work itself. `assignments` builds every
per-assignment tensor of a token-choice Routing but the weights in one pass on the calling
thread, with the `position` capacity pass fused into it and the experts bound-checked.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moebench.core.kernels._numba import _insertion_rows, _packed_rows, keep_by_score_serial

_OPTS = dict(cache=True, nogil=True)


@njit(**_OPTS)
def assignments(expert, capacity, num_experts, token, choice, kept):
    """For rank-major experts <i64>[k, T] write, at a = j*T + t: token[a] = t, choice[a] = j and
    kept[a] = (capacity < 0: True; else fewer than ``capacity`` earlier assignments went to
    expert[j, t], i.e. the `position` policy). Returns the number of experts outside [0, E):
    those are not kept and index nothing (a plugin's bad ids never write out of bounds)."""
    k, t_total = expert.shape
    seen = np.zeros(num_experts, np.int64)
    bad = 0
    a = 0
    for j in range(k):
        for t in range(t_total):
            e = expert[j, t]
            token[a] = t
            choice[a] = j
            if e < 0 or e >= num_experts:
                bad += 1
                kept[a] = False
            elif capacity < 0:
                kept[a] = True
            else:
                kept[a] = seen[e] < capacity
                seen[e] += 1
            a += 1
    return bad


@njit(**_OPTS)
def route_fused(scores, bits, bias, has_bias, k, normalize, capacity, by_score, num_experts):
    """A whole token-choice route after the scores, on the calling thread: the selection of
    `topk_select_packed` (k <= 8) or `topk_select_insertion`, then `assignments`, then for
    ``by_score`` the `probs` policy's capacity (`keep_by_score_serial`) by the weights.
    scores <f32>[T, E] (bits: the same as int32), capacity < 0: dropless. Returns numpy arrays
    (allocated here: no torch op per output) expert, weight <[k, T]>, token, choice, kept <[k*T]>."""
    t_total, e_total = scores.shape
    expert = np.empty((k, t_total), np.int64)
    weight = np.empty((k, t_total), np.float32)
    if k <= 8:
        _packed_rows(scores, bits, bias, has_bias, k, normalize, expert, weight, 0, t_total,
                     np.empty(e_total, np.float32), np.empty(e_total, np.int64))
    else:
        _insertion_rows(scores, bias, has_bias, k, normalize, expert, weight, 0, t_total,
                        np.empty(k, np.float32), np.empty(k, np.int64))
    a = k * t_total
    token = np.empty(a, np.int64)
    choice = np.empty(a, np.int64)
    kept = np.empty(a, np.bool_)
    assignments(expert, -1 if by_score else capacity, num_experts, token, choice, kept)
    if by_score and capacity >= 0 and a:
        keep_by_score_serial(expert.reshape(a), weight.reshape(a), capacity, num_experts, kept)
    return expert, weight, token, choice, kept

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

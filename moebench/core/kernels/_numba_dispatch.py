"""numba kernels for dispatch and combine (imported lazily, with `moebench.core.kernels._numba`).

Both phases are memory-bound; what they cost beyond touching their bytes is per-row work and
serial passes, so each does a single parallel pass over the data after a cheap index pass.
Outputs are allocated by the caller (torch), so they pay the same first-touch page faults as
any other fresh torch tensor. Exact: rows are copied bit for bit (any dtype, as same-size
integers), and combine adds the same float32 products in the same order as the torch path.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Assignments per block of the dispatch counting and scatter passes: small enough that a few
# thousand tokens already give every thread a block, big enough that the per-block table of
# E offsets stays cheap to build.
DISPATCH_BLOCK = 2048

_OPTS = {"cache": True, "nogil": True}

# In a parallel=True function every numpy array expression (np.zeros, np.full, .sum(), .copy(),
# slice assignment) becomes a parallel region of its own, each launch ~40 us on 2 threads: as
# much as the counting pass over 8K assignments. So these kernels allocate with np.empty and
# fill, sum and copy in explicit loops, leaving one parallel region per prange.


@njit(parallel=True, **_OPTS)
def dispatch_counts(kept, expert, num_experts):
    """Counting pass of dispatch over the assignments (index order) with kept[a].

    Returns (offset <i64>[B, E], count <i64>[E], bad): offset[b, e] = where block b's first row
    of expert e goes (its expert's start plus the rows of e in blocks before b); count[e] =
    rows of expert e; bad = kept assignments whose expert is outside [0, E) (then the rest is
    meaningless and the caller raises).
    """
    a_total = expert.size
    nblocks = max(1, (a_total + DISPATCH_BLOCK - 1) // DISPATCH_BLOCK)
    offset = np.empty((nblocks, num_experts), np.int64)
    bad = np.empty(nblocks, np.int64)
    for b in prange(nblocks):
        row = offset[b]
        for e in range(num_experts):
            row[e] = 0
        nbad = 0
        lo = b * DISPATCH_BLOCK
        hi = min(a_total, lo + DISPATCH_BLOCK)
        for a in range(lo, hi):
            if kept[a]:
                e = expert[a]
                if e < 0 or e >= num_experts:
                    nbad += 1
                else:
                    row[e] += 1
        bad[b] = nbad
    count = np.empty(num_experts, np.int64)
    start = 0
    for e in range(num_experts):  # exclusive scan over (expert, block): expert-major slots
        n = 0
        for b in range(nblocks):
            c = offset[b, e]
            offset[b, e] = start + n
            n += c
        count[e] = n
        start += n
    total_bad = 0
    for b in range(nblocks):
        total_bad += bad[b]
    return offset, count, total_bad


@njit(parallel=True, **_OPTS)
def dispatch_rows(kept, expert, token, weight, hidden, offset, token_out, weight_out, rows_out):
    """Scatter pass of dispatch: each kept assignment a, in index order within its expert, to
    row p = its slot in the expert-contiguous order: token_out[p] = token[a], weight_out[p] =
    weight[a], rows_out[p, :] = hidden[token[a], :]. ``offset`` from `dispatch_counts`.

    One pass, blocks in parallel: assignments are rank-major, so a block reads hidden rows in
    token order and writes one short run per expert. Returns the number of kept assignments
    whose token is outside [0, T) (their rows are left unwritten; the caller raises).
    """
    a_total = expert.size
    t_total, d = hidden.shape
    nblocks, num_experts = offset.shape
    bad = np.empty(nblocks, np.int64)
    for b in prange(nblocks):
        pos = np.empty(num_experts, np.int64)
        for e in range(num_experts):
            pos[e] = offset[b, e]
        nbad = 0
        lo = b * DISPATCH_BLOCK
        hi = min(a_total, lo + DISPATCH_BLOCK)
        for a in range(lo, hi):
            if kept[a]:
                e = expert[a]
                p = pos[e]
                pos[e] = p + 1
                t = token[a]
                token_out[p] = t
                weight_out[p] = weight[a]
                if t < 0 or t >= t_total:
                    nbad += 1
                    continue
                for c in range(d):
                    rows_out[p, c] = hidden[t, c]
        bad[b] = nbad
    total_bad = 0
    for b in range(nblocks):
        total_bad += bad[b]
    return total_bad


@njit(parallel=True, **_OPTS)
def combine_rows(token_index, weight, rows, out):
    """out[t, :] = 0 + weight[r] * rows[r, :] summed over the rows r of token t in ascending r
    (zeros for a token with none): what ``zeros(T, d).index_add_(0, token_index, rows *
    weight[:, None])`` computes, operation for operation, in float32.

    The rows of each token are found through a linked list (head[t] = its first row, nxt[r] =
    the next row of r's token) built in one serial backward pass: no prefix sum, and about 0.1
    ms at N = 131K where a counting sort's three serial passes took 0.7 ms. Then tokens in
    parallel, each output row written once. Returns the number of rows whose token is outside
    [0, T) (then nothing is written; the caller raises).
    """
    n, d = rows.shape
    t_total = out.shape[0]
    head = np.empty(t_total, np.int64)
    for t in range(t_total):
        head[t] = -1
    nxt = np.empty(n, np.int64)
    bad = 0
    for r in range(n - 1, -1, -1):
        t = token_index[r]
        if t < 0 or t >= t_total:
            bad += 1
            continue
        nxt[r] = head[t]
        head[t] = r
    if bad:
        return bad
    zero = np.float32(0.0)
    for t in prange(t_total):
        r = head[t]
        if r < 0:
            for c in range(d):
                out[t, c] = zero
            continue
        w = weight[r]
        for c in range(d):
            out[t, c] = zero + rows[r, c] * w  # 0 + x, as index_add_ into zeros: -0.0 -> +0.0
        r = nxt[r]
        while r >= 0:
            w = weight[r]
            for c in range(d):
                out[t, c] += rows[r, c] * w
            r = nxt[r]
    return 0

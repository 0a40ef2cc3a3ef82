"""numba kernels behind `moebench.core.kernels` (imported lazily: only when a fast path runs).

Every kernel works on numpy views of CPU tensors and writes into caller-allocated outputs.
Each is exact: it computes the same floats, in the same order, as the plain-torch code it
replaces (see the docstrings of `moebench.core.kernels` for the contracts).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Tokens per parallel work item of the selection kernel, and assignments per block of the
# capacity/dispatch counting passes. Big enough to amortise the per-block bookkeeping, small
# enough to give every thread several blocks.
TOKEN_BLOCK = 2048
ASSIGN_BLOCK = 8192

_OPTS = dict(cache=True, nogil=True)

_NEG_ZERO_BITS = np.int32(-2147483648)  # 0x80000000, the bits of -0.0
_GONE = np.int64(-9223372036854775808)  # below every packed key


_TINY = np.float32(1e-20)


@njit(**_OPTS)
def _normalize_column(weight, t):
    """weight[:, t] /= max(sum, 1e-20), the sum taken in rank order in float32: exactly
    `moebench.routers.base.normalize_weights` (the torch path), operation for operation."""
    total = weight[0, t]
    for j in range(1, weight.shape[0]):
        total += weight[j, t]
    total = max(total, _TINY)
    for j in range(weight.shape[0]):
        weight[j, t] = weight[j, t] / total


@njit(inline="always", **_OPTS)
def _packed_rows(scores, bits, bias, has_bias, k, normalize, expert, weight, lo, hi, buf, packed):
    """Rows lo..hi of `topk_select_packed` (buf <f32>[E], packed <i64>[E]: scratch)."""
    e_total = scores.shape[1]
    last = np.int64(e_total - 1)
    biased = buf.view(np.int32)
    for t in range(lo, hi):
        if has_bias:
            for e in range(e_total):
                buf[e] = scores[t, e] + bias[e]
            for e in range(e_total):
                i = biased[e]
                key = (i ^ ((i >> np.int32(31)) & np.int32(0x7FFFFFFF))) + np.int32(i == _NEG_ZERO_BITS)
                packed[e] = (np.int64(key) << np.int64(32)) | (last - e)
        else:
            for e in range(e_total):
                i = bits[t, e]
                key = (i ^ ((i >> np.int32(31)) & np.int32(0x7FFFFFFF))) + np.int32(i == _NEG_ZERO_BITS)
                packed[e] = (np.int64(key) << np.int64(32)) | (last - e)
        for j in range(k):
            best = _GONE
            for e in range(e_total):
                best = max(best, packed[e])
            first = last - (best & np.int64(0xFFFFFFFF))
            packed[first] = _GONE
            expert[j, t] = first
            weight[j, t] = scores[t, first]
        if normalize:
            _normalize_column(weight, t)


@njit(parallel=True, **_OPTS)
def topk_select_packed(scores, bits, bias, has_bias, k, normalize, expert, weight):
    """Per row of scores <f32>[T, E]: the k largest (scores + bias), descending, ties -> lowest
    index first. Writes expert <i64>[k, T] and weight <f32>[k, T] = scores at those experts,
    rank-major (the layout capacity and Routing consume); with ``normalize``, each token's k
    weights divided by their sum (see `_normalize_column`). ``bits`` is ``scores`` as int32.

    Each score becomes one int64 whose order is (score, -index): the float's bits turned into
    an order-preserving int32 (-0.0 folded into +0.0, so keys are equal exactly when the floats
    compare equal) in the high half, E - 1 - index in the low half. Then k rounds of one SIMD
    max reduction each, striking out each winner. For few picks (k <= 8).
    """
    t_total, e_total = scores.shape
    nblocks = (t_total + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    for b in prange(nblocks):
        buf = np.empty(e_total, np.float32)
        packed = np.empty(e_total, np.int64)
        lo = b * TOKEN_BLOCK
        _packed_rows(scores, bits, bias, has_bias, k, normalize, expert, weight, lo, min(t_total, lo + TOKEN_BLOCK),
                     buf, packed)


@njit(**_OPTS)
def topk_select_packed_serial(scores, bits, bias, has_bias, k, normalize, expert, weight):
    """`topk_select_packed` on the calling thread: no parallel launch (small batches)."""
    e_total = scores.shape[1]
    _packed_rows(scores, bits, bias, has_bias, k, normalize, expert, weight, 0, scores.shape[0],
                 np.empty(e_total, np.float32), np.empty(e_total, np.int64))


@njit(inline="always", **_OPTS)
def _insertion_rows(scores, bias, has_bias, k, normalize, expert, weight, lo, hi, vals, idx):
    """Rows lo..hi of `topk_select_insertion` (vals <f32>[k], idx <i64>[k]: scratch)."""
    e_total = scores.shape[1]
    for t in range(lo, hi):
        for e in range(k):  # the first k fill the list, insertion-sorted
            v = scores[t, e] + bias[e] if has_bias else scores[t, e]
            j = e
            while j > 0 and v > vals[j - 1]:
                vals[j] = vals[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            vals[j] = v
            idx[j] = e
        last = vals[k - 1]
        for e in range(k, e_total):
            v = scores[t, e] + bias[e] if has_bias else scores[t, e]
            if v > last:
                j = k - 1
                while j > 0 and v > vals[j - 1]:
                    vals[j] = vals[j - 1]
                    idx[j] = idx[j - 1]
                    j -= 1
                vals[j] = v
                idx[j] = e
                last = vals[k - 1]
        for j in range(k):
            expert[j, t] = idx[j]
            weight[j, t] = scores[t, idx[j]]
        if normalize:
            _normalize_column(weight, t)


@njit(parallel=True, **_OPTS)
def topk_select_insertion(scores, bias, has_bias, k, normalize, expert, weight):
    """What `topk_select_packed` computes, by one insertion pass over E per row (strict > keeps
    the earlier expert ahead on ties). For many picks (k > 8)."""
    t_total = scores.shape[0]
    nblocks = (t_total + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    for b in prange(nblocks):
        lo = b * TOKEN_BLOCK
        _insertion_rows(scores, bias, has_bias, k, normalize, expert, weight, lo, min(t_total, lo + TOKEN_BLOCK),
                        np.empty(k, np.float32), np.empty(k, np.int64))


@njit(**_OPTS)
def topk_select_insertion_serial(scores, bias, has_bias, k, normalize, expert, weight):
    """`topk_select_insertion` on the calling thread (small batches)."""
    _insertion_rows(scores, bias, has_bias, k, normalize, expert, weight, 0, scores.shape[0],
                    np.empty(k, np.float32), np.empty(k, np.int64))


@njit(parallel=True, **_OPTS)
def _block_offsets(expert, select, num_experts):
    """Counting pass of the capacity and dispatch kernels, over blocks of ASSIGN_BLOCK
    assignments (in index order), counting the assignments a with select[a].

    Returns (offset <i64>[B, E], count <i64>[E], bad): offset[b, e] = selected assignments of
    expert e in the blocks before b; count[e] = all of them; bad = assignments whose expert is
    outside [0, E) (then offset and count are not to be used: nothing was written out of bounds).
    """
    a_total = expert.size
    nblocks = max(1, (a_total + ASSIGN_BLOCK - 1) // ASSIGN_BLOCK)
    offset = np.zeros((nblocks, num_experts), np.int64)
    bad_in = np.zeros(nblocks, np.int64)
    for b in prange(nblocks):
        lo = b * ASSIGN_BLOCK
        hi = min(a_total, lo + ASSIGN_BLOCK)
        for a in range(lo, hi):
            e = expert[a]
            if e < 0 or e >= num_experts:  # a plugin's bad id: counted, never written
                bad_in[b] += 1
            elif select[a]:
                offset[b, e] += 1
    bad = bad_in.sum()
    count = np.zeros(num_experts, np.int64)
    for b in range(nblocks):
        for e in range(num_experts):
            c = offset[b, e]
            offset[b, e] = count[e]
            count[e] += c
    return offset, count, bad


@njit(parallel=True, **_OPTS)
def keep_position(expert, capacity, num_experts, kept):
    """kept[a] = fewer than `capacity` earlier assignments (a' < a) went to expert[a].
    Returns the number of experts outside [0, E) (then kept is not written)."""
    a_total = expert.size
    offset, _, bad = _block_offsets(expert, np.ones(a_total, np.bool_), num_experts)
    if bad:
        return bad
    for b in prange(offset.shape[0]):
        seen = offset[b].copy()
        lo = b * ASSIGN_BLOCK
        hi = min(a_total, lo + ASSIGN_BLOCK)
        for a in range(lo, hi):
            e = expert[a]
            kept[a] = seen[e] < capacity
            seen[e] += 1
    return 0


@njit(parallel=True, **_OPTS)
def _bucket(expert, select, num_experts):
    """Stable counting sort of the assignments a with select[a] by expert.

    Returns (order <i64>[N], start <i64>[E], count <i64>[E]); within an expert, ascending a.
    """
    a_total = expert.size
    offset, count, _ = _block_offsets(expert, select, num_experts)  # ids checked by the caller
    start = np.zeros(num_experts, np.int64)
    for e in range(1, num_experts):
        start[e] = start[e - 1] + count[e - 1]
    order = np.empty(count.sum(), np.int64)
    for b in prange(offset.shape[0]):
        pos = offset[b] + start
        lo = b * ASSIGN_BLOCK
        hi = min(a_total, lo + ASSIGN_BLOCK)
        for a in range(lo, hi):
            if select[a]:
                e = expert[a]
                order[pos[e]] = a
                pos[e] += 1
    return order, start, count


@njit(parallel=True, **_OPTS)
def keep_by_score(expert, score, capacity, num_experts, kept):
    """kept[a] = a is among the `capacity` best assignments of expert[a], best = higher score,
    ties -> lower a (the `probs` policy's stable rank, served in that order).

    Experts within capacity keep everything; only the assignments of overloaded experts are
    bucketed, and each overloaded expert finds its capacity-th best score by a partition.
    Returns the number of experts outside [0, E) (then kept is not written).
    """
    a_total = expert.size
    _, count, bad = _block_offsets(expert, np.ones(a_total, np.bool_), num_experts)
    if bad:
        return bad
    over = count > capacity
    for a in prange(a_total):
        kept[a] = not over[expert[a]]
    if not over.any():
        return 0
    order, start, count = _bucket(expert, over[expert], num_experts)
    for e in prange(num_experts):
        _keep_best(order[start[e]:start[e] + count[e]], score, capacity, kept)
    return 0


@njit(**_OPTS)
def _keep_best(members, score, capacity, kept):
    """Set kept[a] for the `capacity` best of the assignments ``members`` <i64>[n] (ascending
    a) by score, ties -> lower a; the rest are left as they are (False)."""
    n = members.size
    if n == 0 or capacity <= 0:
        return
    vals = np.empty(n, np.float32)
    for i in range(n):
        vals[i] = score[members[i]]
    threshold = np.partition(vals, n - capacity)[n - capacity]  # the capacity-th largest
    above = 0
    for i in range(n):
        if vals[i] > threshold:
            above += 1
    ties_left = capacity - above  # ties at the threshold are served in position order
    for i in range(n):
        v = vals[i]
        if v > threshold:
            kept[members[i]] = True
        elif v == threshold and ties_left > 0:
            kept[members[i]] = True
            ties_left -= 1


@njit(**_OPTS)
def keep_position_serial(expert, capacity, num_experts, kept):
    """`keep_position` in one pass on the calling thread (no launch cost: ~1 ns/assignment).
    Returns the number of experts outside [0, E): those are not kept and never index anything."""
    seen = np.zeros(num_experts, np.int64)
    bad = 0
    for a in range(expert.size):
        e = expert[a]
        if e < 0 or e >= num_experts:  # one compare, predicted not taken: the bound check is free
            kept[a] = False
            bad += 1
            continue
        kept[a] = seen[e] < capacity
        seen[e] += 1
    return bad


# Bins of the radix pass of `keep_by_score_serial`: the top bits of an order-preserving key.
SCORE_BIN_BITS = 12


@njit(**_OPTS)
def _score_bin(bits):
    """The bin of a float32 (given as its int32 bits): the top SCORE_BIN_BITS of an unsigned
    key that orders like the float (-0.0 folded into +0.0), so equal floats share a bin and a
    higher bin holds only higher scores."""
    key = (bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))) + np.int32(bits == _NEG_ZERO_BITS)
    return (np.int64(key) + np.int64(2147483648)) >> np.int64(32 - SCORE_BIN_BITS)


@njit(**_OPTS)
def keep_by_score_serial(expert, score, capacity, num_experts, kept):
    """`keep_by_score` on the calling thread, by a radix select instead of full buckets.

    Count per expert; experts within capacity keep everything. For each overloaded expert, a
    histogram of its scores' bins gives the bin holding its capacity-th best score: higher
    bins are kept whole, lower ones dropped, and only the assignments in that one bin are
    bucketed (in index order) and partitioned for the exact threshold and ties. Experts within
    capacity share one extra histogram row whose cut is below every bin, so the passes over
    the assignments have no branch on whether an expert is overloaded (it would mispredict).
    """
    a_total = expert.size
    count = np.zeros(num_experts, np.int64)
    bad = 0
    for a in range(a_total):
        e = expert[a]
        if e < 0 or e >= num_experts:
            bad += 1
        else:
            count[e] += 1
    if bad:
        return bad  # kept is not written
    n_over = 0
    for e in range(num_experts):
        n_over += count[e] > capacity
    if n_over == 0:
        kept[:] = True
        return 0
    slot = np.full(num_experts, n_over, np.int64)  # histogram row; n_over = the shared row
    r = 0
    for e in range(num_experts):
        if count[e] > capacity:
            slot[e] = r
            r += 1
    bins = 1 << SCORE_BIN_BITS
    hist = np.zeros((n_over + 1, bins), np.int64)
    bits = score.view(np.int32)
    for a in range(a_total):
        hist[slot[expert[a]], _score_bin(bits[a])] += 1
    cut = np.full(n_over + 1, -1, np.int64)  # the bin of each overloaded expert's capacity-th best
    start = np.zeros(n_over + 1, np.int64)  # its bucket of assignments in the cut bin
    for r in range(n_over):
        b = bins - 1
        above = 0
        if capacity <= 0:
            b = bins  # nothing is kept
        else:
            while b > 0 and above + hist[r, b] < capacity:
                above += hist[r, b]
                b -= 1
        cut[r] = b
        start[r + 1] = start[r] + (hist[r, b] if b < bins else 0)
    members = np.empty(start[n_over], np.int64)
    fill = start[:n_over].copy()
    for a in range(a_total):
        r = slot[expert[a]]
        b = _score_bin(bits[a])
        kept[a] = b > cut[r]
        if b == cut[r]:  # rare: only the cut bins
            members[fill[r]] = a
            fill[r] += 1
    for e in range(num_experts):
        r = slot[e]
        if r < n_over and cut[r] < bins:
            above = count[e] - (start[r + 1] - start[r])
            for b in range(cut[r]):
                above -= hist[r, b]
            _keep_best(members[start[r]:start[r + 1]], score, capacity - above, kept)
    return 0

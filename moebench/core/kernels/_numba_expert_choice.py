"""numba kernel behind `moebench.core.kernels.expert_choice_select` (Expert Choice's selection).

Each expert takes the C highest of its column p[:, e] of probs <float32>[T, E], in descending
order, ties to the lower token. A full top-k over T per expert costs O(T + C log C) comparisons
and reads a column (one cache line per token) or needs an [E, T] copy; here each expert's
selection is a radix select on an order-preserving 32-bit key, O(T) whatever the data:

1. passes over the rows of a group of experts (adjacent columns: each row's slice is read
   from one cache line) find the bits below the prefix all of an expert's keys share, then
   build a histogram of each expert's keys on the highest of those bits;
2. the bin holding an expert's C-th best key splits its tokens into sure (higher bins), the
   candidates (that bin) and the rest; a second pass collects the first two in token order;
3. the candidates are split again on the next bits (a few, usually) until what is left are
   equal keys, of which the first in token order are taken;
4. the C chosen are sorted by key, stably (an LSD radix sort, or insertion for few): equal keys
   were collected in token order, so ties come out lower token first.

Groups of experts run in parallel (`prange`); each expert's result depends only on its column,
so the thread count never changes it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True)
_NEG_ZERO = np.int64(-2147483648)  # bits of -0.0 as int32
_ALL = np.int64(4294967295)  # 2^32 - 1
LEVEL_BITS = 11  # bits per refinement level and per radix-sort pass
FEW = 48  # at most this many chosen: insertion sort


@njit(inline="always", **_OPTS)
def _descending_key(bits):
    """<int64> in [0, 2^32) that orders float32 values (given as int32 bits) descending: a
    smaller key is a larger value; -0.0 and +0.0 share a key; NaN sorts before +inf."""
    b = np.int64(bits)
    if b == _NEG_ZERO:
        b = np.int64(0)
    up = (b ^ ((b >> 31) & np.int64(0x7FFFFFFF))) + np.int64(2147483648)
    return _ALL - up


@njit(inline="always", **_OPTS)
def _bits_of(key):
    """<int32> float32 bits of a `_descending_key` (-0.0 comes back as +0.0): so the chosen
    values need no second, random-access read of the probs."""
    s = (_ALL - key) - np.int64(2147483648)
    if s < 0:
        s = s ^ np.int64(0x7FFFFFFF)
    return np.int32(s)


@njit(**_OPTS)
def _spans(bits, e0, g, first_bits):
    """(shift <int64>[g], mask <int64>[g]): per expert e0..e0+g, the first pass's bin of a key
    is (key >> shift) & mask: the ``first_bits`` bits below the prefix all its keys share
    (probabilities share their sign and most exponent bits, so the top bits would put most
    tokens in one bin). One pass for the smallest and largest key."""
    lo = np.full(g, _ALL, np.int64)
    hi = np.zeros(g, np.int64)
    for t in range(bits.shape[0]):
        for j in range(g):
            k = _descending_key(bits[t, e0 + j])
            lo[j] = min(lo[j], k)
            hi[j] = max(hi[j], k)
    shift = np.empty(g, np.int64)
    mask = np.empty(g, np.int64)
    for j in range(g):
        differ = lo[j] ^ hi[j]
        top = 0  # bits below the shared prefix
        while differ >> top:
            top += 1
        shift[j] = max(top - first_bits, 0)
        mask[j] = (np.int64(1) << np.int64(top - shift[j])) - 1
    return shift, mask


@njit(**_OPTS)
def _first_bins(bits, e0, g, shift, mask, nbins):
    """<int64>[g, nbins]: per expert e0..e0+g, the histogram of its keys' first-pass bins."""
    hist = np.zeros((g, nbins), np.int64)
    for t in range(bits.shape[0]):
        for j in range(g):
            hist[j, (_descending_key(bits[t, e0 + j]) >> shift[j]) & mask[j]] += 1
    return hist


@njit(**_OPTS)
def _cut(hist_row, need):
    """(bin, count before it): the bin holding the need-th smallest key (need >= 1)."""
    acc = np.int64(0)
    b = 0
    while acc + hist_row[b] < need:
        acc += hist_row[b]
        b += 1
    return b, acc


@njit(**_OPTS)
def _refine(cand_t, cand_k, need, hi, chosen_t, chosen_k, filled):
    """Take ``need`` of the candidates (token order; keys equal in every bit from ``hi`` up)
    into chosen from position ``filled``, returning the new fill: bins of the next bits below
    ``hi``, all of the better bins, then the cut bin again; at hi == 0 the keys are
    equal: the first ``need`` in token order."""
    while True:
        n = cand_t.size
        if hi == 0 or need == n:
            for i in range(need):
                chosen_t[filled + i] = cand_t[i]
                chosen_k[filled + i] = cand_k[i]
            return filled + need
        width = 1  # bins ~ candidates / 4, at most 2^LEVEL_BITS: clearing them must not cost more than the pass
        while width < LEVEL_BITS and (np.int64(4) << width) < n:
            width += 1
        lo = max(hi - width, 0)
        mask = (np.int64(1) << np.int64(hi - lo)) - 1
        hist = np.zeros(1 << (hi - lo), np.int64)
        for i in range(n):
            hist[(cand_k[i] >> lo) & mask] += 1
        cut, before = _cut(hist, need)
        next_t = np.empty(hist[cut], np.int64)
        next_k = np.empty(hist[cut], np.int64)
        m = 0
        for i in range(n):
            b = (cand_k[i] >> lo) & mask
            if b < cut:
                chosen_t[filled] = cand_t[i]
                chosen_k[filled] = cand_k[i]
                filled += 1
            elif b == cut:
                next_t[m] = cand_t[i]
                next_k[m] = cand_k[i]
                m += 1
        cand_t, cand_k, need, hi = next_t, next_k, need - before, lo


@njit(**_OPTS)
def _sort_stable(chosen_t, chosen_k):
    """Sort (chosen_t, chosen_k) by key ascending, stably, in place."""
    n = chosen_t.size
    if n <= FEW:
        for i in range(1, n):
            t, k = chosen_t[i], chosen_k[i]
            j = i - 1
            while j >= 0 and chosen_k[j] > k:
                chosen_t[j + 1] = chosen_t[j]
                chosen_k[j + 1] = chosen_k[j]
                j -= 1
            chosen_t[j + 1] = t
            chosen_k[j + 1] = k
        return
    src_t, src_k = chosen_t, chosen_k
    dst_t = np.empty(n, np.int64)
    dst_k = np.empty(n, np.int64)
    digit = 8 if n < 2048 else LEVEL_BITS  # fewer counters to clear and scan when n is small
    mask = (np.int64(1) << digit) - 1
    count = np.empty(1 << digit, np.int64)
    passes = 0
    for lo in range(0, 32, digit):
        count[:] = 0
        for i in range(n):
            count[(src_k[i] >> lo) & mask] += 1
        if count[(src_k[0] >> lo) & mask] == n:
            continue  # every key has these bits alike: the pass would not move anything
        acc = np.int64(0)
        for b in range(count.size):
            c = count[b]
            count[b] = acc
            acc += c
        for i in range(n):
            b = (src_k[i] >> lo) & mask
            dst_t[count[b]] = src_t[i]
            dst_k[count[b]] = src_k[i]
            count[b] += 1
        src_t, dst_t = dst_t, src_t
        src_k, dst_k = dst_k, src_k
        passes += 1
    if passes % 2:
        chosen_t[:] = src_t
        chosen_k[:] = src_k


@njit(**_OPTS)
def _exact(bits, capacity, e0, g, first_bits, chosen_t, chosen_k):
    """chosen_t/chosen_k[j] <- expert e0+j's C best (token, key), unsorted, by radix select:
    a pass for the shared prefix, a histogram pass, a collecting pass."""
    shift, mask = _spans(bits, e0, g, first_bits)
    hist = _first_bins(bits, e0, g, shift, mask, 1 << first_bits)
    cut = np.empty(g, np.int64)
    need = np.empty(g, np.int64)
    offset = np.zeros(g + 1, np.int64)
    for j in range(g):
        c, before = _cut(hist[j], capacity)
        cut[j] = c
        need[j] = capacity - before
        offset[j + 1] = offset[j] + hist[j, c]
    filled = np.zeros(g, np.int64)
    cand_t = np.empty(offset[g], np.int64)
    cand_k = np.empty(offset[g], np.int64)
    cand_n = np.zeros(g, np.int64)
    for t in range(bits.shape[0]):
        for j in range(g):
            k = _descending_key(bits[t, e0 + j])
            b = (k >> shift[j]) & mask[j]
            if b < cut[j]:
                chosen_t[j, filled[j]] = t
                chosen_k[j, filled[j]] = k
                filled[j] += 1
            elif b == cut[j]:
                i = offset[j] + cand_n[j]
                cand_t[i] = t
                cand_k[i] = k
                cand_n[j] += 1
    for j in range(g):
        lo, hi = offset[j], offset[j + 1]
        _refine(cand_t[lo:hi].copy(), cand_k[lo:hi].copy(), need[j], shift[j], chosen_t[j], chosen_k[j], filled[j])


@njit(**_OPTS)
def _sampled(bits, capacity, e0, g, n_sample, chosen_t, chosen_k):
    """Like `_exact` in one pass over the data, or False when the sample misled it (then
    chosen holds garbage). Per expert, a sample of rows brackets the C-th best key between L and U
    (ranks r -+ 4 standard deviations of the sample's rank, r = C/T of the sample): keys
    below L are chosen for sure, keys in [L, U] are candidates settled by `_refine`. It fails
    when more than C keys are below L, fewer than C are at most U, or the candidates overflow
    their buffer (rare: then the caller runs `_exact`)."""
    t_total = bits.shape[0]
    stride = max(1, t_total // n_sample)
    n = t_total // stride
    q = capacity / t_total
    spread = 4.0 * np.sqrt(n * q * (1.0 - q)) + 2.0
    r_lo = int(np.floor(q * n - spread))
    r_hi = int(np.ceil(q * n + spread))
    lower = np.zeros(g, np.int64)  # keys >= 0: nothing is below 0
    upper = np.full(g, _ALL, np.int64)
    sample = np.empty((g, n), np.int64)
    for i in range(n):  # row by row: a sampled row's g keys share a cache line
        for j in range(g):
            sample[j, i] = _descending_key(bits[i * stride + stride // 2, e0 + j])
    for j in range(g):
        if r_lo >= 0:
            lower[j] = np.partition(sample[j], r_lo)[r_lo]
        if r_hi < n:
            upper[j] = np.partition(sample[j], r_hi)[r_hi]
    positive = _ALL - np.int64(2147483648)  # the key of +0.0: keys up to it are values >= +0.0
    at_least = np.empty(g, np.int32)
    for j in range(g):
        if upper[j] >= positive:
            return False  # the cut may lie at or below zero, where bits do not order like keys
        at_least[j] = np.int32(positive - upper[j])
    # expected candidates + sure ~ C + T * 2 * spread / n; room for 2x the candidates
    room = capacity + int(4.0 * spread * t_total / n) + 64
    hit_t = np.empty((g, room), np.int64)
    hit_k = np.empty((g, room), np.int64)
    n_hit = np.zeros(g, np.int64)
    for t0 in range(0, t_total, BLOCK):
        t1 = min(t0 + BLOCK, t_total)
        for j in range(g):  # the block's rows stay in cache from one expert to the next
            n_hit[j] = _keys_at_most(bits, t0, t1, e0 + j, at_least[j], room, hit_t[j], hit_k[j], n_hit[j])
    for j in range(g):
        if n_hit[j] > room:
            return False
        n_sure = 0
        n_cand = 0
        low = lower[j]
        for i in range(n_hit[j]):  # split the hits: sure into chosen, the rest stay (in order)
            k = hit_k[j, i]
            if k < low:
                if n_sure < capacity:
                    chosen_t[j, n_sure] = hit_t[j, i]
                    chosen_k[j, n_sure] = k
                n_sure += 1
            else:
                hit_t[j, n_cand] = hit_t[j, i]
                hit_k[j, n_cand] = k
                n_cand += 1
        if n_sure > capacity or n_sure + n_cand < capacity:
            return False
        _refine(hit_t[j, :n_cand].copy(), hit_k[j, :n_cand].copy(), capacity - n_sure, 32,
                chosen_t[j], chosen_k[j], n_sure)
    return True


BLOCK = 256  # rows of a block of `_sampled`'s pass (g * BLOCK keys in cache)


@njit(inline="always", **_OPTS)
def _keys_at_most(bits, t0, t1, e, at_least, room, out_t, out_k, n):
    """Append (t, key) of column e's rows t0..t1 whose bits are >= at_least (int32 bits of a
    value >= +0.0: there the bits order like the value, and negative values' bits are below)
    to out from n, in order, and return the new count (it counts past ``room``; writing stops
    there). Comparing the bits, not keys, keeps the pass to a load and a compare per row."""
    for t in range(t0, t1):
        b = bits[t, e]
        if b >= at_least:
            if n < room:
                out_t[n] = t
                out_k[n] = _descending_key(b)
            n += 1
    return n


# From this many tokens a group first tries `_sampled`, on a sample of about SAMPLE rows.
SAMPLED_MIN_TOKENS = 8192
SAMPLE = 1024


@njit(**_OPTS)
def _select_group(bits, capacity, e0, g, first_bits, token, value_bits):
    """Experts e0..e0+g: token[e] <- their C chosen tokens, value_bits[e] <- the values' bits."""
    chosen_t = np.empty((g, capacity), np.int64)
    chosen_k = np.empty((g, capacity), np.int64)
    if bits.shape[0] < SAMPLED_MIN_TOKENS or not _sampled(bits, capacity, e0, g, SAMPLE, chosen_t, chosen_k):
        _exact(bits, capacity, e0, g, first_bits, chosen_t, chosen_k)
    for j in range(g):
        _sort_stable(chosen_t[j], chosen_k[j])
        for i in range(capacity):
            token[e0 + j, i] = chosen_t[j, i]
            value_bits[e0 + j, i] = _bits_of(chosen_k[j, i])


@njit(parallel=True, **_OPTS)
def expert_choice_select(bits, capacity, group, first_bits, token, value_bits):
    """Every expert's selection, groups of ``group`` adjacent experts in parallel.
    bits <int32>[T, E] (float32 probs as bits), 1 <= capacity <= T; token <int64>[E, C] and
    value_bits <int32>[E, C] are written."""
    e_total = bits.shape[1]
    n_groups = (e_total + group - 1) // group
    for gi in prange(n_groups):
        e0 = gi * group
        _select_group(bits, capacity, e0, min(group, e_total - e0), first_bits, token, value_bits)


@njit(**_OPTS)
def expert_choice_select_serial(bits, capacity, group, first_bits, token, value_bits):
    """`expert_choice_select` on the calling thread."""
    e_total = bits.shape[1]
    for e0 in range(0, e_total, group):
        _select_group(bits, capacity, e0, min(group, e_total - e0), first_bits, token, value_bits)

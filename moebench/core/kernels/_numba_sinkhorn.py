"""numba kernel behind `moebench.core.kernels.sinkhorn_scale` (Sinkhorn's scaling iteration).

The iteration of `moebench.routers.sinkhorn.sinkhorn_scaling`, whole, in one call: per
iteration one pass over the kernel K <f32 or f64>[T, E] in row blocks, each row's
d0[t] = 1/T / max(K[t] . d1, tiny) and its contribution K[t, e] * d0[t] to the column sums
made while the row is in cache (float64 arithmetic, as the torch form). Per-block column sums
are added in block order, so the result does not depend on the thread count. The torch form
takes ~10 ops per iteration and a host sync for the stopping error, which at decode sizes
cost far more than the arithmetic.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True)
ROW_BLOCK = 1024
_TINY = np.finfo(np.float64).tiny


@njit(inline="always", **_OPTS)
def _rows(kernel, d1, d0, colsum, b, lo, hi, inv_t):
    """Rows lo..hi: d0 and their column sums into colsum[b]."""
    e_total = kernel.shape[1]
    for t in range(lo, hi):
        s = 0.0
        for e in range(e_total):
            s += np.float64(kernel[t, e]) * d1[e]
        d = (1.0 / max(s, _TINY)) * inv_t
        d0[t] = d
        for e in range(e_total):
            colsum[b, e] += np.float64(kernel[t, e]) * d


@njit(inline="always", **_OPTS)
def _finish_iteration(colsum, d1, inv_e):
    """d1 <- 1/E / max(sum of the block column sums, tiny); returns mean|d1_old - d1_new|."""
    e_total = d1.size
    err = 0.0
    for e in range(e_total):
        c = 0.0
        for b in range(colsum.shape[0]):
            c += colsum[b, e]
        new = inv_e / max(c, _TINY)
        err += abs(d1[e] - new)
        d1[e] = new
    return err / e_total


@njit(parallel=True, **_OPTS)
def sinkhorn_iterate(kernel, tol, max_iters, d0, d1):
    """Scale K <f32|f64>[T, E]: fills d0 <f64>[T] and d1 <f64>[E] (d1 starts at ones) and returns
    the iterations: stop once mean|d1_old - d1| <= tol (or is NaN) or after max_iters."""
    t_total, e_total = kernel.shape
    nblocks = max(1, (t_total + ROW_BLOCK - 1) // ROW_BLOCK)
    colsum = np.zeros((nblocks, e_total))
    inv_t, inv_e = 1.0 / t_total, 1.0 / e_total
    d1[:] = 1.0
    iters = 0
    while iters < max_iters:
        colsum[:] = 0.0
        for b in prange(nblocks):
            lo = b * ROW_BLOCK
            _rows(kernel, d1, d0, colsum, b, lo, min(t_total, lo + ROW_BLOCK), inv_t)
        err = _finish_iteration(colsum, d1, inv_e)
        iters += 1
        if not err > tol:
            break
    return iters


@njit(**_OPTS)
def sinkhorn_iterate_serial(kernel, tol, max_iters, d0, d1):
    """`sinkhorn_iterate` on the calling thread (same blocks, same sums: the same floats)."""
    t_total, e_total = kernel.shape
    nblocks = max(1, (t_total + ROW_BLOCK - 1) // ROW_BLOCK)
    colsum = np.zeros((nblocks, e_total))
    inv_t, inv_e = 1.0 / t_total, 1.0 / e_total
    d1[:] = 1.0
    iters = 0
    while iters < max_iters:
        colsum[:] = 0.0
        for b in range(nblocks):
            lo = b * ROW_BLOCK
            _rows(kernel, d1, d0, colsum, b, lo, min(t_total, lo + ROW_BLOCK), inv_t)
        err = _finish_iteration(colsum, d1, inv_e)
        iters += 1
        if not err > tol:
            break
    return iters

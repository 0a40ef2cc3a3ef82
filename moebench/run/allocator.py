"""How CPU memory for timed calls is allocated: the C library's defaults, or pages kept for reuse.

torch's CPU tensors come from malloc. glibc serves a request of 32 MiB or more (its largest
mmap threshold) with fresh pages from the kernel and unmaps them on free, so every call that
makes such a tensor pays a page fault per 4 KiB (measured here: a clone of 64 MiB took 22.7 ms
with the defaults, 5.0 ms with reuse). Times then grow faster than the algorithm as T crosses
that size, and they measure the kernel's page zeroing rather than the router.

``timing.cpu_allocator``:
- ``system`` (default): glibc's defaults, what a user's process does unless it tunes malloc.
- ``reuse``: no mmap for large blocks and no trimming of the heap (``mallopt(M_MMAP_MAX, 0)``,
  ``mallopt(M_TRIM_THRESHOLD, INT_MAX)``), so freed pages are reused by the next call, like
  the caching allocator torch uses on CUDA. Set around a case's timed routers and restored to
  glibc's default values after (which ends glibc's dynamic threshold adjustment for the rest
  of the process). Memory freed meanwhile stays with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from typing import Iterator

ALLOCATORS = ("system", "reuse")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
# glibc's DEFAULT_TRIM_THRESHOLD and DEFAULT_MMAP_MAX, restored after a `reuse` section
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_REUSE = {_M_TRIM_THRESHOLD: _INT_MAX, _M_MMAP_MAX: 0}


def _mallopt():
    """glibc's mallopt, or None on other C libraries (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return None
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def allocator_problem(mode: str) -> str | None:
    """None if ``mode`` can be applied here, else why not (one line)."""
    if mode not in ALLOCATORS:
        return f"cpu_allocator must be one of {', '.join(ALLOCATORS)}, got {mode!r}"
    if mode == "reuse" and _mallopt() is None:
        return "timing.cpu_allocator: reuse needs glibc's mallopt (Linux with glibc)"
    return None


def _set(settings: dict[int, int]) -> None:
    mallopt = _mallopt()
    for param, value in settings.items():
        if mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) was refused")


@contextmanager
def cpu_allocator(mode: str) -> Iterator[str]:
    """Apply ``mode`` (see the module docstring) for the ``with`` block; yields the mode.
    ``system`` changes nothing. Raises ValueError where `allocator_problem` names one."""
    problem = allocator_problem(mode)
    if problem:
        raise ValueError(problem)
    if mode == "system":
        yield mode
        return
    _set(_REUSE)
    try:
        yield mode
    finally:
        _set(_GLIBC_DEFAULTS)

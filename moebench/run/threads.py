"""Thread-pool settings of the processes moebench measures in (imports no torch: it must run first).

torch's CPU ops run on an OpenMP (libgomp) pool whose threads spin-wait after each parallel
region; moebench's numba kernels ran on numba's own "workqueue" pool. While one pool spins, the
other waits for a core, so on 2 cores the numba route of `topk` (T=65536, E=64, k=2) was slow and
bimodal (p10 3.9, p50 5.7, p90 7.5 ms) and repeated measures of it disagreed by 13-28%.

What moebench sets, side by side with every candidate in benchmarks/bench_timing_stability.py
(docs/timing_stability.md has the tables):

- ``NUMBA_THREADING_LAYER_PRIORITY="omp tbb workqueue"``: numba's kernels run on an OpenMP pool
  too (falling back to tbb, then workqueue, where numba has no OpenMP layer);
- ``GOMP_SPINCOUNT=10000``: an idle OpenMP thread spins ~10^4 iterations (microseconds, enough to
  catch the next back-to-back parallel region) and then sleeps, instead of libgomp's default
  3·10^5 that keeps it on a core for the other pool's time.

On an idle 2-core VM this gave the numba call p10 3.37, p50 3.49, p90 3.68 ms, five repeated
measures within 1.4-2.9% of each other and 1.00x torch.utils.benchmark, and left the torch-path
routers at 1.00-1.04x their default time. ``OMP_WAIT_POLICY=PASSIVE`` (spin count 0, what moebench
set before) costs torch-path routers 1.14-1.29x on an idle machine; it stays the user's choice
for a machine shared with other work, where it is ~20-50% faster than the spin count.

OpenMP reads the variables once, when its runtime starts (torch's libgomp on the first torch
import, numba's when its first parallel kernel runs), and numba reads its config on import, so
they are set only where moebench owns the process: `settle()` at the start of the `moebench`
command (before anything imports torch or numba), and `worker_environment()` for worker processes
moebench starts. A program that imports moebench as a library keeps its own settings. A value the
user set wins: a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT keeps the spin count unset, a user's
NUMBA_THREADING_LAYER or NUMBA_THREADING_LAYER_PRIORITY keeps the layer priority unset.

numba's OpenMP layer is not fork-safe with GNU OpenMP: a process forked (without exec) from one
that has run a numba parallel kernel aborts if it runs one too. moebench's workers are exec'ed
(isolation) or forked from a clean forkserver (parallel ranks), so neither is such a process.
"""

from __future__ import annotations

import os
import sys

# variable -> (value moebench sets, the user's variables that keep it unset, the module whose
# loading makes it too late to set)
SETTINGS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "GOMP_SPINCOUNT": ("10000", ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"), "torch"),
    "NUMBA_THREADING_LAYER_PRIORITY": ("omp tbb workqueue",
                                       ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"), "numba"),
}

MARKER_VAR = "MOEBENCH_THREAD_ENV"  # the variables moebench set, comma-separated (inherited by workers)

# What settle() found for each variable in this process (recorded in meta by environment.py):
# "moebench" (it set it), "user" (the user's setting of it or of a variable that overrides it
# wins), "too late" (torch or numba had already loaded: not set, it would not take effect).
_origins: dict[str, str] = {}


def _set_by_moebench(env) -> set[str]:
    return {v for v in env.get(MARKER_VAR, "").split(",") if v}


def _origin(var: str, env) -> str | None:
    """How ``var`` came about in ``env`` when settle() did not decide it here."""
    _, user_vars, _ = SETTINGS[var]
    if var in env and var in _set_by_moebench(env):
        return "moebench"
    if any(u in env for u in user_vars):
        return "user"
    return None


def _apply(env, allowed) -> dict[str, str]:
    """Set each of SETTINGS in ``env`` unless the user decided it or ``allowed(module)`` is false;
    returns {variable: origin}."""
    origins = {}
    mine = _set_by_moebench(env)
    for var, (value, _, module) in SETTINGS.items():
        origin = _origin(var, env)
        if origin is None and not allowed(module):
            origin = "too late"
        elif origin is None:
            env[var] = value
            mine.add(var)
            origin = "moebench"
        origins[var] = origin
    if mine:
        env[MARKER_VAR] = ",".join(sorted(mine))
    return origins


def settle(environ=None) -> dict[str, str]:
    """Give this process moebench's thread settings (the module docstring) unless the user chose
    otherwise or torch/numba have already read them. Returns (and remembers) {variable: origin}."""
    global _origins
    env = os.environ if environ is None else environ
    _origins = _apply(env, lambda module: module not in sys.modules)
    return dict(_origins)


def worker_environment(base=None) -> dict[str, str]:
    """The environment for a worker process moebench starts and measures in: ``base`` (default
    os.environ) plus moebench's thread settings where ``base`` leaves them to moebench."""
    env = dict(os.environ if base is None else base)
    _apply(env, lambda module: True)  # a fresh process: nothing has loaded yet
    return env


def thread_settings(environ=None) -> dict:
    """What this process runs with: the thread variables and, for each one moebench manages, who
    set it ("moebench", "user", "too late": moebench could not, torch or numba had loaded; None)."""
    env = os.environ if environ is None else environ
    # what settle() decided describes this process's environment, not one handed in
    decided = _origins if environ is None or environ is os.environ else {}
    set_by = {var: decided.get(var) or _origin(var, env) for var in SETTINGS}
    return {
        "omp_wait_policy": env.get("OMP_WAIT_POLICY"),
        "gomp_spincount": env.get("GOMP_SPINCOUNT"),
        "numba_threading_layer": env.get("NUMBA_THREADING_LAYER"),
        "numba_threading_layer_priority": env.get("NUMBA_THREADING_LAYER_PRIORITY"),
        "numba_num_threads": env.get("NUMBA_NUM_THREADS"),
        "set_by": set_by,
    }


# Thread counts a user may set. numba starts NUMBA_NUM_THREADS native threads when its first
# parallel kernel runs (100000 segfaulted, #23), libgomp OMP_NUM_THREADS: both are checked against
# the machine before either loads, so a mistake is one line, not a crash mid-run.
THREAD_COUNT_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
THREADS_PER_CPU = 8  # oversubscription beyond this is a typo, not a setting


def max_threads() -> int:
    """The largest thread count moebench accepts on this machine."""
    return max(64, THREADS_PER_CPU * (os.cpu_count() or 1))


def thread_count_problem(environ=None) -> str | None:
    """One line saying which thread-count variable is wrong and what it must be, else None.
    OMP_NUM_THREADS may be a comma list (nested levels): each entry is checked."""
    env = os.environ if environ is None else environ
    top = max_threads()
    for var in THREAD_COUNT_VARS:
        text = env.get(var)
        if text is None or (var == "OMP_NUM_THREADS" and not text.strip()):
            continue
        parts = text.split(",") if var == "OMP_NUM_THREADS" else [text]
        for part in parts:
            try:
                value = int(part.strip())
            except ValueError:
                value = None
            if value is None or not 1 <= value <= top:
                shown = text if len(text) <= 40 else text[:37] + "..."
                return (f"{var}={shown!r}: expected a whole number of threads from 1 to {top} "
                        f"(this machine has {os.cpu_count() or 1} CPUs)")
    return None

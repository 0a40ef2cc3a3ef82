"""Thread-pool settings of the processes moebench measures in (imports no torch: it must run first).

torch's CPU ops run on an OpenMP (libgomp) pool whose threads spin-wait after each parallel
region; moebench's numba kernels run on numba's own pool. While one pool spins, the other waits
for a core, so on 2 cores the numba route of `topk` (T=65536, E=64, k=2) was ~40% slower at the
median and bimodal (p10 4.0, p50 6.0, p90 7.5 ms), and under load the spinning cost whole
scheduler slices. With ``OMP_WAIT_POLICY=PASSIVE`` the OpenMP threads sleep when idle
(p10 4.2, p50 4.3, p90 4.5 ms); benchmarks/bench_timing_stability.py measures it against the
other candidates (GOMP_SPINCOUNT, numba's omp/tbb layers, serial numba) and on the torch-path
routers.

OpenMP reads the variable once, when the runtime starts (the first torch import), so it is set
only where moebench owns the process: `settle()` at the start of the `moebench` command (before
anything imports torch), and `worker_environment()` for worker processes moebench starts. A
program that imports moebench as a library keeps its own settings. A value the user set wins.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
WAIT_POLICY = "PASSIVE"

MARKER_VAR = "MOEBENCH_THREAD_ENV"  # "moebench" where moebench set the policy (inherited by workers)

# How this process's OMP_WAIT_POLICY came about (recorded in meta by environment.py):
# "moebench" (settle() set it before torch loaded), "user" (it was already set), "too late"
# (settle() ran after torch had loaded: not set, it would not take effect) or None (never asked).
_origin: str | None = None


def settle(environ=None) -> str:
    """Set OMP_WAIT_POLICY=PASSIVE for this process unless the user set it or torch has already
    started its OpenMP runtime. Returns (and remembers) how the setting came about."""
    global _origin
    env = os.environ if environ is None else environ
    if WAIT_POLICY_VAR in env:
        _origin = "moebench" if env.get(MARKER_VAR) == "moebench" else "user"
    elif "torch" in sys.modules:
        _origin = "too late"
    else:
        env[WAIT_POLICY_VAR] = WAIT_POLICY
        env[MARKER_VAR] = "moebench"
        _origin = "moebench"
    return _origin


def worker_environment(base=None) -> dict[str, str]:
    """The environment for a worker process moebench starts and measures in: ``base`` (default
    os.environ) plus OMP_WAIT_POLICY=PASSIVE unless ``base`` sets it already."""
    env = dict(os.environ if base is None else base)
    if WAIT_POLICY_VAR not in env:
        env[WAIT_POLICY_VAR] = WAIT_POLICY
        env[MARKER_VAR] = "moebench"
    return env


def thread_settings(environ=None) -> dict:
    """What this process runs with: the OpenMP wait policy and who set it ("moebench", "user",
    "too late": moebench could not, torch was already loaded; None: unset), and the other
    variables that change how the two thread pools share the cores."""
    env = os.environ if environ is None else environ
    origin = _origin
    if origin is None and WAIT_POLICY_VAR in env:
        origin = "moebench" if env.get(MARKER_VAR) == "moebench" else "user"
    return {
        "omp_wait_policy": env.get(WAIT_POLICY_VAR),
        "omp_wait_policy_set_by": origin,
        "gomp_spincount": env.get("GOMP_SPINCOUNT"),
        "numba_threading_layer": env.get("NUMBA_THREADING_LAYER"),
        "numba_num_threads": env.get("NUMBA_NUM_THREADS"),
    }

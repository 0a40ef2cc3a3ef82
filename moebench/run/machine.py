"""What machine and software a run measured on (recorded with every run).

:func:`capture_environment` returns a plain, JSON-serialisable dict; nothing here fails
for a missing tool (no git, not a repo, no CUDA, no /proc): the field is just None.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys

import numpy
import pandas
import torch

import moebench
from moebench.run.threads import thread_settings

# Environment variables that change how fast kernels run.
SPEED_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "CUDA_VISIBLE_DEVICES",
                  "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "NUMBA_THREADING_LAYER",
                  "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER_PRIORITY", "OMP_PROC_BIND", "OMP_PLACES")


def load_snapshot() -> dict:
    """``{"loadavg": [1, 5, 15 min], "cores": usable cores}`` now (meta ``load``: reports say
    how busy the machine was); loadavg None where the OS has none."""
    try:
        avg = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        avg = None
    affinity = cpu_affinity()
    return {"loadavg": avg, "cores": len(affinity) if affinity else os.cpu_count()}


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo "model name", else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_affinity() -> list[int] | None:
    """Sorted CPU ids this process may run on, or None where the OS does not say."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _git(*args: str) -> str | None:
    """stdout of ``git <args>`` in the current directory, or None on any failure."""
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_info() -> dict:
    """``{"commit": sha | None, "dirty": bool | None}`` of the repo in the current directory."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    if status is None:
        return {"commit": head.strip(), "dirty": None}
    return {"commit": head.strip(), "dirty": any(_counts_as_a_change(line) for line in status.splitlines())}


RUN_OUTPUT_DIRS = ("results/", "reports/")  # new runs appear here: they change no code


def _counts_as_a_change(status_line: str) -> bool:
    """A `git status --porcelain` line that changes what ran: any tracked change, or an untracked
    path outside the run output folders (an earlier run's untracked results do not)."""
    if not status_line.strip():
        return False
    if not status_line.startswith("?? "):
        return True
    return not status_line[3:].strip('"').startswith(RUN_OUTPUT_DIRS)


def torch_parallel_info(max_lines: int = 6) -> str:
    """The first lines of ``torch.__config__.parallel_info()`` (thread backends)."""
    try:
        lines = torch.__config__.parallel_info().strip().splitlines()
    except Exception:  # diagnostics only: never fail a run over it
        return ""
    return "\n".join(line.rstrip() for line in lines[:max_lines])


def cuda_info(devices: list[str]) -> dict:
    """CUDA availability, version, and name/capability/memory of each CUDA device named.

    Only queries the devices in ``devices`` that are CUDA (all visible ones when a bare
    "cuda" is named).  No CUDA call is made when CUDA is unavailable.
    """
    info: dict = {"available": torch.cuda.is_available(), "version": torch.version.cuda,
                  "devices": []}
    if not info["available"]:
        return info
    indices: set[int] = set()
    for name in devices:
        dev = torch.device(name)
        if dev.type != "cuda":
            continue
        indices.add(dev.index if dev.index is not None else torch.cuda.current_device())
    for index in sorted(indices):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append({
            "index": index,
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
        })
    return info


def capture_environment(devices: list[str]) -> dict:
    """A JSON-serialisable record of the machine, software and settings a run used.

    devices: the device strings the run measures on (e.g. ["cpu", "cuda:0"]); CUDA
    details are captured for the CUDA ones.
    """
    return {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_parallel_info": torch_parallel_info(),
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "moebench": moebench.__version__,
        "devices": list(devices),
        "cuda": cuda_info(devices),
        "git": git_info(),
        "env": {k: os.environ[k] for k in SPEED_ENV_VARS if k in os.environ},
        "threads": thread_settings(),  # the layer numba ran on: meta's numba_threading_layer
    }


def numba_layer_in_use() -> str | None:
    """The threading layer numba's parallel kernels run on in this process ("omp", "tbb",
    "workqueue"), or None where numba is not loaded or no parallel kernel has run yet (never
    starts numba's pool: that would make a later fork of this process unsafe)."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        return str(numba.threading_layer())
    except Exception:  # ValueError: no parallel kernel ran here
        return None

"""The one reader of a run's ``environment`` record (meta.json), which
:func:`moebench.run.machine.capture_environment` writes.

A meta.json may come from an older moebench, another tool or a hand edit, so every field is
read defensively: a part that is missing or of the wrong type reads as empty, never raises.
The report header, `compare` (same machine or not), the exports and `merge` (same code or not)
all read it through here.
"""

from __future__ import annotations

from typing import Any


def obj(value: Any) -> dict:
    """``value`` if it is a JSON object, else {}."""
    return value if isinstance(value, dict) else {}


def environment(meta: dict) -> dict:
    """meta's ``environment`` record ({} when absent or not an object)."""
    return obj(obj(meta).get("environment"))


def git(meta: dict) -> dict:
    """``{"commit": str | None, "dirty": bool}`` of the code that made the run; older runs kept
    the commit as ``environment.git_commit`` or ``git_commit``."""
    env = environment(meta)
    record = obj(env.get("git"))
    commit = record.get("commit") or env.get("git_commit") or obj(meta).get("git_commit")
    return {"commit": str(commit) if commit else None, "dirty": bool(record.get("dirty"))}


def cuda(meta_or_env: dict) -> dict:
    """The ``cuda`` part of an environment (given meta or the environment itself)."""
    env = obj(meta_or_env)
    env = environment(env) if "environment" in env else env
    return obj(env.get("cuda"))


def gpu_names(meta_or_env: dict) -> list[str]:
    """Names of the CUDA devices recorded, in order ([] without CUDA)."""
    devices = cuda(meta_or_env).get("devices")
    return [str(obj(d).get("name")) for d in devices] if isinstance(devices, list) else []


def machine_identity(meta: dict) -> tuple[str, str, tuple[str, ...]]:
    """(CPU model, host name, GPU names): two runs with different identities ran on different
    machines, so their times are compared relative to the reference kernel."""
    env = environment(meta)
    return str(env.get("cpu_model")), str(env.get("hostname")), tuple(gpu_names(env))


def machine_summary(env: dict) -> str:
    """One line for report headers, e.g. "Intel Xeon ... (2 cores), torch 2.13.0, no CUDA"."""
    env = obj(env)
    affinity = env.get("cpu_affinity")
    cores = len(affinity) if isinstance(affinity, list) and affinity else env.get("logical_cores")
    parts = [f"{env.get('cpu_model', 'unknown CPU')} ({cores} cores)", f"torch {env.get('torch', '?')}"]
    info, names = cuda(env), gpu_names(env)
    if names:
        parts.append(f"{', '.join(names)} (CUDA {info.get('version')})")
    elif info.get("available"):
        parts.append(f"CUDA {info.get('version')}")
    else:
        parts.append("no CUDA")
    return ", ".join(parts)

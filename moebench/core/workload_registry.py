"""The workload registry, light to import (no torch): the suite validator checks a workload's
name against it before anything loads torch (#23). The workloads themselves are in
core/workloads.py (which registers them here) and in the kinds' ``workloads`` modules."""

from __future__ import annotations

import importlib

from moebench.core.kinds import import_plugins, plugin_modules
from moebench.core.registry import Registry

MODULE = "moebench.core.workloads"

# module -> the workloads its import registers (tests/test_refusals.py checks this table
# against the loaded registry)
BUILTIN: dict[str, tuple[str, ...]] = {
    MODULE: ("burst", "clustered", "collapsed", "hot_experts", "rotating_hotspot", "tokens", "uniform",
             "zero_load", "zipf"),
    "moebench.kinds.traces.workload": ("trace", "trace_fit"),
}
NEEDS_OPTIONS = ("trace", "trace_fit")  # a trace folder: the only ones that do not build with their defaults


def _load() -> None:
    """core/workloads.py's own, then the kinds' (e.g. the traces kind's trace and trace_fit,
    replays of recorded routing), by module name (moebench/core/kinds.py `Kind.workloads`)."""
    importlib.import_module(MODULE)
    import_plugins("workloads")


def _builtin() -> list[str] | None:
    modules = [MODULE, *plugin_modules("workloads")]
    if any(m not in BUILTIN for m in modules):
        return None
    return [name for m in modules for name in BUILTIN[m]]


WORKLOADS = Registry("workload", _load, _builtin, NEEDS_OPTIONS)

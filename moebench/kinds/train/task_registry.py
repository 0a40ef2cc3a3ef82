"""The training task registry, light to import (no torch): the suite validator checks a task's
name against it before anything loads torch (#23). The tasks themselves are in tasks.py, which
registers them here on import (loading the registry imports it)."""

from __future__ import annotations

import importlib

from moebench.core.registry import Registry

MODULE = "moebench.kinds.train.tasks"
# the tasks MODULE registers (tests/test_refusals.py checks this table against the loaded registry);
# every one builds with its defaults
BUILTIN: tuple[str, ...] = ("language", "local_experts", "teacher")


def _load() -> None:
    importlib.import_module(MODULE)


TASKS = Registry("task", _load, lambda: list(BUILTIN))

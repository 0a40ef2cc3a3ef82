"""Routers: the literature's routing algorithms behind one registry (see docs/routers.md)."""

import importlib

# loaded on first use, not on import: the registry (routers/registry.py) is light, and the suite
# validator reads its names without torch (#23); routers/base.py imports torch
_EXPORTS = {
    "RouteContext": "moebench.routers.base", "RouteInputs": "moebench.routers.base", "Router": "moebench.routers.base",
    "RouterState": "moebench.routers.base", "TokenChoiceRouter": "moebench.routers.base",
    "create_router": "moebench.routers.registry", "register": "moebench.routers.registry",
    "router_class": "moebench.routers.registry", "router_classes": "moebench.routers.registry",
    "router_options": "moebench.routers.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

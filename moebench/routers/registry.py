"""The router registry. Suites name routers by key; plugins join through an entry-point group.

A third-party package declares, in its pyproject.toml::

    [project.entry-points."moebench.routers"]
    my_router = "my_package.routers"

Loading the entry point imports that module (or calls it, if it names a callable), which runs
its ``@register("my_router")`` decorators. A kind of case (moebench/core/kinds.py) may bring
routers too: its ``Kind.routers`` modules are imported the same way, by name.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from moebench.core.errors import MoebenchError
from moebench.core.kinds import import_plugins, plugin_modules
from moebench.core.registry import Registry, options_of

ENTRY_POINT_GROUP = "moebench.routers"

# module -> the routers its import registers: the names known without importing a router
# module (torch), so that a suite naming an unknown router is refused at once (#23).
# tests/test_refusals.py checks this table against the loaded registry.
BUILTIN: dict[str, tuple[str, ...]] = {
    "moebench.routers.catalog": ("base", "deepseek", "expert_choice", "gshard", "hash", "noisy_topk", "random",
                                 "round_robin", "sinkhorn", "soft_moe", "softmax_dense", "switch", "topk"),
    "moebench.peers": ("peer:deepspeed.top1gating", "peer:deepspeed.top2gating", "peer:deepspeed.topkgating",
                       "peer:hf.mixtral", "peer:megatron.sinkhorn", "peer:megatron.topk"),
    "moebench.kinds.traces.router": ("recorded",),
}


def _builtin() -> list[str] | None:
    """The names `_load` registers, from BUILTIN; None when a plugin (an entry point, a kind's
    module not in the table) could register others."""
    modules = plugin_modules("routers")
    if any(m not in BUILTIN for m in modules) or entry_points(group=ENTRY_POINT_GROUP):
        return None
    return [name for m in modules for name in BUILTIN[m]]


def _load() -> None:
    # the kinds' routers, by module name (moebench/core/kinds.py `Kind.routers`): the catalog
    # and the peers (peer:*; their libraries load on first route) from the routing kind,
    # `recorded` (a trace's own choices) from the traces kind. By name, not by import: the
    # router modules import this registry.
    import_plugins("routers")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken plugin gets one clear line, not a traceback
            raise MoebenchError(f"router plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from None
        if callable(loaded) and not isinstance(loaded, type):
            loaded()


ROUTERS = Registry("router", _load, _builtin)
register = ROUTERS.register
create_router = ROUTERS.create
router_classes = ROUTERS.classes
router_class = ROUTERS.get
router_options = options_of

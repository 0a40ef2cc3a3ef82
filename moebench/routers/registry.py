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
from moebench.core.kinds import import_plugins
from moebench.core.registry import Registry, options_of

ENTRY_POINT_GROUP = "moebench.routers"


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


ROUTERS = Registry("router", _load)
register = ROUTERS.register
create_router = ROUTERS.create
router_classes = ROUTERS.classes
router_class = ROUTERS.get
router_options = options_of

"""Routers: the literature's routing algorithms behind one registry (see docs/routers.md)."""

from moebench.routers.base import RouteContext, RouteInputs, Router, RouterState, TokenChoiceRouter
from moebench.routers.registry import create_router, register, router_class, router_classes, router_options

__all__ = [
    "RouteContext", "RouteInputs", "Router", "RouterState", "TokenChoiceRouter",
    "create_router", "register", "router_class", "router_classes", "router_options",
]

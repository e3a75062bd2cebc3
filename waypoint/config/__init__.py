"""Waypoint config: HTTPRoute, GRPCRoute, VirtualService, DestinationRule, AuthorizationPolicy and
ReferenceGrant documents, validated and turned into route tables, cluster policies and L7 policies.

The store is imported lazily: `waypoint.routing` needs `waypoint.config.model`, and the store needs
routing's neighbours, so an eager import here would be circular.
"""

from typing import Any

__all__ = ["ApplyResult", "ConfigStore", "Outcome", "ResourceError", "WaypointConfig", "WaypointIdentity"]


def __getattr__(name: str) -> Any:
    if name == "ResourceError":
        from waypoint.config.errors import ResourceError

        return ResourceError
    if name in __all__:
        from waypoint.config import store

        return getattr(store, name)
    raise AttributeError(f"module 'waypoint.config' has no attribute {name!r}")

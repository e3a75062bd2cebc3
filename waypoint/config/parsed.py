"""What each accepted resource boils down to before the route tables are assembled.

Parsing checks one resource on its own; attaching it (which Service, which namespace may reference
which backend, the precedence against other routes) needs the whole set and happens in the store.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from waypoint.config.model import Backend, RequestMatch, ResourceRef, RouteAction, ServiceRef


@dataclass(frozen=True)
class ParentAttachment:
    service: ServiceRef
    port: int | None = None


@dataclass(frozen=True)
class ParsedRule:
    index: int
    name: str | None
    matches: tuple[RequestMatch, ...]  # empty: the rule has no matches and catches everything
    action: RouteAction
    routes_to_parent: bool = False  # no backendRefs and nothing answering locally: the parent Service


@dataclass(frozen=True)
class ParsedRoute:
    """An HTTPRoute or GRPCRoute attached to Services (non-Service parents are dropped with a warning)."""

    ref: ResourceRef
    created: dt.datetime | None
    parents: tuple[ParentAttachment, ...]
    rules: tuple[ParsedRule, ...]
    warnings: tuple[str, ...] = ()

    @property
    def backends(self) -> list[Backend]:
        out = [b for r in self.rules for b in r.action.backends]
        out += [m.backend for r in self.rules for m in r.action.mirrors]
        return out


@dataclass(frozen=True)
class ParsedVirtualService:
    ref: ResourceRef
    created: dt.datetime | None
    hosts: tuple[str, ...]  # fully qualified, may start with "*"
    rules: tuple[ParsedRule, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReferenceGrantFrom:
    group: str
    kind: str
    namespace: str


@dataclass(frozen=True)
class ReferenceGrantTo:
    group: str
    kind: str
    name: str | None


@dataclass(frozen=True)
class ParsedReferenceGrant:
    ref: ResourceRef
    sources: tuple[ReferenceGrantFrom, ...]
    targets: tuple[ReferenceGrantTo, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def permits(self, from_kind: str, from_namespace: str, to_kind: str, to_name: str) -> bool:
        """Whether a `from_kind` in `from_namespace` may reference `to_kind/to_name` in this namespace."""
        src = any(f.group == "gateway.networking.k8s.io" and f.kind == from_kind and f.namespace == from_namespace
                  for f in self.sources)
        dst = any(t.group in ("", "core") and t.kind == to_kind and (t.name is None or t.name == to_name)
                  for t in self.targets)
        return src and dst

"""The waypoint's Python filter API: add L7 behaviour in a few lines.

A filter is an object with two optional hooks, called for every HTTP request the waypoint routes:

* ``on_request(ctx)`` after authorization and routing, before fault injection and the upstream call.
  It may change ``ctx.headers`` (what goes upstream) or answer the request itself by returning a
  ``LocalReply`` (the remaining filters and the upstream are then skipped);
* ``on_response(ctx, response)`` before the response goes to the client; it may change
  ``response.headers`` (local replies included, so a filter can stamp every answer).

Filters run in the order given for requests and in reverse order for responses (the order of Envoy's
decoder and encoder chains). A hook may be a plain function or a coroutine. The context carries what a
filter needs to decide: the route that matched, the cluster, the client's verified SPIFFE identity and
namespace, and a ``state`` dict private to the request. A filter that raises fails closed: the request
gets 500 and the error is logged, never the stack to the client.

Example (``waypoint.filters:PeerIdentityHeader``): tell the upstream who called, and the client which
route served it::

    class PeerIdentityHeader(Filter):
        name = "peer-identity"

        def on_request(self, ctx):
            ctx.headers.set("x-forwarded-client-identity", ctx.peer_identity or "none")

        def on_response(self, ctx, response):
            response.headers.set("x-waypoint-route", ctx.route_name)

Load filters with ``nodemesh waypoint --filter package.module:ClassName`` (repeatable, in order), or pass
instances to ``WaypointApp(filters=[...])``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from waypoint.flags import LocalReply
from waypoint.routing import Headers


@dataclass
class FilterContext:
    """One request as a filter sees it. `headers` are the upstream request headers (mutable)."""

    method: str
    path: str
    authority: str
    headers: Headers
    route_name: str
    cluster: str
    destination_service: str
    peer_identity: str | None
    source_namespace: str | None
    source_ip: str | None
    grpc: bool
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterResponse:
    """The response about to go downstream. `local` is True for the waypoint's own answers."""

    status: int
    headers: Headers
    local: bool = False


class Filter:
    """Base class with no-op hooks; subclass and override what you need."""

    name = "filter"

    def on_request(self, ctx: FilterContext) -> LocalReply | Any | None:
        return None

    def on_response(self, ctx: FilterContext, response: FilterResponse) -> Any | None:
        return None


class PeerIdentityHeader(Filter):
    """The example filter: forwards the caller's verified identity upstream and names the route in the
    response. Upstream services get an identity they can trust (the waypoint overwrites any value the
    client sent itself)."""

    name = "peer-identity"

    def on_request(self, ctx: FilterContext) -> None:
        ctx.headers.set("x-forwarded-client-identity", ctx.peer_identity or "none")

    def on_response(self, ctx: FilterContext, response: FilterResponse) -> None:
        response.headers.set("x-waypoint-route", ctx.route_name)


class FilterLoadError(ValueError):
    pass


def load_filter(spec: str) -> Filter:
    """`package.module:Name`: a Filter class (instantiated without arguments) or a factory returning one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise FilterLoadError(f"--filter {spec!r}: expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FilterLoadError(f"--filter {spec!r}: cannot import {module_name}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise FilterLoadError(f"--filter {spec!r}: {module_name} has no attribute {attr!r}")
    try:
        instance = factory()
    except Exception as exc:
        raise FilterLoadError(f"--filter {spec!r}: creating the filter failed: {exc}") from exc
    if not (hasattr(instance, "on_request") or hasattr(instance, "on_response")):
        raise FilterLoadError(f"--filter {spec!r}: {attr} gave {type(instance).__name__}, "
                              "which has neither on_request nor on_response")
    return instance  # type: ignore[no-any-return]

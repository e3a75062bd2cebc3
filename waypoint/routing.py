"""Request routing: match a request against a Service's route table and decide where it goes.

`route(request, table)` is the whole L7 routing decision of the waypoint as a pure function: the first
entry (in the table's precedence order) whose match holds wins; its action either answers locally
(redirect, direct response, 500 for a rule without usable backends) or names one weighted backend and
how to rewrite the request for it. With routes attached and none matching, the answer is 404 NR (the
Gateway API requires it); with no routes attached, traffic goes to the Service itself.

The request is a `RequestView`: what the shell decoded from HTTP/1.1 or HTTP/2 plus who sent it (the
HBONE peer identity), with multi-valued, case-insensitive headers. Nothing here does I/O or reads the
clock; randomness (weighted backends, mirror sampling) comes from the `rng` argument.
"""

from __future__ import annotations

import posixpath
import random
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from waypoint.config.model import (
    Backend,
    HeaderMatch,
    HeaderMutation,
    PathKind,
    PathRewrite,
    PathRewriteKind,
    QueryMatch,
    Redirect,
    RequestMatch,
    Rewrite,
    RouteAction,
    RouteEntry,
    RouteTable,
)
from waypoint.config.regex import compile_re2
from waypoint.flags import LocalReply, ResponseFlag, cluster_not_found, no_route
from waypoint.resilience.fault import FaultPolicy, sampled
from waypoint.resilience.retry import DEFAULT_RETRY_POLICY, RetryPolicy

# A locally answered request (redirect, direct response, 404, 500): the same type the other cores return.
DirectResponse = LocalReply

HeaderInput = Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str | Sequence[str]]


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class Headers:
    """HTTP header fields: names case-insensitive (stored lower-case), several values per name, order kept.

    Matching follows Envoy: a header that appears several times is matched as its values joined with
    ",", the way HTTP/1.1 allows them to be folded into one line.
    """

    __slots__ = ("_items",)

    def __init__(self, items: HeaderInput | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        if items is None:
            return
        if isinstance(items, Mapping):
            for name, value in items.items():
                values = [value] if isinstance(value, str | bytes) else list(value)
                for v in values:
                    self._items.append((_text(name).lower(), _text(v)))
        else:
            for name, value in items:
                self._items.append((_text(name).lower(), _text(value)))

    def get(self, name: str) -> str | None:
        key = name.lower()
        for n, v in self._items:
            if n == key:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n == key]

    def joined(self, name: str) -> str | None:
        values = self.get_all(name)
        return ",".join(values) if values else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n == name.lower() for n, _ in self._items)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def copy(self) -> Headers:
        out = Headers()
        out._items = list(self._items)
        return out

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name` with `value` (kept where the first one was)."""
        key = name.lower()
        for i, (n, _) in enumerate(self._items):
            if n == key:
                self._items[i] = (key, value)
                self._items = [it for j, it in enumerate(self._items) if j <= i or it[0] != key]
                return
        self._items.append((key, value))

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), value))

    def remove(self, name: str) -> None:
        key = name.lower()
        self._items = [it for it in self._items if it[0] != key]


def apply_mutation(headers: Headers, mutation: HeaderMutation) -> Headers:
    """A copy of `headers` with the mutation applied (remove, then set, then add, as Envoy does)."""
    out = headers.copy()
    for name in mutation.remove:
        out.remove(name)
    for name, value in mutation.set:
        out.set(name, value)
    for name, value in mutation.add:
        out.add(name, value)
    return out


def _strip_spiffe(principal: str | None) -> str | None:
    if principal is None:
        return None
    return principal[len("spiffe://"):] if principal.startswith("spiffe://") else principal


def namespace_of_principal(principal: str | None) -> str | None:
    """`<td>/ns/<ns>/sa/<sa>` -> `<ns>` (Istio derives `source.namespace` from the peer's identity)."""
    parts = (_strip_spiffe(principal) or "").split("/")
    if len(parts) >= 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[2]
    return None


def split_authority(authority: str) -> tuple[str, int | None]:
    """`host[:port]` (IPv6 in brackets) -> (host, port or None)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            host, rest = authority[: end + 1], authority[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                return host, int(rest[1:])
            return host, None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return authority, None


@dataclass(frozen=True)
class RequestView:
    """What routing and authorization see of a request.

    `path` includes the query string, as HTTP/2's `:path`. `source_principal` is the SPIFFE identity of
    the HBONE peer (with or without `spiffe://`); `source_namespace` defaults to the one in it.
    `destination_port` is the Service port the client addressed.
    """

    method: str
    path: str
    authority: str = ""
    scheme: str = "http"
    headers: Headers = field(default_factory=Headers)
    source_principal: str | None = None
    source_namespace: str | None = None
    source_ip: str | None = None
    remote_ip: str | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    sni: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.headers, Headers):
            object.__setattr__(self, "headers", Headers(self.headers))
        principal = _strip_spiffe(self.source_principal)
        object.__setattr__(self, "source_principal", principal)
        if self.source_namespace is None:
            object.__setattr__(self, "source_namespace", namespace_of_principal(principal))

    @classmethod
    def from_header_list(
        cls, header_list: Iterable[tuple[str | bytes, str | bytes]], **identity: object
    ) -> RequestView:
        """Build from an HTTP/2 header list (pseudo-headers included) or HTTP/1.1 headers with `Host`."""
        pseudo: dict[str, str] = {}
        regular: list[tuple[str, str]] = []
        for raw_name, raw_value in header_list:
            name, value = _text(raw_name).lower(), _text(raw_value)
            if name.startswith(":"):
                pseudo[name] = value
            else:
                regular.append((name, value))
        headers = Headers(regular)
        authority = pseudo.get(":authority") or headers.get("host") or ""
        return cls(
            method=pseudo.get(":method", "GET"),
            path=pseudo.get(":path", "/"),
            authority=authority,
            scheme=pseudo.get(":scheme", "http"),
            headers=headers,
            **identity,  # type: ignore[arg-type]
        )

    # Cached: every route entry tried looks at the path (the dataclass is frozen, the cache is not).
    @cached_property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0]

    @cached_property
    def query_string(self) -> str:
        _, sep, query = self.path.partition("?")
        return query.split("#", 1)[0] if sep else ""

    @property
    def host(self) -> str:
        return split_authority(self.authority)[0]

    @property
    def authority_port(self) -> int | None:
        return split_authority(self.authority)[1]

    def query_params(self) -> list[tuple[str, str]]:
        """Query parameters, percent-decoded (`+` stays `+`, as in Envoy's query matcher)."""
        return list(self._query_params)

    @cached_property
    def _query_params(self) -> tuple[tuple[str, str], ...]:
        out = []
        for part in self.query_string.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            out.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
        return tuple(out)

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter `name` (names match exactly, case-sensitive)."""
        for n, v in self._query_params:
            if n == name:
                return v
        return None

    @property
    def is_grpc(self) -> bool:
        return (self.headers.get("content-type") or "").startswith("application/grpc")


def normalize_path(path: str, merge_slashes: bool = False) -> str:
    """RFC 3986 dot-segment removal on the path part, the query kept (Istio's default `BASE`
    normalization, done before routing and authorization so `/a/../admin` cannot dodge a policy)."""
    raw, sep, query = path.partition("?")
    if not raw.startswith("/"):
        raw = "/" + raw
    if merge_slashes:
        while "//" in raw:
            raw = raw.replace("//", "/")
    trailing = raw.endswith("/") or raw.endswith("/.") or raw.endswith("/..")
    norm = posixpath.normpath(raw)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if trailing and norm != "/":
        norm += "/"
    return norm + (sep + query if sep else "")


# --- matching ------------------------------------------------------------------------------------------


def _header_matches(cond: HeaderMatch, headers: Headers) -> bool:
    value = headers.joined(cond.name)
    hit = value is not None and (cond.matcher is None or cond.matcher.matches(value))
    return not hit if cond.invert else hit


def _query_matches(cond: QueryMatch, request: RequestView) -> bool:
    value = request.query_value(cond.name)
    if value is None:
        return False
    return cond.matcher is None or cond.matcher.matches(value)


def matches(match: RequestMatch | None, request: RequestView) -> bool:
    """Whether every condition of `match` holds for `request` (None matches everything)."""
    if match is None:
        return True
    if match.port is not None and request.destination_port != match.port:
        return False
    if match.source_namespace is not None and request.source_namespace != match.source_namespace:
        return False
    if match.path is not None and not match.path.matches(request.path_only):
        return False
    if match.method is not None and not match.method.matches(request.method):
        return False
    if match.scheme is not None and not match.scheme.matches(request.scheme):
        return False
    if match.authority is not None and not match.authority.matches(request.authority):
        return False
    headers = request.headers
    for cond in match.headers:
        if not _header_matches(cond, headers):
            return False
    return all(_query_matches(q, request) for q in match.query)


def find_entry(request: RequestView, table: RouteTable) -> RouteEntry | None:
    for entry in _applicable(request, table):
        if matches(entry.match, request):
            return entry
    return None


def _applicable(request: RequestView, table: RouteTable) -> Iterator[RouteEntry]:
    """Producer routes apply to every client, a consumer route only to clients of its namespace; a
    route attached to one Service port applies only to traffic for that port."""
    for entry in table.entries:
        if entry.port is not None and entry.port != request.destination_port:
            continue
        if entry.consumer_namespace is None or entry.consumer_namespace == request.source_namespace:
            yield entry


# --- decisions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteDecision:
    """Send `upstream` (the rewritten request) to `backend`; shadow it to `mirrors`; rewrite the
    response with `response_headers`. `retry` None means no retries; `timeout` None means none."""

    route_name: str
    entry: RouteEntry | None
    backend: Backend
    upstream: RequestView
    response_headers: HeaderMutation
    mirrors: tuple[Backend, ...] = ()
    timeout: float | None = None
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None

    def response(self, headers: Headers) -> Headers:
        return apply_mutation(headers, self.response_headers)


def route(
    request: RequestView, table: RouteTable, *, rng: random.Random | None = None
) -> RouteDecision | DirectResponse:
    """Route one request. Pure: `request` and `table` are not modified."""
    rng = rng or random.Random()
    if not any(True for _ in _applicable(request, table)):
        return _default_route(request, table)
    entry = find_entry(request, table)
    if entry is None:
        return no_route()
    return _apply(entry, request, rng)


def _default_route(request: RequestView, table: RouteTable) -> RouteDecision:
    backend = Backend(host=table.hostname, namespace=table.service.namespace, name=table.service.name,
                      port=request.destination_port)
    return RouteDecision(route_name="default", entry=None, backend=backend, upstream=request,
                         response_headers=HeaderMutation(), retry=DEFAULT_RETRY_POLICY)


def _apply(entry: RouteEntry, request: RequestView, rng: random.Random) -> RouteDecision | DirectResponse:
    action = entry.action
    if action.direct_response is not None:
        body = action.direct_response.body
        return LocalReply(action.direct_response.status, body, (), frozenset(), "direct_response")
    if action.redirect is not None:
        return redirect_reply(action.redirect, entry, request)
    backend = pick_backend(action, rng)
    if backend is None:
        # Every weight is 0: Istio answers 500 itself under Gateway API rules.
        if action.gateway_semantics:
            return LocalReply(500, b"", (), frozenset(), "direct_response")
        return cluster_not_found(503)
    if backend.invalid is not None:
        return cluster_not_found(backend.invalid_status)
    upstream = _rewrite(entry, action.rewrite, request)
    mutation = action.request_headers.then(backend.request_headers)
    headers = apply_mutation(upstream.headers, mutation)
    upstream = replace(upstream, headers=headers)
    mirrors = tuple(m.backend for m in action.mirrors if m.percent >= 100 or sampled(m.percent, rng))
    return RouteDecision(
        route_name=entry.name,
        entry=entry,
        backend=backend,
        upstream=upstream,
        response_headers=action.response_headers.then(backend.response_headers),
        mirrors=mirrors,
        timeout=action.timeout,
        retry=action.retry,
        fault=action.fault,
    )


def pick_backend(action: RouteAction, rng: random.Random) -> Backend | None:
    """Weighted choice: each backend gets weight/sum of requests; weight 0 gets none; None if all are 0."""
    live = [b for b in action.backends if b.weight > 0]
    total = sum(b.weight for b in live)
    if total <= 0:
        return None
    point = rng.randrange(total)
    for backend in live:
        point -= backend.weight
        if point < 0:
            return backend
    return live[-1]


def _matched_prefix(entry: RouteEntry) -> tuple[PathKind, str] | None:
    if entry.match is None or entry.match.path is None:
        return None
    return entry.match.path.kind, entry.match.path.value


def rewrite_path(path_only: str, rewrite: PathRewrite, matched: tuple[PathKind, str] | None) -> str:
    """The new path (without query) for a URLRewrite / Istio `rewrite.uri` / `uriRegexRewrite`."""
    if rewrite.kind is PathRewriteKind.FULL:
        return rewrite.value
    if rewrite.kind is PathRewriteKind.REGEX:
        return compile_re2(rewrite.pattern).sub(rewrite.value, path_only)
    kind, value = matched if matched is not None else (PathKind.STRING_PREFIX, "/")
    if kind is PathKind.PATH_PREFIX:
        # Element-wise: the matched prefix (trailing "/" ignored) is replaced; "/" as replacement strips it.
        prefix = value.rstrip("/")
        rest = path_only[len(prefix):]
        new = rewrite.value.rstrip("/") + rest
        return new or "/"
    if kind is PathKind.STRING_PREFIX:
        return rewrite.value + path_only[len(value):]
    return rewrite.value  # an exact or regex match: the whole path is what matched


def _rewrite(entry: RouteEntry, rewrite: Rewrite | None, request: RequestView) -> RequestView:
    if rewrite is None:
        return request
    out = request
    if rewrite.path is not None:
        new_path = rewrite_path(request.path_only, rewrite.path, _matched_prefix(entry))
        query = request.query_string
        headers = request.headers.copy()
        if new_path != request.path_only:
            # Envoy keeps the pre-rewrite path for access logs and the upstream.
            headers.set("x-envoy-original-path", request.path)
        out = replace(out, path=new_path + (f"?{query}" if query else ""), headers=headers)
    if rewrite.hostname is not None:
        out = replace(out, authority=rewrite.hostname)
    return out


_DEFAULT_PORTS = {"http": 80, "https": 443}


def redirect_location(redirect: Redirect, entry: RouteEntry | None, request: RequestView) -> str:
    """The `Location` of a redirect, as Envoy builds it (port omitted for http:80 and https:443)."""
    scheme = redirect.scheme or request.scheme
    host = redirect.hostname or request.host
    if redirect.port is not None:
        port: int | None = redirect.port
    elif redirect.scheme is not None and redirect.derive_port_from_scheme:
        port = _DEFAULT_PORTS.get(scheme)
    elif redirect.listener_port_fallback:
        port = request.authority_port or request.destination_port
    else:
        port = request.authority_port
    path = request.path_only
    if redirect.path is not None:
        path = rewrite_path(path, redirect.path, _matched_prefix(entry) if entry else None)
    query = request.query_string
    if "?" not in path and query:
        path = f"{path}?{query}"
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def redirect_reply(redirect: Redirect, entry: RouteEntry | None, request: RequestView) -> DirectResponse:
    location = redirect_location(redirect, entry, request)
    return LocalReply(redirect.status, b"", (("location", location),), frozenset(), "direct_response")


__all__ = [
    "DirectResponse",
    "Headers",
    "RequestView",
    "ResponseFlag",
    "RouteDecision",
    "apply_mutation",
    "find_entry",
    "matches",
    "normalize_path",
    "pick_backend",
    "redirect_location",
    "rewrite_path",
    "route",
]

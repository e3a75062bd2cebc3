"""The waypoint's internal route table: what HTTPRoute, GRPCRoute and VirtualService turn into.

One shape for all three sources, so the router has one code path: a `RouteTable` per Service holds
`RouteEntry`s in the order they are tried (Gateway API precedence already applied, or VirtualService
order), each a `RequestMatch` and a `RouteAction`. Everything is frozen: a config snapshot is shared by
all requests in flight while the loader builds the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from waypoint.config.regex import full_match
from waypoint.lb import LbPolicy
from waypoint.resilience.circuit import CircuitBreakerThresholds
from waypoint.resilience.fault import FaultPolicy
from waypoint.resilience.outlier import OutlierConfig
from waypoint.resilience.retry import RetryPolicy

DEFAULT_CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True, order=True)
class ServiceRef:
    """A Kubernetes Service by namespace and name (the GAMMA parent of a route)."""

    namespace: str
    name: str

    def hostname(self, domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
        return f"{self.name}.{self.namespace}.svc.{domain}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class ResourceRef:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


# --- matching ----------------------------------------------------------------------------------------


class MatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    REGEX = "regex"
    PRESENT = "present"


@dataclass(frozen=True)
class StringMatcher:
    """Envoy's StringMatcher: exact / prefix / suffix / RE2 full match / presence, optionally caseless."""

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False

    def matches(self, candidate: str | None) -> bool:
        if candidate is None:
            return False
        if self.kind is MatchKind.PRESENT:
            return True
        if self.kind is MatchKind.REGEX:
            return full_match(self.value, candidate, self.ignore_case)
        value, subject = self.value, candidate
        if self.ignore_case:
            value, subject = value.lower(), subject.lower()
        if self.kind is MatchKind.EXACT:
            return subject == value
        if self.kind is MatchKind.PREFIX:
            return subject.startswith(value)
        return subject.endswith(value)


class PathKind(StrEnum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"  # Gateway API: element-wise (Envoy path_separated_prefix)
    STRING_PREFIX = "Prefix"  # VirtualService `uri.prefix`: plain string prefix (Envoy prefix)
    REGEX = "RegularExpression"


@dataclass(frozen=True)
class PathMatch:
    kind: PathKind
    value: str
    ignore_case: bool = False

    def matches(self, path: str) -> bool:
        """`path` without the query string, as Envoy matches `:path`."""
        value, subject = self.value, path
        if self.kind is PathKind.REGEX:
            return full_match(value, subject, self.ignore_case)
        if self.ignore_case:
            value, subject = value.lower(), subject.lower()
        if self.kind is PathKind.EXACT:
            return subject == value
        if self.kind is PathKind.STRING_PREFIX:
            return subject.startswith(value)
        # Element-wise: "/abc" matches "/abc", "/abc/" and "/abc/x", not "/abcd". "/" matches all.
        prefix = value.rstrip("/")
        if not prefix:
            return True
        return subject.startswith(prefix) and (len(subject) == len(prefix) or subject[len(prefix)] == "/")

    @property
    def prefix_length(self) -> int:
        """The length Gateway API precedence compares (trailing `/` ignored, `/` itself counts 1)."""
        trimmed = self.value.rstrip("/")
        return len(trimmed) if trimmed else 1


@dataclass(frozen=True)
class HeaderMatch:
    """A header condition. `matcher` None means "present"; `invert` is VirtualService `withoutHeaders`."""

    name: str
    matcher: StringMatcher | None
    invert: bool = False


@dataclass(frozen=True)
class QueryMatch:
    name: str
    matcher: StringMatcher | None


@dataclass(frozen=True)
class RequestMatch:
    """All set conditions must hold (AND). None fields are not checked."""

    path: PathMatch | None = None
    method: StringMatcher | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    scheme: StringMatcher | None = None
    authority: StringMatcher | None = None
    port: int | None = None
    source_namespace: str | None = None


# --- actions -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderMutation:
    """Gateway API Request/ResponseHeaderModifier and Istio `headers.request/response`.

    Applied as Envoy applies a route's header rules: removals, then `set` (replace every value), then
    `add` (append another value).
    """

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)

    def then(self, other: HeaderMutation) -> HeaderMutation:
        """This mutation followed by `other` (rule-level first, then backend-level)."""
        return HeaderMutation(self.set + other.set, self.add + other.add, self.remove + other.remove)


NO_MUTATION = HeaderMutation()


class PathRewriteKind(StrEnum):
    FULL = "ReplaceFullPath"
    PREFIX = "ReplacePrefixMatch"
    REGEX = "RegexRewrite"


@dataclass(frozen=True)
class PathRewrite:
    kind: PathRewriteKind
    value: str
    pattern: str = ""  # REGEX only: RE2 pattern; `value` is the substitution (\1 style)


@dataclass(frozen=True)
class Redirect:
    """A RequestRedirect / VirtualService redirect. None fields keep the request's value."""

    status: int = 302
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathRewrite | None = None
    derive_port_from_scheme: bool = True  # Gateway API: an unset port follows a set scheme
    listener_port_fallback: bool = True  # Gateway API: no port in Host -> the port the client addressed


@dataclass(frozen=True)
class Rewrite:
    hostname: str | None = None
    path: PathRewrite | None = None


@dataclass(frozen=True)
class Backend:
    """A weighted destination of a rule. `host` is the FQDN the cluster is keyed on.

    `invalid` carries why the reference cannot be used (wrong kind, no ReferenceGrant, unknown subset);
    its share of the traffic gets `invalid_status` (500 under Gateway API rules, 503 NC for Istio's).
    """

    host: str
    namespace: str
    name: str
    port: int | None = None
    subset: str | None = None
    weight: int = 1
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION
    invalid: str | None = None
    invalid_status: int = 500

    @property
    def cluster_name(self) -> str:
        """Istio's waypoint cluster name, as access logs show it."""
        subset = f"http/{self.subset}" if self.subset else "http"
        return f"inbound-vip|{self.port or 0}|{subset}|{self.host}"


@dataclass(frozen=True)
class Mirror:
    backend: Backend
    percent: float = 100.0


@dataclass(frozen=True)
class DirectResponseSpec:
    status: int
    body: bytes = b""


@dataclass(frozen=True)
class RouteAction:
    backends: tuple[Backend, ...] = ()
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    direct_response: DirectResponseSpec | None = None
    mirrors: tuple[Mirror, ...] = ()
    timeout: float | None = None
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    gateway_semantics: bool = True  # 500 for zero weights / invalid backends (Gateway API) vs Istio's 503


@dataclass(frozen=True)
class RouteEntry:
    """One (rule, match) pair, tried in table order. `match` None matches everything."""

    name: str
    source: ResourceRef
    match: RequestMatch | None
    action: RouteAction
    consumer_namespace: str | None = None
    rule_index: int = 0
    match_index: int = 0
    port: int | None = None  # GAMMA parentRef port: the entry exists only for traffic to this Service port


class TableKind(StrEnum):
    DEFAULT = "default"  # nothing attached: plain L7 load balancing to the Service itself
    GATEWAY = "gateway"  # HTTPRoute / GRPCRoute
    ISTIO = "istio"  # VirtualService


@dataclass(frozen=True)
class RouteTable:
    service: ServiceRef
    hostname: str
    entries: tuple[RouteEntry, ...] = ()
    kind: TableKind = TableKind.DEFAULT

    @property
    def has_routes(self) -> bool:
        return self.kind is not TableKind.DEFAULT


# --- per-cluster policy (DestinationRule) ---------------------------------------------------------


@dataclass(frozen=True)
class ClusterPolicy:
    """What a DestinationRule says about one upstream cluster (host, port, subset), merged."""

    lb: LbPolicy = field(default_factory=LbPolicy)
    thresholds: CircuitBreakerThresholds = field(default_factory=CircuitBreakerThresholds)
    outlier: OutlierConfig | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    subset_labels: Mapping[str, str] = field(default_factory=dict)
    retry_budget_percent: float | None = None
    retry_budget_min_concurrency: int = 3


DEFAULT_CLUSTER_POLICY = ClusterPolicy()

"""The mesh's in-memory vocabulary: workloads, services and L4 authorization policies.

These mirror ztunnel's workload API (the `Address`/`Authorization` xDS types and its local config file) so
that a file or a control plane written for ztunnel means the same thing here. Everything is frozen: a
snapshot of the mesh is shared by many connections and tasks at once and must never change under them;
an update builds new objects and swaps the whole snapshot (see `store.py`).

Two extensions beyond ztunnel's model, both optional:
- `Workload.labels`: the pod's labels, so selector-based AuthorizationPolicies translated here (not by a
  control plane) can be matched to workloads.
- `Workload.netns`: the path of the pod's network namespace when the mesh runs in a netns lab, so the
  agent knows where to create that pod's listeners.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_ROOT_NAMESPACE = "istio-system"
HBONE_PORT = 15008

_EMPTY: Mapping[Any, Any] = MappingProxyType({})


def frozen_map(value: Mapping[Any, Any] | None) -> Mapping[Any, Any]:
    """A read-only copy, so a snapshot cannot be edited behind the back of the connections using it."""
    if not value:
        return _EMPTY
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(dict(value))


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# --- enums (values are the spellings of ztunnel's serde form) -------------------------------------


class Protocol(StrEnum):
    """How a workload accepts mesh traffic: HBONE tunnels, or plain TCP (not in the mesh)."""

    HBONE = "HBONE"
    TCP = "TCP"


class HealthStatus(StrEnum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class NetworkMode(StrEnum):
    STANDARD = "Standard"
    HOST_NETWORK = "HostNetwork"


class Scope(StrEnum):
    """Which workloads an Authorization applies to (istiod's conversion of an AuthorizationPolicy)."""

    GLOBAL = "Global"
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class LoadBalancerMode(StrEnum):
    STANDARD = "Standard"
    STRICT = "Strict"
    FAILOVER = "Failover"
    PASSTHROUGH = "Passthrough"


class HealthPolicy(StrEnum):
    ONLY_HEALTHY = "OnlyHealthy"
    ALLOW_ALL = "AllowAll"


class RoutingPreference(StrEnum):
    REGION = "Region"
    ZONE = "Zone"
    SUBZONE = "Subzone"
    NODE = "Node"
    CLUSTER = "Cluster"
    NETWORK = "Network"


class IpFamily(StrEnum):
    DUAL = "Dual"
    IPV4 = "IPv4"
    IPV6 = "IPv6"


# --- addresses --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkAddress:
    """An IP within a network: the same IP on two networks is two different endpoints."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True)
class GatewayAddress:
    """Where a waypoint or network gateway is reached: by address, or by service hostname (preferred,
    because the hostname adapts to the caller's IP family)."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = HBONE_PORT


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True)
class ApplicationTunnel:
    """How the destination app wants to receive tunnelled traffic: raw (NONE) or with a PROXY v2 header."""

    protocol: str = "NONE"
    port: int | None = None


# --- workloads and services -------------------------------------------------------------------------


def spiffe_identity(trust_domain: str, namespace: str, service_account: str) -> str:
    td = trust_domain or DEFAULT_TRUST_DOMAIN
    return f"spiffe://{td}/ns/{namespace}/sa/{service_account or DEFAULT_SERVICE_ACCOUNT}"


@dataclass(frozen=True)
class Workload:
    """One pod (or VM) the mesh knows. `services` maps "ns/hostname" to {service port: target port}."""

    uid: str
    name: str
    namespace: str
    workload_ips: tuple[IPAddress, ...] = ()
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    protocol: Protocol = Protocol.TCP
    node: str = ""
    network: str = ""
    trust_domain: str = ""
    cluster_id: str = ""
    hostname: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = ""
    services: Mapping[str, Mapping[int, int]] = field(default_factory=lambda: _EMPTY, hash=False)
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.HEALTHY
    network_mode: NetworkMode = NetworkMode.STANDARD
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    locality: Locality = Locality()
    capacity: int = 1
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    netns: str | None = None

    def __post_init__(self) -> None:
        _set(self, "workload_ips", tuple(ipaddress.ip_address(ip) for ip in self.workload_ips))
        _set(self, "protocol", Protocol(self.protocol))
        _set(self, "status", HealthStatus(self.status))
        _set(self, "network_mode", NetworkMode(self.network_mode))
        _set(self, "authorization_policies", tuple(self.authorization_policies))
        _set(self, "labels", frozen_map(self.labels))
        _set(
            self,
            "services",
            frozen_map({k: frozen_map({int(p): int(t) for p, t in v.items()}) for k, v in self.services.items()}),
        )
        if not self.service_account:
            _set(self, "service_account", DEFAULT_SERVICE_ACCOUNT)

    @property
    def identity(self) -> str:
        """The SPIFFE ID its certificate carries: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.

        A string rather than `mesh.identity.SpiffeId` so this model has no dependency on the identity
        package; `spiffe_id()` gives the typed form when that package is installed.
        """
        return spiffe_identity(self.trust_domain, self.namespace, self.service_account)

    def spiffe_id(self) -> Any:
        from mesh.identity import SpiffeId  # imported late: optional at this layer

        return SpiffeId.parse(self.identity)

    @property
    def in_mesh(self) -> bool:
        return self.protocol is Protocol.HBONE


@dataclass(frozen=True)
class LoadBalancer:
    routing_preferences: tuple[RoutingPreference, ...] = ()
    mode: LoadBalancerMode = LoadBalancerMode.STANDARD
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


@dataclass(frozen=True)
class Service:
    """A virtual destination: VIPs and ports in front of the workloads that name it in `services`."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: Mapping[int, int] = field(default_factory=lambda: _EMPTY, hash=False)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancer: LoadBalancer | None = None
    ip_families: IpFamily | None = None
    canonical: bool = False

    def __post_init__(self) -> None:
        _set(self, "vips", tuple(self.vips))
        _set(self, "subject_alt_names", tuple(self.subject_alt_names))
        _set(self, "ports", frozen_map({int(p): int(t) for p, t in self.ports.items()}))

    @property
    def key(self) -> str:
        """ztunnel's resource name for a service: "namespace/hostname"."""
        return f"{self.namespace}/{self.hostname}"

    def accepts(self, status: HealthStatus) -> bool:
        """Whether an endpoint with this health receives traffic (unhealthy only with AllowAll)."""
        if status is HealthStatus.HEALTHY:
            return True
        return self.load_balancer is not None and self.load_balancer.health_policy is HealthPolicy.ALLOW_ALL


@dataclass(frozen=True)
class Endpoint:
    """A workload behind a service, with the port mapping it declared for that service."""

    workload_uid: str
    ports: Mapping[int, int] = field(default_factory=lambda: _EMPTY, hash=False)
    status: HealthStatus = HealthStatus.HEALTHY

    def __post_init__(self) -> None:
        _set(self, "ports", frozen_map(self.ports))


# --- authorization ----------------------------------------------------------------------------------


class MatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(MatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(MatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(MatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(MatchKind.PRESENCE, "")

    @classmethod
    def from_istio(cls, value: str) -> StringMatch:
        """Istio's wildcard spelling: `*` any non-empty value, `*x` ends with x, `x*` starts with x."""
        if value == "*":
            return cls.presence()
        if value.startswith("*"):
            return cls.suffix(value[1:])
        if value.endswith("*"):
            return cls.prefix(value[:-1])
        return cls.exact(value)

    def matches(self, candidate: str) -> bool:
        match self.kind:
            case MatchKind.EXACT:
                return candidate == self.value
            case MatchKind.PREFIX:
                return candidate.startswith(self.value)
            case MatchKind.SUFFIX:
                return candidate.endswith(self.value)
            case _:
                return candidate != ""

    def __str__(self) -> str:
        match self.kind:
            case MatchKind.EXACT:
                return self.value
            case MatchKind.PREFIX:
                return f"{self.value}*"
            case MatchKind.SUFFIX:
                return f"*{self.value}"
            case _:
                return "*"


SPIFFE_SCHEME = "spiffe://"


def principal_match(value: str) -> StringMatch:
    """A principal pattern as Istio spells it (`cluster.local/ns/x/sa/y`, wildcards allowed).

    ztunnel compares principals with the `spiffe://` scheme removed from the peer's identity. Users
    also write the full SPIFFE ID; that form is accepted by dropping the scheme from the pattern, so both
    spellings of the same principal behave the same.
    """
    if value.startswith(SPIFFE_SCHEME):
        value = value[len(SPIFFE_SCHEME) :]
    return StringMatch.from_istio(value)


def normalize_principal(m: StringMatch) -> StringMatch:
    if m.kind in (MatchKind.EXACT, MatchKind.PREFIX) and m.value.startswith(SPIFFE_SCHEME):
        return StringMatch(m.kind, m.value[len(SPIFFE_SCHEME) :])
    return m


@dataclass(frozen=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def _networks(values: Iterable[Any]) -> tuple[IPNetwork, ...]:
    return tuple(
        v if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network) else ipaddress.ip_network(v, strict=False)
        for v in values
    )


@dataclass(frozen=True, repr=False)
class Match:
    """One alternative in a clause. Values of one field are ORed; the set fields are ANDed; each `not_`
    field requires that none of its values match. A Match with no field set matches nothing."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("namespaces", "not_namespaces", "service_accounts", "not_service_accounts"):
            _set(self, name, tuple(getattr(self, name)))
        for name in ("principals", "not_principals"):
            _set(self, name, tuple(normalize_principal(m) for m in getattr(self, name)))
        for name in ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips"):
            _set(self, name, _networks(getattr(self, name)))
        for name in ("destination_ports", "not_destination_ports"):
            _set(self, name, tuple(int(p) for p in getattr(self, name)))

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in MATCH_FIELDS)

    def __repr__(self) -> str:
        parts = []
        for name in MATCH_FIELDS:
            values = getattr(self, name)
            if values:
                parts.append(f"{name}=[{', '.join(str(v) for v in values)}]")
        return f"Match({', '.join(parts)})"


MATCH_FIELDS: tuple[str, ...] = (
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "principals",
    "not_principals",
    "source_ips",
    "not_source_ips",
    "destination_ips",
    "not_destination_ips",
    "destination_ports",
    "not_destination_ports",
)

Clause: TypeAlias = tuple[Match, ...]
Rule: TypeAlias = tuple[Clause, ...]


@dataclass(frozen=True)
class Authorization:
    """An L4 policy as ztunnel enforces it: rules ORed, a rule's clauses ANDed, a clause's matches ORed.

    No rules at all matches nothing (so an ALLOW with no rules allows nothing); a rule with no clauses
    matches everything. `selector` is set only for WorkloadSelector policies translated here from Istio
    YAML: the store uses it to find the workloads the policy applies to (a control plane would instead
    list the policy in each workload's `authorization_policies`).
    """

    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    selector: Mapping[str, str] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        _set(self, "scope", Scope(self.scope))
        _set(self, "action", Action(self.action))
        _set(self, "rules", tuple(tuple(tuple(clause) for clause in rule) for rule in self.rules))
        if self.selector is not None:
            _set(self, "selector", frozen_map(self.selector))

    @property
    def key(self) -> str:
        """ztunnel's resource name for a policy: "namespace/name"."""
        return f"{self.namespace}/{self.name}"

    def selects(self, workload: Workload, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> bool:
        """Whether this selector policy applies to `workload` by labels (same namespace, or any namespace
        when the policy lives in the root namespace, as in Istio)."""
        if self.scope is not Scope.WORKLOAD_SELECTOR or self.selector is None:
            return False
        if self.namespace != workload.namespace and self.namespace != root_namespace:
            return False
        return all(workload.labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True)
class ConfigSet:
    """What one config source contributes to the mesh state: the unit a source replaces atomically."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()

    def __post_init__(self) -> None:
        _set(self, "workloads", tuple(self.workloads))
        _set(self, "services", tuple(self.services))
        _set(self, "policies", tuple(self.policies))

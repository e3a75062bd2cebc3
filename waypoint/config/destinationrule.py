"""DestinationRule (networking.istio.io/v1): load balancing, circuit breaking, outlier detection, subsets.

A DestinationRule describes the upstream *clusters* of one host. Istio merges its levels field by field:
a subset's `trafficPolicy` overrides the top-level one for each of `loadBalancer`, `connectionPool` and
`outlierDetection` it sets, and `portLevelSettings` override them again for one port. Defaults are
Istio's: LEAST_REQUEST, 2^32-1 for every circuit-breaker ceiling, 10s connect timeout, and outlier
detection only when the stanza is present (5 consecutive 5xx, 10s interval, 30s base ejection, 10%).
`tls` is ignored (the mesh's HBONE tunnel is always mutual TLS); `tunnel` and `proxyProtocol` are
rejected; locality settings and warmup are accepted and ignored with a warning.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import Field, ValidationError

from waypoint.config.common import HeaderName, IstioDuration, IstioDurationOrZero, Metadata, Port, Strict, one_of
from waypoint.config.errors import FieldError, ResourceError, problems_from
from waypoint.config.model import DEFAULT_CLUSTER_DOMAIN, ClusterPolicy, ResourceRef
from waypoint.config.virtualservice import qualify
from waypoint.lb import HashPolicy, LbKind, LbPolicy, is_prime
from waypoint.resilience.circuit import UNLIMITED, CircuitBreakerThresholds
from waypoint.resilience.outlier import OutlierConfig

U32 = Annotated[int, Field(ge=0, le=UNLIMITED)]


class CookieSpec(Strict):
    name: Annotated[str, Field(min_length=1)]
    path: str | None = None
    ttl: IstioDurationOrZero | None = None
    attributes: list[Any] = Field(default_factory=list)


class RingHashSpec(Strict):
    minimum_ring_size: Annotated[int, Field(ge=1, le=8 * 1024 * 1024)] | None = None


class MaglevSpec(Strict):
    table_size: Annotated[int, Field(ge=3)] | None = None


class ConsistentHashSpec(Strict):
    http_header_name: HeaderName | None = None
    http_cookie: CookieSpec | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHashSpec | None = None
    maglev: MaglevSpec | None = None
    minimum_ring_size: Annotated[int, Field(ge=1)] | None = None


class LoadBalancerSpec(Strict):
    simple: Annotated[str, one_of("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN",
                                  "LEAST_REQUEST")] | None = None
    consistent_hash: ConsistentHashSpec | None = None
    locality_lb_setting: Any = None
    warmup_duration_secs: Any = None
    warmup: Any = None


class TcpPoolSpec(Strict):
    max_connections: U32 | None = None
    connect_timeout: IstioDuration | None = None
    tcp_keepalive: Any = None
    max_connection_duration: IstioDuration | None = None
    idle_timeout: IstioDuration | None = None


class HttpPoolSpec(Strict):
    http1_max_pending_requests: U32 | None = Field(default=None, alias="http1MaxPendingRequests")
    http2_max_requests: U32 | None = Field(default=None, alias="http2MaxRequests")
    max_requests_per_connection: U32 | None = None
    max_retries: U32 | None = None
    idle_timeout: IstioDuration | None = None
    h2_upgrade_policy: Annotated[str, one_of("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")] | None = Field(
        default=None, alias="h2UpgradePolicy")
    use_client_protocol: bool | None = None
    max_concurrent_streams: U32 | None = None


class ConnectionPoolSpec(Strict):
    tcp: TcpPoolSpec | None = None
    http: HttpPoolSpec | None = None


class OutlierSpec(Strict):
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: U32 | None = None
    consecutive_gateway_errors: U32 | None = None
    consecutive_5xx_errors: U32 | None = Field(default=None, alias="consecutive5xxErrors")
    consecutive_errors: U32 | None = None
    interval: IstioDuration | None = None
    base_ejection_time: IstioDuration | None = None
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    min_health_percent: Annotated[int, Field(ge=0, le=100)] | None = None


class RetryBudgetPercent(Strict):
    value: Annotated[float, Field(ge=0, le=100)]


class RetryBudgetSpec(Strict):
    percent: RetryBudgetPercent | None = None
    min_retry_concurrency: U32 | None = None


class PortSelector(Strict):
    number: Port


class PortPolicySpec(Strict):
    port: PortSelector
    load_balancer: LoadBalancerSpec | None = None
    connection_pool: ConnectionPoolSpec | None = None
    outlier_detection: OutlierSpec | None = None
    tls: Any = None


class TrafficPolicySpec(Strict):
    load_balancer: LoadBalancerSpec | None = None
    connection_pool: ConnectionPoolSpec | None = None
    outlier_detection: OutlierSpec | None = None
    tls: Any = None
    port_level_settings: list[PortPolicySpec] = Field(default_factory=list)
    tunnel: Any = None
    proxy_protocol: Any = None
    retry_budget: RetryBudgetSpec | None = None


class SubsetSpec(Strict):
    name: Annotated[str, Field(min_length=1)]
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicySpec | None = None


class DestinationRuleSpec(Strict):
    host: Annotated[str, Field(min_length=1)]
    traffic_policy: TrafficPolicySpec | None = None
    subsets: list[SubsetSpec] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: Any = None


class DestinationRuleDoc(Strict):
    api_version: str
    kind: str
    metadata: Metadata
    spec: DestinationRuleSpec
    status: Any = None


# --- translation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyParts:
    """The fields one level of a DestinationRule sets (None: not set at this level)."""

    lb: LbPolicy | None = None
    pool: tuple[CircuitBreakerThresholds, float | None, float | None] | None = None
    outlier: OutlierConfig | None = None
    retry_budget: tuple[float, int] | None = None

    def over(self, base: PolicyParts) -> PolicyParts:
        return PolicyParts(self.lb or base.lb, self.pool or base.pool, self.outlier or base.outlier,
                           self.retry_budget or base.retry_budget)


@dataclass(frozen=True)
class LevelPolicy:
    parts: PolicyParts = field(default_factory=PolicyParts)
    ports: dict[int, PolicyParts] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedDestinationRule:
    ref: ResourceRef
    created: dt.datetime | None
    host: str
    top: LevelPolicy
    subsets: dict[str, tuple[dict[str, str], LevelPolicy]]
    warnings: tuple[str, ...] = ()

    def cluster_policy(self, port: int | None, subset: str | None) -> ClusterPolicy | None:
        """The merged policy for one cluster; None when `subset` is not defined here."""
        parts = self.top.parts
        if port is not None and port in self.top.ports:
            parts = self.top.ports[port].over(parts)
        labels: dict[str, str] = {}
        if subset is not None:
            if subset not in self.subsets:
                return None
            labels, level = self.subsets[subset]
            parts = level.parts.over(parts)
            if port is not None and port in level.ports:
                parts = level.ports[port].over(parts)
        return to_cluster_policy(parts, labels)


def to_cluster_policy(parts: PolicyParts, labels: dict[str, str]) -> ClusterPolicy:
    policy = ClusterPolicy(subset_labels=dict(labels))
    if parts.lb is not None:
        policy = replace(policy, lb=parts.lb)
    if parts.pool is not None:
        thresholds, connect_timeout, idle = parts.pool
        policy = replace(policy, thresholds=thresholds)
        if connect_timeout is not None:
            policy = replace(policy, connect_timeout=connect_timeout)
        if idle is not None:
            policy = replace(policy, idle_timeout=idle)
    if parts.outlier is not None:
        policy = replace(policy, outlier=parts.outlier)
    if parts.retry_budget is not None:
        policy = replace(policy, retry_budget_percent=parts.retry_budget[0],
                         retry_budget_min_concurrency=parts.retry_budget[1])
    return policy


def _lb(spec: LoadBalancerSpec | None, where: str, warnings: list[str]) -> LbPolicy | None:
    if spec is None:
        return None
    if spec.locality_lb_setting is not None:
        warnings.append(f"{where}.localityLbSetting: ignored (single-locality waypoint)")
    if spec.warmup_duration_secs is not None or spec.warmup is not None:
        warnings.append(f"{where}.warmup: ignored")
    if spec.simple is not None and spec.consistent_hash is not None:
        raise FieldError(where, "set only one of simple and consistentHash")
    if spec.consistent_hash is None:
        kind = {None: LbKind.LEAST_REQUEST, "UNSPECIFIED": LbKind.LEAST_REQUEST, "LEAST_CONN": LbKind.LEAST_REQUEST,
                "LEAST_REQUEST": LbKind.LEAST_REQUEST, "RANDOM": LbKind.RANDOM, "ROUND_ROBIN": LbKind.ROUND_ROBIN,
                "PASSTHROUGH": LbKind.PASSTHROUGH}[spec.simple]
        return LbPolicy(kind=kind)
    ch = spec.consistent_hash
    cw = f"{where}.consistentHash"
    keys = [k for k, v in (("httpHeaderName", ch.http_header_name), ("httpCookie", ch.http_cookie),
                           ("useSourceIp", ch.use_source_ip), ("httpQueryParameterName", ch.http_query_parameter_name))
            if v]
    if len(keys) != 1:
        raise FieldError(cw, "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName")
    if ch.ring_hash is not None and ch.maglev is not None:
        raise FieldError(cw, "set only one of ringHash and maglev")
    hash_policy = HashPolicy(
        header=ch.http_header_name.lower() if ch.http_header_name else None,
        cookie=ch.http_cookie.name if ch.http_cookie else None,
        cookie_path=ch.http_cookie.path if ch.http_cookie else None,
        cookie_ttl=ch.http_cookie.ttl if ch.http_cookie else None,
        source_ip=bool(ch.use_source_ip),
        query_parameter=ch.http_query_parameter_name,
    )
    if ch.maglev is not None:
        size = ch.maglev.table_size or 65537
        if not is_prime(size):
            raise FieldError(f"{cw}.maglev.tableSize", "must be a prime number")
        return LbPolicy(kind=LbKind.MAGLEV, hash_policy=hash_policy, maglev_table_size=size)
    ring = (ch.ring_hash.minimum_ring_size if ch.ring_hash else None) or ch.minimum_ring_size or 1024
    return LbPolicy(kind=LbKind.RING_HASH, hash_policy=hash_policy, minimum_ring_size=ring)


def _pool(spec: ConnectionPoolSpec | None) -> tuple[CircuitBreakerThresholds, float | None, float | None] | None:
    if spec is None:
        return None
    tcp = spec.tcp or TcpPoolSpec()
    http = spec.http or HttpPoolSpec()

    def pick(value: int | None) -> int:
        return UNLIMITED if value is None else value

    thresholds = CircuitBreakerThresholds(
        max_connections=pick(tcp.max_connections),
        max_pending_requests=pick(http.http1_max_pending_requests),
        max_requests=pick(http.http2_max_requests),
        max_retries=pick(http.max_retries),
        max_requests_per_connection=http.max_requests_per_connection or 0,
        max_concurrent_streams=http.max_concurrent_streams,
    )
    return thresholds, tcp.connect_timeout, http.idle_timeout or tcp.idle_timeout


def _outlier(spec: OutlierSpec | None, where: str) -> OutlierConfig | None:
    if spec is None:
        return None
    five = spec.consecutive_5xx_errors if spec.consecutive_5xx_errors is not None else 5
    gateway = spec.consecutive_gateway_errors or spec.consecutive_errors or 0
    base = spec.base_ejection_time or 30.0
    try:
        return OutlierConfig(
            consecutive_5xx=five,
            consecutive_gateway_errors=gateway,
            consecutive_local_origin_failures=spec.consecutive_local_origin_failures or 5,
            split_external_local_origin_errors=bool(spec.split_external_local_origin_errors),
            interval=spec.interval or 10.0,
            base_ejection_time=base,
            max_ejection_time=max(300.0, base),
            max_ejection_percent=float(spec.max_ejection_percent if spec.max_ejection_percent is not None else 10),
            min_health_percent=float(spec.min_health_percent or 0),
        )
    except ValueError as exc:
        raise FieldError(where, str(exc)) from None


def _parts(spec: TrafficPolicySpec | PortPolicySpec, where: str, warnings: list[str]) -> PolicyParts:
    if spec.tls is not None:
        warnings.append(f"{where}.tls: ignored (the mesh tunnel is always mutual TLS)")
    budget = None
    if isinstance(spec, TrafficPolicySpec):
        if spec.tunnel is not None:
            raise FieldError(f"{where}.tunnel", "tunnel settings are not supported by this waypoint")
        if spec.proxy_protocol is not None:
            raise FieldError(f"{where}.proxyProtocol", "PROXY protocol is not supported by this waypoint")
        if spec.retry_budget is not None:
            rb = spec.retry_budget
            budget = (rb.percent.value if rb.percent else 20.0,
                      rb.min_retry_concurrency if rb.min_retry_concurrency is not None else 3)
    pool = spec.connection_pool
    if pool is not None:
        unenforced = [name for name, value in (
            ("tcp.maxConnectionDuration", pool.tcp and pool.tcp.max_connection_duration),
            ("tcp.tcpKeepalive", pool.tcp and pool.tcp.tcp_keepalive),
            ("http.h2UpgradePolicy", pool.http and pool.http.h2_upgrade_policy),
            ("http.useClientProtocol", pool.http and pool.http.use_client_protocol)) if value is not None]
        warnings.extend(f"{where}.connectionPool.{name}: accepted but not enforced by this waypoint"
                        for name in unenforced)
    return PolicyParts(lb=_lb(spec.load_balancer, f"{where}.loadBalancer", warnings),
                       pool=_pool(spec.connection_pool),
                       outlier=_outlier(spec.outlier_detection, f"{where}.outlierDetection"),
                       retry_budget=budget)


def _level(spec: TrafficPolicySpec | None, where: str, warnings: list[str]) -> LevelPolicy:
    if spec is None:
        return LevelPolicy()
    ports: dict[int, PolicyParts] = {}
    for i, p in enumerate(spec.port_level_settings):
        pw = f"{where}.portLevelSettings[{i}]"
        if p.port.number in ports:
            raise FieldError(f"{pw}.port.number", f"port {p.port.number} appears more than once")
        ports[p.port.number] = _parts(p, pw, warnings)
    return LevelPolicy(_parts(spec, where, warnings), ports)


def parse_destinationrule(doc: Any, domain: str = DEFAULT_CLUSTER_DOMAIN) -> ParsedDestinationRule:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    label = "DestinationRule {}/{}".format(
        (meta.get("namespace") or "default") if isinstance(meta, dict) else "default",
        meta.get("name", "?") if isinstance(meta, dict) else "?")
    try:
        parsed = DestinationRuleDoc.model_validate(doc)
    except ValidationError as exc:
        raise ResourceError(label, problems_from(exc, frozenset({"labels"}))) from None
    ns = parsed.metadata.namespace
    ref = ResourceRef("DestinationRule", ns, parsed.metadata.name)
    warnings: list[str] = []
    spec = parsed.spec
    try:
        if spec.workload_selector is not None:
            warnings.append("spec.workloadSelector: ignored (applies to sidecars)")
        top = _level(spec.traffic_policy, "spec.trafficPolicy", warnings)
        subsets: dict[str, tuple[dict[str, str], LevelPolicy]] = {}
        for i, s in enumerate(spec.subsets):
            sw = f"spec.subsets[{i}]"
            if s.name in subsets:
                raise FieldError(f"{sw}.name", f"subset {s.name!r} is defined more than once")
            subsets[s.name] = (dict(s.labels), _level(s.traffic_policy, f"{sw}.trafficPolicy", warnings))
        host = qualify(spec.host, ns, domain)
    except FieldError as exc:
        raise ResourceError(str(ref), [(exc.path, exc.message)]) from None
    return ParsedDestinationRule(ref=ref, created=parsed.metadata.created(), host=host, top=top, subsets=subsets,
                                 warnings=tuple(warnings))

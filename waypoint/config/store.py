"""The waypoint's config store: apply resources one by one, keep the last good version of each, and
assemble immutable snapshots (route tables per Service, cluster policies, bound authorization policies).

A resource that fails validation is refused with a message naming the field; if an earlier version of
it was accepted, that version stays in force (the waypoint never drops to "no policy" because of a
typo). The same `apply` serves files (`waypoint.config.files`) and the Kubernetes watch (`on_event`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from waypoint.authz import AuthzPolicy
from waypoint.config.authorizationpolicy import ParsedAuthorizationPolicy, parse_authorizationpolicy
from waypoint.config.destinationrule import ParsedDestinationRule, parse_destinationrule
from waypoint.config.errors import ResourceError
from waypoint.config.grpcroute import parse_grpcroute
from waypoint.config.httproute import parse_httproute
from waypoint.config.model import (
    DEFAULT_CLUSTER_DOMAIN,
    DEFAULT_CLUSTER_POLICY,
    Backend,
    ClusterPolicy,
    RequestMatch,
    ResourceRef,
    RouteEntry,
    RouteTable,
    ServiceRef,
    TableKind,
)
from waypoint.config.parsed import ParsedReferenceGrant, ParsedRoute, ParsedVirtualService
from waypoint.config.precedence import precedence_key
from waypoint.config.referencegrant import parse_referencegrant
from waypoint.config.virtualservice import parse_virtualservice

GATEWAY_GROUP = "gateway.networking.k8s.io"
ISTIO_NETWORKING = "networking.istio.io"
ISTIO_SECURITY = "security.istio.io"

# (group, kind) -> accepted versions. Other kinds in the same files (Deployments, Services) are ignored.
SUPPORTED: dict[tuple[str, str], tuple[str, ...]] = {
    (GATEWAY_GROUP, "HTTPRoute"): ("v1", "v1beta1"),
    (GATEWAY_GROUP, "GRPCRoute"): ("v1", "v1alpha2"),
    (GATEWAY_GROUP, "ReferenceGrant"): ("v1beta1", "v1alpha2", "v1"),
    (ISTIO_NETWORKING, "VirtualService"): ("v1", "v1beta1", "v1alpha3"),
    (ISTIO_NETWORKING, "DestinationRule"): ("v1", "v1beta1", "v1alpha3"),
    (ISTIO_SECURITY, "AuthorizationPolicy"): ("v1", "v1beta1"),
}


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # invalid; the previous good version (if any) stays
    IGNORED = "ignored"  # not a kind the waypoint uses
    DELETED = "deleted"


@dataclass(frozen=True)
class Condition:
    """A Kubernetes-style status condition."""

    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class ApplyResult:
    ref: ResourceRef | None
    outcome: Outcome
    message: str = ""
    warnings: tuple[str, ...] = ()
    kept_previous: bool = False
    error: ResourceError | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED

    def conditions(self) -> list[Condition]:
        if self.outcome is Outcome.ACCEPTED:
            msg = "; ".join(self.warnings) if self.warnings else "accepted by the waypoint"
            return [Condition("Accepted", "True", "Accepted", msg)]
        if self.outcome is Outcome.REJECTED:
            reason = "UnsupportedValue" if "not supported" in self.message else "Invalid"
            suffix = " (the previously accepted version stays in force)" if self.kept_previous else ""
            return [Condition("Accepted", "False", reason, self.message + suffix)]
        return []


@dataclass(frozen=True)
class WaypointIdentity:
    """Which waypoint this is: its Gateway's namespace and name (for targetRefs and route scoping)."""

    namespace: str
    name: str
    root_namespace: str = "istio-system"
    gateway_class: str = "istio-waypoint"


def _key(ref: ResourceRef) -> tuple[str, str, str]:
    return (ref.kind, ref.namespace, ref.name)


def _doc_ref(doc: Mapping[str, Any]) -> ResourceRef | None:
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(doc.get("kind"), str):
        return None
    name = meta.get("name")
    if not isinstance(name, str):
        return None
    return ResourceRef(doc["kind"], str(meta.get("namespace") or "default"), name)


class ConfigStore:
    def __init__(self, *, domain: str = DEFAULT_CLUSTER_DOMAIN, waypoint: WaypointIdentity | None = None) -> None:
        self.domain = domain
        self.waypoint = waypoint
        self._good: dict[tuple[str, str, str], Any] = {}
        self._results: dict[tuple[str, str, str], ApplyResult] = {}
        self._synced: set[tuple[str, str, str]] = set()
        self._version = 0
        self._snapshot: WaypointConfig | None = None

    # --- writes --------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Bumped on every change that can alter a snapshot."""
        return self._version

    def apply(self, doc: Any) -> ApplyResult:
        """Validate one resource document and, if valid, make it the version in force."""
        if not isinstance(doc, Mapping):
            return ApplyResult(None, Outcome.REJECTED, f"a resource must be a mapping, not {type(doc).__name__}")
        api = doc.get("apiVersion")
        kind = doc.get("kind")
        if not isinstance(api, str) or not isinstance(kind, str):
            return ApplyResult(None, Outcome.REJECTED, "apiVersion and kind are required strings")
        group, _, version = api.rpartition("/")
        versions = SUPPORTED.get((group, kind))
        ref = _doc_ref(doc)
        if versions is None:
            return ApplyResult(ref, Outcome.IGNORED, f"{api} {kind} is not used by the waypoint")
        if ref is None:
            return ApplyResult(None, Outcome.REJECTED, f"{kind}: metadata.name: required field is missing")
        if version not in versions:
            problem = ("apiVersion", f"{api} is not supported (use {group}/{versions[0]})")
            return self._reject(ref, ResourceError(str(ref), [problem]))
        try:
            parsed = self._parse(kind, dict(doc))
        except ResourceError as exc:
            return self._reject(ref, exc)
        self._good[_key(ref)] = parsed
        warnings = tuple(getattr(parsed, "warnings", ()))
        result = ApplyResult(ref, Outcome.ACCEPTED, f"{ref}: accepted", warnings)
        self._results[_key(ref)] = result
        self._changed()
        return result

    def _parse(self, kind: str, doc: dict[str, Any]) -> Any:
        if kind == "HTTPRoute":
            return parse_httproute(doc, self.domain)
        if kind == "GRPCRoute":
            return parse_grpcroute(doc, self.domain)
        if kind == "VirtualService":
            return parse_virtualservice(doc, self.domain)
        if kind == "DestinationRule":
            return parse_destinationrule(doc, self.domain)
        if kind == "AuthorizationPolicy":
            return parse_authorizationpolicy(doc)
        return parse_referencegrant(doc)

    def _reject(self, ref: ResourceRef, error: ResourceError) -> ApplyResult:
        kept = _key(ref) in self._good
        result = ApplyResult(ref, Outcome.REJECTED, str(error), kept_previous=kept, error=error)
        self._results[_key(ref)] = result
        return result

    def delete(self, kind: str, namespace: str, name: str) -> ApplyResult:
        ref = ResourceRef(kind, namespace, name)
        key = _key(ref)
        existed = self._good.pop(key, None) is not None
        self._results.pop(key, None)
        self._synced.discard(key)
        if existed:
            self._changed()
        return ApplyResult(ref, Outcome.DELETED, f"{ref}: deleted" if existed else f"{ref}: was not present")

    def apply_all(self, docs: Iterable[Any]) -> list[ApplyResult]:
        return [self.apply(d) for d in expand_lists(docs)]

    def sync(self, docs: Iterable[Any]) -> list[ApplyResult]:
        """Make the set of resources from a source (a config directory) exactly `docs`: apply each and
        delete what an earlier sync brought in and this one no longer has."""
        results = self.apply_all(docs)
        present = {_key(r.ref) for r in results if r.ref is not None and r.outcome is not Outcome.IGNORED}
        for key in sorted(self._synced - present):
            results.append(self.delete(*key))
        self._synced = {k for k in present if k in self._good}
        return results

    def on_event(self, event: Mapping[str, Any]) -> ApplyResult | None:
        """One Kubernetes watch event (`{"type": ..., "object": ...}`); BOOKMARKs give None."""
        kind = event.get("type")
        obj = event.get("object")
        if kind == "BOOKMARK":
            return None
        if kind == "ERROR" or not isinstance(obj, Mapping):
            message = obj.get("message", "") if isinstance(obj, Mapping) else ""
            return ApplyResult(None, Outcome.IGNORED, f"watch error event: {message}".strip())
        if kind == "DELETED":
            ref = _doc_ref(obj)
            if ref is None:
                return ApplyResult(None, Outcome.IGNORED, "DELETED event without kind/metadata.name")
            return self.delete(ref.kind, ref.namespace, ref.name)
        if kind in ("ADDED", "MODIFIED"):
            return self.apply(obj)
        return ApplyResult(None, Outcome.IGNORED, f"unknown watch event type {kind!r}")

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = None

    # --- reads ---------------------------------------------------------------------------------------

    def result(self, kind: str, namespace: str, name: str) -> ApplyResult | None:
        return self._results.get((kind, namespace, name))

    def results(self) -> list[ApplyResult]:
        return [self._results[k] for k in sorted(self._results)]

    def snapshot(self) -> WaypointConfig:
        """An immutable view of the config in force; the same object until the next change."""
        if self._snapshot is None:
            self._snapshot = WaypointConfig(self.domain, self.waypoint, dict(self._good), self._version)
        return self._snapshot


def expand_lists(docs: Iterable[Any]) -> list[Any]:
    """`kubectl get -o yaml` wraps objects in `kind: List`; unwrap (nested lists too)."""
    out: list[Any] = []
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, Mapping) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(expand_lists(doc["items"]))
        else:
            out.append(doc)
    return out


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def _created(value: dt.datetime | None) -> dt.datetime:
    return value or dt.datetime.max.replace(tzinfo=dt.UTC)


@dataclass
class WaypointConfig:
    """What the waypoint enforces right now. Tables are built on first use and cached."""

    domain: str
    waypoint: WaypointIdentity | None
    resources: dict[tuple[str, str, str], Any]
    version: int
    _tables: dict[ServiceRef, RouteTable] = field(default_factory=dict)
    conflicts: dict[ServiceRef, str] = field(default_factory=dict)

    def _of(self, *kinds: str) -> list[Any]:
        return [v for (k, _, _), v in sorted(self.resources.items()) if k in kinds]

    # --- routes --------------------------------------------------------------------------------------

    def route_table(self, service: ServiceRef) -> RouteTable:
        table = self._tables.get(service)
        if table is None:
            table = self._build_table(service)
            self._tables[service] = table
        return table

    def _grants(self) -> list[ParsedReferenceGrant]:
        return self._of("ReferenceGrant")

    def _permitted(self, route: ParsedRoute, backend: Backend) -> bool:
        if backend.namespace == route.ref.namespace:
            return True
        return any(g.ref.namespace == backend.namespace and g.permits(route.ref.kind, route.ref.namespace,
                                                                       "Service", backend.name)
                   for g in self._grants())

    def _check_backend(self, route: ParsedRoute, backend: Backend) -> Backend:
        if backend.invalid is None and not self._permitted(route, backend):
            return replace(backend, invalid=f"backend {backend.namespace}/{backend.name} is in another namespace "
                                            "and no ReferenceGrant there permits it", invalid_status=500)
        return backend

    def _build_table(self, service: ServiceRef) -> RouteTable:
        hostname = service.hostname(self.domain)
        consumer: list[tuple[tuple[object, ...], RouteEntry]] = []
        producer: list[tuple[tuple[object, ...], RouteEntry]] = []
        for route in self._of("HTTPRoute", "GRPCRoute"):
            for parent in route.parents:
                if parent.service != service:
                    continue
                is_consumer = route.ref.namespace != service.namespace
                for rule in route.rules:
                    action = rule.action
                    if rule.routes_to_parent:
                        action = replace(action, backends=(Backend(hostname, service.namespace, service.name,
                                                                   port=parent.port),))
                    action = replace(
                        action,
                        backends=tuple(self._check_backend(route, b) for b in action.backends),
                        mirrors=tuple(replace(m, backend=self._check_backend(route, m.backend))
                                      for m in action.mirrors),
                    )
                    matches: tuple[RequestMatch | None, ...] = rule.matches or (None,)
                    for mi, match in enumerate(matches):
                        key = precedence_key(match, route.created, route.ref, rule.index, mi)
                        name = rule.name or f"{route.ref.namespace}.{route.ref.name}.{rule.index}.{mi}"
                        entry = RouteEntry(name=name, source=route.ref, match=match, action=action,
                                           consumer_namespace=route.ref.namespace if is_consumer else None,
                                           rule_index=rule.index, match_index=mi, port=parent.port)
                        (consumer if is_consumer else producer).append((key, entry))
        if consumer or producer:
            if self._virtual_services_for(service, hostname):
                self.conflicts[service] = ("both HTTPRoute/GRPCRoute and VirtualService target this Service; "
                                           "the Gateway API routes are used and the VirtualService is ignored")
            entries = [e for _, e in sorted(consumer, key=lambda p: p[0])]
            entries += [e for _, e in sorted(producer, key=lambda p: p[0])]
            return RouteTable(service, hostname, tuple(entries), TableKind.GATEWAY)
        vss = self._virtual_services_for(service, hostname)
        if vss:
            return RouteTable(service, hostname, tuple(self._vs_entries(vss)), TableKind.ISTIO)
        return RouteTable(service, hostname, (), TableKind.DEFAULT)

    def _virtual_services_for(self, service: ServiceRef, hostname: str) -> list[ParsedVirtualService]:
        allowed_ns = {service.namespace}
        if self.waypoint is not None:
            allowed_ns.add(self.waypoint.namespace)
        found = [vs for vs in self._of("VirtualService")
                 if vs.ref.namespace in allowed_ns and any(_host_matches(h, hostname) for h in vs.hosts)]
        return sorted(found, key=lambda vs: (_created(vs.created), vs.ref.namespace, vs.ref.name))

    def _vs_entries(self, vss: list[ParsedVirtualService]) -> list[RouteEntry]:
        entries = []
        for vs in vss:
            for rule in vs.rules:
                action = replace(rule.action, backends=tuple(self._check_subset(b) for b in rule.action.backends))
                matches: tuple[RequestMatch | None, ...] = rule.matches or (None,)
                for mi, match in enumerate(matches):
                    name = rule.name or f"{vs.ref.namespace}.{vs.ref.name}.{rule.index}"
                    entries.append(RouteEntry(name=name, source=vs.ref, match=match, action=action,
                                              rule_index=rule.index, match_index=mi))
        return entries

    def _check_subset(self, backend: Backend) -> Backend:
        if backend.subset is None:
            return backend
        if self.cluster_policy(backend.host, backend.port, backend.subset) is None:
            return replace(backend, invalid=f"subset {backend.subset!r} of {backend.host} is not defined by any "
                                            "DestinationRule", invalid_status=503)
        return backend

    # --- clusters ------------------------------------------------------------------------------------

    def destination_rule(self, host: str) -> ParsedDestinationRule | None:
        """The DestinationRule for `host`: an exact host beats a wildcard, a longer wildcard a shorter one,
        and among equals the oldest wins (Istio's conflict rule)."""
        candidates = [dr for dr in self._of("DestinationRule") if _host_matches(dr.host, host)]
        if not candidates:
            return None

        def specificity(dr: ParsedDestinationRule) -> tuple[int, int, dt.datetime, str]:
            exact = 0 if dr.host == host else 1
            return (exact, -len(dr.host), _created(dr.created), f"{dr.ref.namespace}/{dr.ref.name}")

        return min(candidates, key=specificity)

    def cluster_policy(self, host: str, port: int | None = None, subset: str | None = None) -> ClusterPolicy | None:
        """Merged DestinationRule policy for one cluster; None when `subset` is not defined."""
        dr = self.destination_rule(host)
        if dr is None:
            return None if subset is not None else DEFAULT_CLUSTER_POLICY
        return dr.cluster_policy(port, subset)

    # --- authorization -------------------------------------------------------------------------------

    def authz_policies(self, service: ServiceRef) -> tuple[AuthzPolicy, ...]:
        """The L7 policies the waypoint enforces for traffic to `service`."""
        out = []
        for parsed in self._of("AuthorizationPolicy"):
            assert isinstance(parsed, ParsedAuthorizationPolicy)
            ns = parsed.policy.namespace
            for t in parsed.targets:
                if (t.kind == "Service" and ns == service.namespace and t.name == service.name) or (
                        self.waypoint is not None and (
                            (t.kind == "Gateway" and ns == self.waypoint.namespace and t.name == self.waypoint.name)
                            or (t.kind == "GatewayClass" and ns == self.waypoint.root_namespace
                                and t.name == self.waypoint.gateway_class))):
                    out.append(parsed.policy)
                    break
        return tuple(out)

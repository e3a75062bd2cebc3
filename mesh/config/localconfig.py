"""ztunnel's local config file (`workloads`/`services`/`policies`, camelCase), parsed strictly.

A file that ztunnel accepts is accepted here with the same meaning; unknown fields are refused (as serde's
`deny_unknown_fields` does) because a misspelt policy field silently ignored could open access. A few
fields ztunnel requires get defaults here (`services` of a workload, `dryRun`, `hboneMtlsPort` 15008),
and three extensions are accepted: `labels` and `netns` on a workload, `selector` on a policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainValidator

from mesh.config.errors import ConfigError
from mesh.config.model import (
    DEFAULT_SERVICE_ACCOUNT,
    Action,
    ApplicationTunnel,
    Authorization,
    ConfigSet,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IpFamily,
    LoadBalancer,
    LoadBalancerMode,
    Locality,
    Match,
    NetworkMode,
    Protocol,
    RoutingPreference,
    Scope,
    Service,
    Workload,
)
from mesh.config.validation import (
    CIDRField,
    GatewayDestinationField,
    IPField,
    NetworkAddressField,
    PortField,
    ServiceAccountMatchField,
    StrictModel,
    StringMatchField,
    enum_parser,
    load_document,
    parse_namespaced_hostname,
    validate,
)
from mesh.identity import IdentityError
from mesh.identity.spiffe import validate_namespace, validate_service_account, validate_trust_domain

NETNS_DIR = "/run/netns"


def _service_key(value: Any) -> str:
    parse_namespaced_hostname(value)
    return value


ServiceKey = Annotated[str, PlainValidator(_service_key)]
PortMap = dict[PortField, PortField]


class GatewayAddressDoc(StrictModel):
    destination: GatewayDestinationField
    hbone_mtls_port: PortField = 15008

    def build(self) -> GatewayAddress:
        return GatewayAddress(self.destination, self.hbone_mtls_port)


class LocalityDoc(StrictModel):
    region: str = ""
    zone: str = ""
    subzone: str = ""


class ApplicationTunnelDoc(StrictModel):
    protocol: Annotated[str, PlainValidator(lambda v: _tunnel_protocol(v))] = "NONE"
    port: PortField | None = None


def _tunnel_protocol(value: Any) -> str:
    if isinstance(value, str) and value.upper() in ("NONE", "PROXY"):
        return value.upper()
    raise ValueError(f"{value!r} is not a valid application tunnel protocol (one of: NONE, PROXY)")


class WorkloadDoc(StrictModel):
    workload_ips: list[IPField]
    namespace: str
    uid: str = ""
    name: str = ""
    service_account: str = ""
    trust_domain: str = ""
    protocol: Annotated[Protocol, enum_parser(Protocol, "protocol")] = Protocol.TCP
    network_mode: Annotated[NetworkMode, enum_parser(NetworkMode, "network mode")] = NetworkMode.STANDARD
    node: str = ""
    network: str = ""
    cluster_id: str = ""
    hostname: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = ""
    waypoint: GatewayAddressDoc | None = None
    network_gateway: GatewayAddressDoc | None = None
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnelDoc | None = None
    authorization_policies: list[str] = []
    status: Annotated[HealthStatus, enum_parser(HealthStatus, "status")] = HealthStatus.HEALTHY
    locality: LocalityDoc = LocalityDoc()
    capacity: int = 1
    services: dict[ServiceKey, PortMap] = {}
    # extensions
    labels: dict[str, str] = {}
    netns: str | None = None

    def build(self) -> Workload:
        uid = self.uid or f"local//v1/Pod/{self.namespace}/{self.name}"
        netns = self.netns
        if netns is not None and "/" not in netns:
            netns = f"{NETNS_DIR}/{netns}"
        return Workload(
            uid=uid,
            name=self.name,
            namespace=self.namespace,
            workload_ips=tuple(self.workload_ips),
            service_account=self.service_account,
            protocol=self.protocol,
            node=self.node,
            network=self.network,
            trust_domain=self.trust_domain,
            cluster_id=self.cluster_id,
            hostname=self.hostname,
            canonical_name=self.canonical_name,
            canonical_revision=self.canonical_revision,
            workload_name=self.workload_name,
            workload_type=self.workload_type,
            services=self.services,
            waypoint=self.waypoint.build() if self.waypoint else None,
            network_gateway=self.network_gateway.build() if self.network_gateway else None,
            authorization_policies=tuple(self.authorization_policies),
            status=self.status,
            network_mode=self.network_mode,
            native_tunnel=self.native_tunnel,
            application_tunnel=(
                ApplicationTunnel(self.application_tunnel.protocol, self.application_tunnel.port)
                if self.application_tunnel
                else None
            ),
            locality=Locality(self.locality.region, self.locality.zone, self.locality.subzone),
            capacity=self.capacity,
            labels=self.labels,
            netns=netns,
        )


class LoadBalancerDoc(StrictModel):
    routing_preferences: list[Annotated[RoutingPreference, enum_parser(RoutingPreference, "routing preference")]] = []
    mode: Annotated[LoadBalancerMode, enum_parser(LoadBalancerMode, "load balancer mode")] = LoadBalancerMode.STANDARD
    health_policy: Annotated[HealthPolicy, enum_parser(HealthPolicy, "health policy")] = HealthPolicy.ONLY_HEALTHY


class ServiceDoc(StrictModel):
    name: str
    namespace: str
    hostname: str
    vips: list[NetworkAddressField] = []
    ports: PortMap = {}
    subject_alt_names: list[str] = []
    waypoint: GatewayAddressDoc | None = None
    load_balancer: LoadBalancerDoc | None = None
    ip_families: Annotated[IpFamily, enum_parser(IpFamily, "IP family")] | None = None
    canonical: bool = False
    endpoints: dict[str, Any] = {}  # present in config dumps; derived from workloads, so ignored

    def build(self) -> Service:
        lb = self.load_balancer
        return Service(
            name=self.name,
            namespace=self.namespace,
            hostname=self.hostname,
            vips=tuple(self.vips),
            ports=self.ports,
            subject_alt_names=tuple(self.subject_alt_names),
            waypoint=self.waypoint.build() if self.waypoint else None,
            load_balancer=LoadBalancer(tuple(lb.routing_preferences), lb.mode, lb.health_policy) if lb else None,
            ip_families=self.ip_families,
            canonical=self.canonical,
        )


class MatchDoc(StrictModel):
    namespaces: list[StringMatchField] = []
    not_namespaces: list[StringMatchField] = []
    service_accounts: list[ServiceAccountMatchField] = []
    not_service_accounts: list[ServiceAccountMatchField] = []
    principals: list[StringMatchField] = []
    not_principals: list[StringMatchField] = []
    source_ips: list[CIDRField] = []
    not_source_ips: list[CIDRField] = []
    destination_ips: list[CIDRField] = []
    not_destination_ips: list[CIDRField] = []
    destination_ports: list[PortField] = []
    not_destination_ports: list[PortField] = []

    def build(self) -> Match:
        return Match(**{name: tuple(getattr(self, name)) for name in type(self).model_fields})


class PolicyDoc(StrictModel):
    """ztunnel's native `Authorization`: rules -> clauses -> matches."""

    name: str
    namespace: str
    scope: Annotated[Scope, enum_parser(Scope, "scope")]
    action: Annotated[Action, enum_parser(Action, "action")]
    rules: list[list[list[MatchDoc]]] = []
    dry_run: bool = False
    selector: dict[str, str] | None = None  # extension: label selector for WorkloadSelector policies

    def build(self) -> Authorization:
        if self.selector is not None and self.scope is not Scope.WORKLOAD_SELECTOR:
            raise ConfigError("selector", f"only a WorkloadSelector policy can have a selector, not {self.scope}")
        return Authorization(
            name=self.name,
            namespace=self.namespace,
            scope=self.scope,
            action=self.action,
            rules=tuple(tuple(tuple(m.build() for m in clause) for clause in rule) for rule in self.rules),
            dry_run=self.dry_run,
            selector=self.selector,
        )


class LocalConfigDoc(StrictModel):
    workloads: list[WorkloadDoc] = []
    policies: list[PolicyDoc] = []
    services: list[ServiceDoc] = []


def _check_unique(keys: list[str], what: str, field: str) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    problems = []
    for i, key in enumerate(keys):
        if key in seen:
            problems.append((f"{field}[{i}]", f"duplicate {what} {key!r} (also {field}[{seen[key]}])"))
        else:
            seen[key] = i
    return problems


def _identity_problems(w: WorkloadDoc, where: str) -> list[tuple[str, str]]:
    """A workload's identity must be a valid SPIFFE ID, or it could never get a certificate; refusing it
    here names the field instead of failing later at the CA."""
    checks = [
        ("namespace", validate_namespace, w.namespace),
        ("serviceAccount", validate_service_account, w.service_account or DEFAULT_SERVICE_ACCOUNT),
    ]
    if w.trust_domain:
        checks.append(("trustDomain", validate_trust_domain, w.trust_domain))
    problems = []
    for field, check, value in checks:
        try:
            check(value, field)
        except IdentityError as exc:
            problems.append((f"{where}.{field}", str(exc)))
    return problems


def _build_all(doc: LocalConfigDoc) -> ConfigSet:
    problems: list[tuple[str, str]] = []
    workloads = []
    for i, w in enumerate(doc.workloads):
        if not w.uid and not w.name:
            problems.append((f"workloads[{i}]", "needs a uid or a name"))
            continue
        bad = _identity_problems(w, f"workloads[{i}]")
        if bad:
            problems.extend(bad)
            continue
        workloads.append(w.build())
    policies = []
    for i, p in enumerate(doc.policies):
        try:
            policies.append(p.build())
        except ConfigError as exc:
            problems.extend(exc.prefixed(f"policies[{i}]").problems)
    services = [s.build() for s in doc.services]
    problems += _check_unique([w.uid for w in workloads], "workload uid", "workloads")
    problems += _check_unique([p.key for p in policies], "policy", "policies")
    problems += _check_unique([s.key for s in services], "service", "services")
    if problems:
        raise ConfigError(problems)
    return ConfigSet(tuple(workloads), tuple(services), tuple(policies))


def parse_local_config(text: str | bytes) -> ConfigSet:
    """Parse a local config document (YAML or JSON). Raises ConfigError naming the bad field."""
    data = load_document(text, "local config")
    return local_config_from_dict(data)


def local_config_from_dict(data: Any) -> ConfigSet:
    if data is None:
        return ConfigSet()
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError("", f"local config must be a mapping with workloads/services/policies, got {kind}")
    return _build_all(validate(LocalConfigDoc, data))


def parse_native_policy(data: Any, root: str = "") -> Authorization:
    """One ztunnel-native `Authorization` entry (as in the file's `policies` list)."""
    doc = validate(PolicyDoc, data, root)
    try:
        return doc.build()
    except ConfigError as exc:
        raise exc.prefixed(root) if root else exc from None


def load_local_config(path: str | Path) -> ConfigSet:
    return parse_local_config(Path(path).read_bytes())


# --- writing (for tools and tests that generate files) -------------------------------------------------


def _gateway_json(gw: GatewayAddress | None) -> dict[str, Any] | None:
    if gw is None:
        return None
    return {"destination": str(gw.destination), "hboneMtlsPort": gw.hbone_mtls_port}


def _match_json(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MatchDoc.model_fields:
        values = getattr(m, name)
        if not values:
            continue
        camel = MatchDoc.model_fields[name].alias or name
        if name.endswith("ports"):
            out[camel] = list(values)
        elif name.endswith("service_accounts"):
            out[camel] = [{"namespace": v.namespace, "serviceAccount": v.service_account} for v in values]
        elif name.endswith("ips"):
            out[camel] = [str(v) for v in values]
        else:
            out[camel] = [
                {v.kind.value.title(): v.value} if v.kind.value != "presence" else {"Presence": []} for v in values
            ]
    return out


def dump_local_config(config: ConfigSet) -> str:
    """The JSON form of a ConfigSet, readable back by `parse_local_config`."""
    workloads = []
    for w in config.workloads:
        doc: dict[str, Any] = {
            "uid": w.uid,
            "name": w.name,
            "namespace": w.namespace,
            "serviceAccount": w.service_account,
            "workloadIps": [str(ip) for ip in w.workload_ips],
            "protocol": w.protocol.value,
            "node": w.node,
            "network": w.network,
            "trustDomain": w.trust_domain,
            "status": w.status.value,
            "services": {k: {str(p): t for p, t in v.items()} for k, v in w.services.items()},
            "authorizationPolicies": list(w.authorization_policies),
        }
        for key, value in (
            ("canonicalName", w.canonical_name),
            ("canonicalRevision", w.canonical_revision),
            ("workloadName", w.workload_name),
            ("workloadType", w.workload_type),
            ("waypoint", _gateway_json(w.waypoint)),
            ("labels", dict(w.labels) or None),
            ("netns", w.netns),
        ):
            if value:
                doc[key] = value
        workloads.append(doc)
    services = []
    for s in config.services:
        sdoc: dict[str, Any] = {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": [str(v) for v in s.vips],
            "ports": {str(p): t for p, t in s.ports.items()},
            "subjectAltNames": list(s.subject_alt_names),
        }
        if s.waypoint:
            sdoc["waypoint"] = _gateway_json(s.waypoint)
        if s.load_balancer:
            sdoc["loadBalancer"] = {
                "routingPreferences": [r.value for r in s.load_balancer.routing_preferences],
                "mode": s.load_balancer.mode.value,
                "healthPolicy": s.load_balancer.health_policy.value,
            }
        if s.ip_families:
            sdoc["ipFamilies"] = s.ip_families.value
        if s.canonical:
            sdoc["canonical"] = True
        services.append(sdoc)
    policies = []
    for p in config.policies:
        pdoc: dict[str, Any] = {
            "name": p.name,
            "namespace": p.namespace,
            "scope": p.scope.value,
            "action": p.action.value,
            "dryRun": p.dry_run,
            "rules": [[[_match_json(m) for m in clause] for clause in rule] for rule in p.rules],
        }
        if p.selector is not None:
            pdoc["selector"] = dict(p.selector)
        policies.append(pdoc)
    return json.dumps({"workloads": workloads, "services": services, "policies": policies}, indent=2)

"""AuthorizationPolicy (security.istio.io/v1) for the waypoint: schema, checks, binding targets.

A waypoint enforces only policies attached with `targetRefs` (a Service, the waypoint's Gateway, the
`istio-waypoint` GatewayClass in the root namespace, or a ServiceEntry). Policies with a `selector`, or
with neither, belong to the destination's node agent and are ignored here. CUSTOM (external
authorization) and AUDIT are refused with a clear message rather than half-applied. JWT attributes
(`requestPrincipals`, `request.auth.*`) need RequestAuthentication, which this waypoint does not do: they
are accepted with a warning and fail closed (see `waypoint.authz`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, ValidationError

from waypoint.authz import (
    Action,
    AuthzPolicy,
    Condition,
    Operation,
    PathPattern,
    Rule,
    Source,
    WildcardMatch,
    is_path_template,
)
from waypoint.config.common import Metadata, Strict
from waypoint.config.errors import FieldError, ResourceError, problems_from

GATEWAY_GROUP = "gateway.networking.k8s.io"


class TargetRefSpec(Strict):
    group: str = ""
    kind: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    namespace: str | None = None


class SelectorSpec(Strict):
    match_labels: dict[str, str] = Field(default_factory=dict)


StrList = list[Annotated[str, Field(min_length=1)]]


class SourceSpec(Strict):
    principals: StrList = Field(default_factory=list)
    not_principals: StrList = Field(default_factory=list)
    request_principals: StrList = Field(default_factory=list)
    not_request_principals: StrList = Field(default_factory=list)
    namespaces: StrList = Field(default_factory=list)
    not_namespaces: StrList = Field(default_factory=list)
    service_accounts: StrList = Field(default_factory=list)
    not_service_accounts: StrList = Field(default_factory=list)
    ip_blocks: StrList = Field(default_factory=list)
    not_ip_blocks: StrList = Field(default_factory=list)
    remote_ip_blocks: StrList = Field(default_factory=list)
    not_remote_ip_blocks: StrList = Field(default_factory=list)


class OperationSpec(Strict):
    hosts: StrList = Field(default_factory=list)
    not_hosts: StrList = Field(default_factory=list)
    ports: list[str | int] = Field(default_factory=list)
    not_ports: list[str | int] = Field(default_factory=list)
    methods: StrList = Field(default_factory=list)
    not_methods: StrList = Field(default_factory=list)
    paths: StrList = Field(default_factory=list)
    not_paths: StrList = Field(default_factory=list)


class FromSpec(Strict):
    source: SourceSpec | None = None


class ToSpec(Strict):
    operation: OperationSpec | None = None


class ConditionSpec(Strict):
    key: Annotated[str, Field(min_length=1)]
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)


class RuleSpec(Strict):
    from_: list[FromSpec] = Field(default_factory=list, alias="from")
    to: list[ToSpec] = Field(default_factory=list)
    when: list[ConditionSpec] = Field(default_factory=list)


class ProviderSpec(Strict):
    name: str


class AuthorizationPolicySpec(Strict):
    selector: SelectorSpec | None = None
    target_ref: TargetRefSpec | None = None
    target_refs: Annotated[list[TargetRefSpec], Field(max_length=16)] = Field(default_factory=list)
    rules: list[RuleSpec] | None = None
    action: str = "ALLOW"
    provider: ProviderSpec | None = None


class AuthorizationPolicyDoc(Strict):
    api_version: str
    kind: str
    metadata: Metadata
    spec: AuthorizationPolicySpec = Field(default_factory=AuthorizationPolicySpec)
    status: Any = None


@dataclass(frozen=True)
class PolicyTarget:
    kind: str  # Service, Gateway, GatewayClass, ServiceEntry
    name: str


@dataclass(frozen=True)
class ParsedAuthorizationPolicy:
    policy: AuthzPolicy
    targets: tuple[PolicyTarget, ...]  # empty: not for waypoints (selector or namespace-wide)
    warnings: tuple[str, ...] = ()


_TARGET_KINDS = {("", "Service"), ("core", "Service"), (GATEWAY_GROUP, "Gateway"),
                 (GATEWAY_GROUP, "GatewayClass"), ("networking.istio.io", "ServiceEntry")}

_CONDITION_KEYS = re.compile(
    r"^(request\.headers\[[^\]]+\]|source\.ip|remote\.ip|source\.namespace|source\.principal|"
    r"request\.auth\.principal|request\.auth\.audiences|request\.auth\.presenter|request\.auth\.claims\[.+\]|"
    r"destination\.ip|destination\.port|connection\.sni|experimental\.envoy\.filters\..+)$"
)


def _wildcards(values: list[str], where: str, ignore_case: bool = False) -> tuple[WildcardMatch, ...]:
    for i, v in enumerate(values):
        if v != "*" and "*" in v[1:-1]:
            raise FieldError(f"{where}[{i}]", f"{v!r}: '*' is allowed only at the start or the end")
        if v.startswith("*") and v.endswith("*") and v != "*":
            raise FieldError(f"{where}[{i}]", f"{v!r}: use '*' at the start or the end, not both")
    return tuple(WildcardMatch(v, ignore_case) for v in values)


def _principals(values: list[str], where: str) -> tuple[WildcardMatch, ...]:
    _wildcards(values, where)
    return tuple(WildcardMatch.principal(v) for v in values)


def _blocks(values: list[str], where: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise FieldError(f"{where}[{i}]", f"{v!r} is not an IP address or CIDR block") from None
    return tuple(out)


def _ports(values: list[str | int], where: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        text = str(v).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise FieldError(f"{where}[{i}]", f"{v!r} is not a port number (1-65535)")
        out.append(int(text))
    return tuple(out)


def _paths(values: list[str], where: str) -> tuple[PathPattern, ...]:
    for i, v in enumerate(values):
        if is_path_template(v):
            segments = v.split("/")
            if "*" in v.replace("{*}", "").replace("{**}", ""):
                raise FieldError(f"{where}[{i}]", f"{v!r}: path templates cannot be mixed with '*' wildcards")
            for j, seg in enumerate(segments):
                if ("{" in seg or "}" in seg) and seg not in ("{*}", "{**}"):
                    raise FieldError(f"{where}[{i}]", f"{v!r}: {{*}} and {{**}} must be whole path segments")
                if seg == "{**}" and j != len(segments) - 1:
                    raise FieldError(f"{where}[{i}]", f"{v!r}: {{**}} must be the last segment")
        elif v != "*" and not v.startswith("/") and not v.startswith("*"):
            raise FieldError(f"{where}[{i}]", f"{v!r} must start with '/' (or be a '*' pattern)")
    _wildcards([v for v in values if not is_path_template(v)], where)
    return tuple(PathPattern(v) for v in values)


def _service_accounts(values: list[str], where: str) -> tuple[str, ...]:
    for i, v in enumerate(values):
        ns, sep, sa = v.partition("/")
        if not sep or not ns or not sa or "/" in sa or "*" in v:
            raise FieldError(f"{where}[{i}]", f"{v!r} is not 'namespace/serviceaccount' (no wildcards)")
    return tuple(values)


def _source(spec: SourceSpec | None, where: str, warnings: list[str]) -> Source:
    if spec is None:
        raise FieldError(f"{where}.source", "required field is missing")
    if spec == SourceSpec():
        raise FieldError(f"{where}.source", "must set at least one field")
    if (spec.service_accounts or spec.not_service_accounts) and (
            spec.principals or spec.not_principals or spec.namespaces or spec.not_namespaces):
        raise FieldError(f"{where}.source.serviceAccounts", "cannot be combined with principals or namespaces")
    unsupported = []
    if spec.request_principals or spec.not_request_principals:
        unsupported.append("requestPrincipals")
        warnings.append(f"{where}.source.requestPrincipals: JWT is not validated by this waypoint; the rule fails "
                        "closed (never allows, always denies)")
    sw = f"{where}.source"
    return Source(
        principals=_principals(spec.principals, f"{sw}.principals"),
        not_principals=_principals(spec.not_principals, f"{sw}.notPrincipals"),
        namespaces=_wildcards(spec.namespaces, f"{sw}.namespaces"),
        not_namespaces=_wildcards(spec.not_namespaces, f"{sw}.notNamespaces"),
        service_accounts=_service_accounts(spec.service_accounts, f"{sw}.serviceAccounts"),
        not_service_accounts=_service_accounts(spec.not_service_accounts, f"{sw}.notServiceAccounts"),
        ip_blocks=_blocks(spec.ip_blocks, f"{sw}.ipBlocks"),
        not_ip_blocks=_blocks(spec.not_ip_blocks, f"{sw}.notIpBlocks"),
        remote_ip_blocks=_blocks(spec.remote_ip_blocks, f"{sw}.remoteIpBlocks"),
        not_remote_ip_blocks=_blocks(spec.not_remote_ip_blocks, f"{sw}.notRemoteIpBlocks"),
        unsupported=tuple(unsupported),
    )


def _operation(spec: OperationSpec | None, where: str) -> Operation:
    if spec is None:
        raise FieldError(f"{where}.operation", "required field is missing")
    if spec == OperationSpec():
        raise FieldError(f"{where}.operation", "must set at least one field")
    ow = f"{where}.operation"
    return Operation(
        hosts=_wildcards(spec.hosts, f"{ow}.hosts", ignore_case=True),
        not_hosts=_wildcards(spec.not_hosts, f"{ow}.notHosts", ignore_case=True),
        ports=_ports(spec.ports, f"{ow}.ports"),
        not_ports=_ports(spec.not_ports, f"{ow}.notPorts"),
        methods=_wildcards(spec.methods, f"{ow}.methods"),
        not_methods=_wildcards(spec.not_methods, f"{ow}.notMethods"),
        paths=_paths(spec.paths, f"{ow}.paths"),
        not_paths=_paths(spec.not_paths, f"{ow}.notPaths"),
    )


def _condition(spec: ConditionSpec, where: str, warnings: list[str]) -> Condition:
    if not _CONDITION_KEYS.match(spec.key):
        raise FieldError(f"{where}.key", f"unknown attribute {spec.key!r}; see Istio's authorization conditions")
    if not spec.values and not spec.not_values:
        raise FieldError(where, "set at least one of values and notValues")
    cond = Condition(spec.key, tuple(spec.values), tuple(spec.not_values))
    if not cond.supported:
        warnings.append(f"{where}.key: {spec.key} cannot be evaluated by this waypoint; the rule fails closed")
    if spec.key in ("source.ip", "remote.ip", "destination.ip"):
        _blocks(list(spec.values) + list(spec.not_values), f"{where}.values")
    if spec.key == "destination.port":
        _ports(list(spec.values) + list(spec.not_values), f"{where}.values")
    return cond


def _rule(spec: RuleSpec, where: str, warnings: list[str]) -> Rule:
    return Rule(
        sources=tuple(_source(f.source, f"{where}.from[{i}]", warnings) for i, f in enumerate(spec.from_)),
        operations=tuple(_operation(t.operation, f"{where}.to[{i}]") for i, t in enumerate(spec.to)),
        conditions=tuple(_condition(c, f"{where}.when[{i}]", warnings) for i, c in enumerate(spec.when)),
    )


def parse_authorizationpolicy(doc: Any) -> ParsedAuthorizationPolicy:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    label = "AuthorizationPolicy {}/{}".format(
        (meta.get("namespace") or "default") if isinstance(meta, dict) else "default",
        meta.get("name", "?") if isinstance(meta, dict) else "?")
    try:
        parsed = AuthorizationPolicyDoc.model_validate(doc)
    except ValidationError as exc:
        raise ResourceError(label, problems_from(exc, frozenset({"matchLabels"}))) from None
    ns = parsed.metadata.namespace
    resource = f"AuthorizationPolicy {ns}/{parsed.metadata.name}"
    spec = parsed.spec
    warnings: list[str] = []
    try:
        if spec.action in ("CUSTOM", "AUDIT"):
            reason = ("external authorization (CUSTOM) is out of scope" if spec.action == "CUSTOM"
                      else "AUDIT needs an audit plugin, which this waypoint does not have")
            raise FieldError("spec.action", f"action {spec.action} is not supported by this waypoint: {reason}")
        if spec.action not in ("ALLOW", "DENY"):
            raise FieldError("spec.action", f"must be one of ALLOW, DENY, AUDIT, CUSTOM (got {spec.action!r})")
        if spec.provider is not None:
            raise FieldError("spec.provider", "only valid with action CUSTOM, which this waypoint does not support")
        refs = list(spec.target_refs)
        if spec.target_ref is not None:
            if refs:
                raise FieldError("spec.targetRef", "set only one of targetRef and targetRefs")
            refs = [spec.target_ref]
        if refs and spec.selector is not None:
            raise FieldError("spec.selector", "selector and targetRefs are mutually exclusive")
        targets = []
        for i, t in enumerate(refs):
            tw = f"spec.targetRefs[{i}]"
            if (t.group, t.kind) not in _TARGET_KINDS:
                raise FieldError(f"{tw}.kind", f"cannot target {t.group or 'core'}/{t.kind}; use a Service, the "
                                 "waypoint's Gateway, the GatewayClass or a ServiceEntry")
            if t.namespace and t.namespace != ns:
                raise FieldError(f"{tw}.namespace", "must be the policy's own namespace")
            targets.append(PolicyTarget(t.kind, t.name))
        rules = None
        if spec.rules:
            rules = tuple(_rule(r, f"spec.rules[{i}]", warnings) for i, r in enumerate(spec.rules))
    except FieldError as exc:
        raise ResourceError(resource, [(exc.path, exc.message)]) from None
    if not targets:
        warnings.append("no targetRefs: enforced by the node agents, not by the waypoint")
    policy = AuthzPolicy(ns, parsed.metadata.name, Action(spec.action), rules)
    return ParsedAuthorizationPolicy(policy, tuple(targets), tuple(warnings))

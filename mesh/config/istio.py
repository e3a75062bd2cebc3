"""Istio `AuthorizationPolicy` objects, as users `kubectl apply` them, turned into L4 `Authorization`s.

The conversion follows what istiod does for ztunnel, so a policy means here what it means in Istio
ambient mode:
- scope: a `selector` makes it a WorkloadSelector policy (the labels are kept so the store can find
  the workloads it selects), no selector makes it Namespace-wide, and Global in the root namespace;
- `targetRef`/`targetRefs` policies are for waypoints, not for the node agent: they are returned marked
  as such and never enforced at L4;
- only ALLOW and DENY exist at L4 (CUSTOM and AUDIT are refused);
- HTTP-only fields cannot be checked at L4. In an ALLOW policy the rule that uses them is dropped, which
  can only allow less (fail closed); in a DENY policy the HTTP parts are dropped and the rest kept, which
  can only deny more, and a DENY left with nothing enforceable has no effect. Each case comes back with
  a warning for logs and status, as istiod writes one into the policy's status.

Invalid values (a port that is not a number, an ipBlock that is not a CIDR, an unknown `when` key) are
refused with the field's path, as Istio's validating webhook refuses them at `kubectl apply` time; they
are never silently skipped, since skipping a value can widen a match.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from mesh.config.errors import ConfigError
from mesh.config.localconfig import parse_native_policy
from mesh.config.model import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    Authorization,
    ConfigSet,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    frozen_map,
    principal_match,
)
from mesh.config.validation import StrictModel, load_documents, parse_cidr, parse_port, validate

log = logging.getLogger(__name__)

API_GROUP = "security.istio.io"
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"

# `when` keys ztunnel can evaluate; every other known key is an HTTP attribute.
L4_WHEN_KEYS = frozenset({"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"})
KNOWN_WHEN_KEYS = L4_WHEN_KEYS | {
    "remote.ip",
    "source.serviceAccount",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
}
KNOWN_WHEN_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")

_HTTP_RULE = (
    "the node agent enforces L4 only and cannot check HTTP attributes (found: {found}); "
    "a waypoint proxy must enforce them. {effect}"
)
_ALLOW_EFFECT = "In an ALLOW policy the rules using them are left out, so it allows less than written."
_DENY_MIXED_EFFECT = "This DENY policy is enforced without its HTTP conditions, so it denies more than written."
_DENY_NO_EFFECT = (
    "Without its HTTP conditions this DENY policy has nothing left to enforce at L4 and has no effect; "
    "attach it to a waypoint with targetRefs to enforce it."
)


def _str_list(value: Any) -> list[str]:
    """Istio lists are lists of strings; numbers are accepted for ports (`ports: [8080]`)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise ValueError(f"item {i}: expected a string, got {v!r}")
        out.append(str(v))
    return out


StrList = Annotated[list[str], PlainValidator(_str_list)]


class SourceDoc(StrictModel):
    principals: StrList = []
    not_principals: StrList = []
    request_principals: StrList = []
    not_request_principals: StrList = []
    namespaces: StrList = []
    not_namespaces: StrList = []
    service_accounts: StrList = []
    not_service_accounts: StrList = []
    ip_blocks: StrList = []
    not_ip_blocks: StrList = []
    remote_ip_blocks: StrList = []
    not_remote_ip_blocks: StrList = []
    trust_domains: StrList = []
    not_trust_domains: StrList = []


class OperationDoc(StrictModel):
    hosts: StrList = []
    not_hosts: StrList = []
    ports: StrList = []
    not_ports: StrList = []
    methods: StrList = []
    not_methods: StrList = []
    paths: StrList = []
    not_paths: StrList = []


class FromDoc(StrictModel):
    source: SourceDoc | None = None


class ToDoc(StrictModel):
    operation: OperationDoc | None = None


class ConditionDoc(StrictModel):
    key: str = ""
    values: StrList = []
    not_values: StrList = []


class RuleDoc(StrictModel):
    from_: list[FromDoc] | None = Field(default=None, alias="from")
    to: list[ToDoc] | None = None
    when: list[ConditionDoc] = []


class SelectorDoc(StrictModel):
    match_labels: dict[str, str] = {}


class TargetRefDoc(StrictModel):
    group: str = ""
    kind: str
    name: str
    namespace: str = ""


class ProviderDoc(StrictModel):
    name: str = ""


class SpecDoc(StrictModel):
    selector: SelectorDoc | None = None
    target_ref: TargetRefDoc | None = None
    target_refs: list[TargetRefDoc] = []
    action: str = "ALLOW"
    provider: ProviderDoc | None = None
    rules: list[RuleDoc] | None = None


class MetadataDoc(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    namespace: str | None = None
    annotations: dict[str, str] = {}
    labels: dict[str, str] = {}


class PolicyObjectDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)

    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: MetadataDoc
    spec: SpecDoc = SpecDoc()
    status: Any = None


@dataclass(frozen=True)
class TranslatedPolicy:
    """One AuthorizationPolicy after translation.

    `authorization` is what the node agent enforces; it is None for a waypoint policy (`for_waypoint`),
    whose original object is kept in `source` for the waypoint to interpret. `warnings` are the status
    messages istiod would set, meant for logs and `kubectl`-visible status.
    """

    name: str
    namespace: str
    authorization: Authorization | None
    for_waypoint: bool = False
    warnings: tuple[str, ...] = ()
    source: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _parse_dry_run(annotations: Mapping[str, str], warnings: list[str]) -> bool:
    raw = annotations.get(DRY_RUN_ANNOTATION)
    if raw is None or raw == "":
        return False
    truthy = {"1", "t", "T", "TRUE", "true", "True"}
    falsy = {"0", "f", "F", "FALSE", "false", "False"}
    if raw in truthy:
        return True
    if raw not in falsy:
        warnings.append(f"annotation {DRY_RUN_ANNOTATION}={raw!r} is not a boolean; the policy is enforced")
    return False


def _string_matches(values: list[str], path: str, principal: bool = False) -> tuple[StringMatch, ...]:
    out = []
    for i, v in enumerate(values):
        if v == "":
            raise ConfigError(f"{path}[{i}]", "empty value is not allowed")
        out.append(principal_match(v) if principal else StringMatch.from_istio(v))
    return tuple(out)


def _service_accounts(values: list[str], namespace: str, path: str) -> tuple[ServiceAccountMatch, ...]:
    out = []
    for i, v in enumerate(values):
        ns, sep, sa = v.partition("/")
        if not sep:
            ns, sa = namespace, v
        if not ns or not sa or "/" in sa:
            raise ConfigError(f"{path}[{i}]", f"{v!r} is not a service account: expected 'name' or 'namespace/name'")
        out.append(ServiceAccountMatch(ns, sa))
    return tuple(out)


def _cidrs(values: list[str], path: str) -> tuple[Any, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(parse_cidr(v))
        except ValueError as exc:
            raise ConfigError(f"{path}[{i}]", str(exc)) from None
    return tuple(out)


def _ports(values: list[str], path: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(parse_port(v))
        except ValueError as exc:
            raise ConfigError(f"{path}[{i}]", str(exc)) from None
    return tuple(out)


def _when_values(key: str, values: list[str], path: str) -> dict[str, tuple[Any, ...]]:
    """The Match fields one side (values or notValues) of an L4 `when` condition fills."""
    if not values:
        return {}
    if key == "source.ip":
        return {"source_ips": _cidrs(values, path)}
    if key == "destination.ip":
        return {"destination_ips": _cidrs(values, path)}
    if key == "destination.port":
        return {"destination_ports": _ports(values, path)}
    if key == "source.namespace":
        return {"namespaces": _string_matches(values, path)}
    if key == "source.principal":
        return {"principals": _string_matches(values, path, principal=True)}
    return {}


def _negate(fields: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {f"not_{k}": v for k, v in fields.items()}


def _check_when_key(key: str, path: str) -> None:
    if not key:
        raise ConfigError(f"{path}.key", "must not be empty")
    if key in KNOWN_WHEN_KEYS or key.startswith(KNOWN_WHEN_PREFIXES):
        return
    raise ConfigError(f"{path}.key", f"unknown attribute {key!r}")


def _source_match(src: SourceDoc, namespace: str, path: str) -> tuple[Match, list[str]]:
    http = [
        name
        for name, attr in (
            ("remoteIpBlocks", src.remote_ip_blocks),
            ("notRemoteIpBlocks", src.not_remote_ip_blocks),
            ("requestPrincipals", src.request_principals),
            ("notRequestPrincipals", src.not_request_principals),
            ("trustDomains", src.trust_domains),
            ("notTrustDomains", src.not_trust_domains),
        )
        if attr
    ]
    if not any(getattr(src, f) for f in type(src).model_fields):
        raise ConfigError(f"{path}.source", "must not be empty")
    if (src.principals or src.not_principals or src.namespaces or src.not_namespaces) and (
        src.service_accounts or src.not_service_accounts
    ):
        raise ConfigError(f"{path}.source", "cannot set serviceAccounts together with namespaces or principals")
    for name in ("request_principals", "not_request_principals", "trust_domains", "not_trust_domains"):
        for i, v in enumerate(getattr(src, name)):
            if v == "":
                alias = type(src).model_fields[name].alias
                raise ConfigError(f"{path}.source.{alias}[{i}]", "empty value is not allowed")
    _cidrs(src.remote_ip_blocks, f"{path}.source.remoteIpBlocks")
    _cidrs(src.not_remote_ip_blocks, f"{path}.source.notRemoteIpBlocks")
    m = Match(
        source_ips=_cidrs(src.ip_blocks, f"{path}.source.ipBlocks"),
        not_source_ips=_cidrs(src.not_ip_blocks, f"{path}.source.notIpBlocks"),
        namespaces=_string_matches(src.namespaces, f"{path}.source.namespaces"),
        not_namespaces=_string_matches(src.not_namespaces, f"{path}.source.notNamespaces"),
        service_accounts=_service_accounts(src.service_accounts, namespace, f"{path}.source.serviceAccounts"),
        not_service_accounts=_service_accounts(
            src.not_service_accounts, namespace, f"{path}.source.notServiceAccounts"
        ),
        principals=_string_matches(src.principals, f"{path}.source.principals", principal=True),
        not_principals=_string_matches(src.not_principals, f"{path}.source.notPrincipals", principal=True),
    )
    return m, http


def _operation_match(op: OperationDoc, path: str) -> tuple[Match, list[str]]:
    http = [
        name
        for name, attr in (
            ("hosts", op.hosts),
            ("notHosts", op.not_hosts),
            ("methods", op.methods),
            ("notMethods", op.not_methods),
            ("paths", op.paths),
            ("notPaths", op.not_paths),
        )
        if attr
    ]
    if not any(getattr(op, f) for f in type(op).model_fields):
        raise ConfigError(f"{path}.operation", "must not be empty")
    for name in ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"):
        for i, v in enumerate(getattr(op, name)):
            if v == "":
                alias = type(op).model_fields[name].alias
                raise ConfigError(f"{path}.operation.{alias}[{i}]", "empty value is not allowed")
    m = Match(
        destination_ports=_ports(op.ports, f"{path}.operation.ports"),
        not_destination_ports=_ports(op.not_ports, f"{path}.operation.notPorts"),
    )
    return m, http


def _translate_rule(rule: RuleDoc, action: Action, namespace: str, path: str) -> tuple[Rule | None, set[str]]:
    """One Istio rule -> clauses (to, from, each when), or None when an ALLOW rule needs HTTP."""
    http: set[str] = set()
    clauses: list[tuple[Match, ...]] = []
    if rule.from_ is not None and not rule.from_:
        raise ConfigError(f"{path}.from", "must not be empty")
    if rule.to is not None and not rule.to:
        raise ConfigError(f"{path}.to", "must not be empty")
    to_matches = []
    for j, to in enumerate(rule.to or []):
        if to.operation is None:
            raise ConfigError(f"{path}.to[{j}].operation", "must not be empty")
        m, found = _operation_match(to.operation, f"{path}.to[{j}]")
        to_matches.append(m)
        http.update(found)
    from_matches = []
    for j, frm in enumerate(rule.from_ or []):
        if frm.source is None:
            raise ConfigError(f"{path}.from[{j}].source", "must not be empty")
        m, found = _source_match(frm.source, namespace, f"{path}.from[{j}]")
        from_matches.append(m)
        http.update(found)
    if to_matches:
        clauses.append(tuple(to_matches))
    if from_matches:
        clauses.append(tuple(from_matches))
    for k, cond in enumerate(rule.when):
        cpath = f"{path}.when[{k}]"
        _check_when_key(cond.key, cpath)
        if not cond.values and not cond.not_values:
            raise ConfigError(cpath, f"at least one of values or notValues must be set for key {cond.key}")
        if cond.key not in L4_WHEN_KEYS:
            http.add(cond.key)
            if cond.key == "remote.ip":
                _cidrs(cond.values, f"{cpath}.values")
                _cidrs(cond.not_values, f"{cpath}.notValues")
        fields = _when_values(cond.key, cond.values, f"{cpath}.values")
        fields.update(_negate(_when_values(cond.key, cond.not_values, f"{cpath}.notValues")))
        clauses.append((Match(**fields),))
    if action is Action.ALLOW and http:
        return None, http
    return tuple(clauses), http


def has_effective_rules(rules: Iterable[Rule]) -> bool:
    """Whether any rule can ever match at L4: a rule with no clauses matches everything; a clause whose
    matches are all empty matches nothing."""
    return any(all(any(not m.is_empty() for m in clause) for clause in rule) for rule in rules)


def translate_policy(
    obj: Mapping[str, Any],
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    default_namespace: str = "default",
) -> TranslatedPolicy:
    """Translate one AuthorizationPolicy object (a parsed YAML/JSON mapping). Raises ConfigError."""
    if not isinstance(obj, Mapping):
        raise ConfigError("", f"an AuthorizationPolicy must be a mapping, got {type(obj).__name__}")
    doc = validate(PolicyObjectDoc, dict(obj))
    if doc.kind != "AuthorizationPolicy":
        raise ConfigError("kind", f"expected AuthorizationPolicy, got {doc.kind!r}")
    if doc.api_version not in API_VERSIONS:
        raise ConfigError("apiVersion", f"expected one of {', '.join(API_VERSIONS)}, got {doc.api_version!r}")
    name = doc.metadata.name
    if not name:
        raise ConfigError("metadata.name", "must not be empty")
    namespace = doc.metadata.namespace or default_namespace
    spec = doc.spec
    warnings: list[str] = []

    targets = list(spec.target_refs) + ([spec.target_ref] if spec.target_ref else [])
    if spec.selector is not None and targets:
        raise ConfigError("spec", "only one of selector or targetRef/targetRefs can be set")
    action_name = spec.action.upper()
    if action_name not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
        raise ConfigError("spec.action", f"{spec.action!r} is not an action (ALLOW, DENY, AUDIT or CUSTOM)")
    if spec.provider is not None and action_name != "CUSTOM":
        raise ConfigError("spec.provider", f"only a CUSTOM policy can name a provider, this one is {action_name}")
    if targets:
        return TranslatedPolicy(name, namespace, None, for_waypoint=True, source=dict(obj))
    if action_name in ("AUDIT", "CUSTOM"):
        raise ConfigError(
            "spec.action",
            f"the {action_name} action is not supported by the node agent's L4 enforcement (only ALLOW and "
            "DENY are); attach the policy to a waypoint with targetRefs",
        )
    action = Action.ALLOW if action_name == "ALLOW" else Action.DENY
    if action is Action.DENY and spec.rules is None:
        raise ConfigError(
            "spec.rules",
            "a DENY policy without rules never matches; add an empty rule {} to deny everything",
        )
    dry_run = _parse_dry_run(doc.metadata.annotations, warnings)

    if spec.selector is not None:
        scope, selector = Scope.WORKLOAD_SELECTOR, frozen_map(spec.selector.match_labels)
    elif namespace == root_namespace:
        scope, selector = Scope.GLOBAL, None
    else:
        scope, selector = Scope.NAMESPACE, None

    rules: list[Rule] = []
    http: set[str] = set()
    for i, rule_doc in enumerate(spec.rules or []):
        rule, found = _translate_rule(rule_doc, action, namespace, f"spec.rules[{i}]")
        http |= found
        if rule is not None:
            rules.append(rule)
    if http:
        if action is Action.ALLOW:
            effect = _ALLOW_EFFECT
        elif has_effective_rules(rules):
            effect = _DENY_MIXED_EFFECT
        else:
            effect = _DENY_NO_EFFECT
        warnings.append(_HTTP_RULE.format(found=", ".join(sorted(http)), effect=effect))

    authz = Authorization(
        name=name,
        namespace=namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=dry_run,
        selector=selector,
    )
    return TranslatedPolicy(name, namespace, authz, warnings=tuple(warnings), source=dict(obj))


def _items(doc: Any) -> list[tuple[str, Any]]:
    if isinstance(doc, Mapping) and doc.get("kind") in ("List", "AuthorizationPolicyList"):
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise ConfigError("items", "must be a list")
        return [(f"items[{i}]", item) for i, item in enumerate(items)]
    return [("", doc)]


def parse_policy_documents(
    text: str | bytes,
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    default_namespace: str = "default",
    skip_other_kinds: bool = True,
) -> list[TranslatedPolicy]:
    """Every AuthorizationPolicy in a YAML stream (`---` separated documents, or a `kind: List`).

    Objects of other kinds are skipped when `skip_other_kinds` (a file may hold a whole app), so the
    same file can be given to `kubectl apply` and to the agent. Errors name the document: `[2].spec...`.
    """
    out: list[TranslatedPolicy] = []
    seen: dict[str, str] = {}
    for d, doc in enumerate(load_documents(text, "policy file")):
        for sub, item in _items(doc):
            where = f"documents[{d}]" + (f".{sub}" if sub else "")
            if skip_other_kinds and isinstance(item, Mapping) and item.get("kind") != "AuthorizationPolicy":
                continue
            try:
                tp = translate_policy(item, root_namespace=root_namespace, default_namespace=default_namespace)
            except ConfigError as exc:
                raise exc.prefixed(where) from None
            if tp.key in seen:
                raise ConfigError(where, f"duplicate AuthorizationPolicy {tp.key} (also {seen[tp.key]})")
            seen[tp.key] = where
            out.append(tp)
    return out


def policies_to_config(translated: Iterable[TranslatedPolicy]) -> ConfigSet:
    """The L4 part as a ConfigSet for the store; warnings are logged, waypoint policies left out."""
    policies = []
    for tp in translated:
        for w in tp.warnings:
            log.warning("AuthorizationPolicy %s: %s", tp.key, w)
        if tp.authorization is not None:
            policies.append(tp.authorization)
    return ConfigSet(policies=tuple(policies))


def parse_policy_file(text: str | bytes, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> ConfigSet:
    """A file source parser for a file of Istio AuthorizationPolicies."""
    return policies_to_config(parse_policy_documents(text, root_namespace=root_namespace))


def parse_any_policy(obj: Mapping[str, Any], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> TranslatedPolicy:
    """Either an Istio AuthorizationPolicy object or a ztunnel-native `Authorization` entry."""
    if isinstance(obj, Mapping) and "apiVersion" in obj:
        return translate_policy(obj, root_namespace=root_namespace)
    authz = parse_native_policy(obj)
    return TranslatedPolicy(authz.name, authz.namespace, authz)

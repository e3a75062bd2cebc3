"""L7 AuthorizationPolicy evaluation at the waypoint (Istio semantics, CUSTOM and AUDIT excluded).

The decision users expect, in order: any matching DENY policy denies; otherwise, with no ALLOW policy
the request is allowed; with ALLOW policies, one must match or the request is denied. A denied request
gets 403 `RBAC: access denied`, exactly as Envoy's RBAC filter answers.

Matching follows Istio's translation to Envoy RBAC:
- a policy matches when any of its rules matches; `rules` absent never matches (an ALLOW policy without
  rules therefore denies everything), an empty rule `{}` always matches;
- in a rule, one `from` entry, one `to` entry and every `when` condition must match; inside one entry
  all set fields must match; a list matches when any value does; `notX` lists match when none does;
- strings are exact, `prefix*`, `*suffix` or `*` (presence); hosts compare case-insensitively against
  the whole `:authority` (so `example.com` does not match `example.com:8080`: write `example.com:*`);
  paths compare against the path without the query and accept `{*}` (one segment) and `{**}` (the rest)
  templates; principals are `<trust domain>/ns/<ns>/sa/<sa>`;
- attributes this waypoint cannot evaluate (JWT `requestPrincipals`, `request.auth.*` conditions) fail
  closed: such a rule never matches in an ALLOW policy and always matches in a DENY policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from mesh.config.model import StringMatch, principal_match
from waypoint.config.regex import full_match
from waypoint.flags import LocalReply, rbac_denied

if TYPE_CHECKING:
    from waypoint.routing import RequestView


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True)
class WildcardMatch:
    """Istio's policy string: `abc` exact, `abc*` prefix, `*abc` suffix, `*` any non-empty value.

    The matching itself is the node agent's L4 `StringMatch`, so a principal or namespace pattern means
    the same at the waypoint and at the destination's agent; hosts add case-insensitivity.
    """

    pattern: str
    ignore_case: bool = False

    def __post_init__(self) -> None:
        pattern = self.pattern.lower() if self.ignore_case else self.pattern
        object.__setattr__(self, "_match", StringMatch.from_istio(pattern))

    @classmethod
    def principal(cls, pattern: str) -> WildcardMatch:
        """A principal pattern; a full SPIFFE ID (`spiffe://...`) is accepted as the same principal."""
        return cls(str(principal_match(pattern)))

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        match: StringMatch = self._match  # type: ignore[attr-defined]
        return match.matches(value.lower() if self.ignore_case else value)


def path_template_regex(template: str) -> str:
    """`/a/{*}/b` and `/a/{**}` as an RE2 pattern: `{*}` is one non-empty segment, `{**}` the rest."""
    parts = []
    for segment in template.split("/"):
        if segment == "{*}":
            parts.append("[^/]+")
        elif segment == "{**}":
            parts.append(".*")
        else:
            parts.append("".join("\\" + c if not c.isalnum() else c for c in segment))
    return "/".join(parts)


def is_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


@dataclass(frozen=True)
class PathPattern:
    pattern: str

    def matches(self, path: str) -> bool:
        if is_path_template(self.pattern):
            return full_match(path_template_regex(self.pattern), path)
        return WildcardMatch(self.pattern).matches(path)


def _any(patterns: Sequence[WildcardMatch], value: str | None) -> bool:
    return any(p.matches(value) for p in patterns)


def _in_blocks(blocks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], ip: str | None) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == b.version and addr in b for b in blocks)


Blocks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class Source:
    principals: tuple[WildcardMatch, ...] = ()
    not_principals: tuple[WildcardMatch, ...] = ()
    namespaces: tuple[WildcardMatch, ...] = ()
    not_namespaces: tuple[WildcardMatch, ...] = ()
    service_accounts: tuple[str, ...] = ()  # "ns/sa"
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: Blocks = ()
    not_ip_blocks: Blocks = ()
    remote_ip_blocks: Blocks = ()
    not_remote_ip_blocks: Blocks = ()
    unsupported: tuple[str, ...] = ()  # fields present that cannot be evaluated here (fail closed)


@dataclass(frozen=True)
class Operation:
    hosts: tuple[WildcardMatch, ...] = ()
    not_hosts: tuple[WildcardMatch, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[WildcardMatch, ...] = ()
    not_methods: tuple[WildcardMatch, ...] = ()
    paths: tuple[PathPattern, ...] = ()
    not_paths: tuple[PathPattern, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @property
    def supported(self) -> bool:
        return not (self.key.startswith("request.auth.") or self.key.startswith("experimental."))


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthzPolicy:
    namespace: str
    name: str
    action: Action
    rules: tuple[Rule, ...] | None  # None: the `rules` field is absent: never matches

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rule_id(self, index: int) -> str:
        """The Envoy RBAC policy name Istio generates, shown in response-code details."""
        return f"ns[{self.namespace}]-policy[{self.name}]-rule[{index}]"


# --- evaluation --------------------------------------------------------------------------------------


def _principal_of_sa(sa: str) -> tuple[str, str]:
    ns, _, name = sa.partition("/")
    return ns, name


def _service_account_matches(accounts: Sequence[str], principal: str | None) -> bool:
    if principal is None:
        return False
    for sa in accounts:
        ns, name = _principal_of_sa(sa)
        if principal.endswith(f"/ns/{ns}/sa/{name}"):
            return True
    return False


def _source_matches(src: Source, req: RequestView, action: Action) -> bool:
    if src.unsupported and action is Action.ALLOW:
        # Fail closed: an ALLOW cannot be proven on an attribute we cannot see; a DENY assumes it holds.
        return False
    principal = req.source_principal
    checks = [
        (src.principals, lambda: _any(src.principals, principal)),
        (src.not_principals, lambda: not _any(src.not_principals, principal)),
        (src.namespaces, lambda: _any(src.namespaces, req.source_namespace)),
        (src.not_namespaces, lambda: not _any(src.not_namespaces, req.source_namespace)),
        (src.service_accounts, lambda: _service_account_matches(src.service_accounts, principal)),
        (src.not_service_accounts, lambda: not _service_account_matches(src.not_service_accounts, principal)),
        (src.ip_blocks, lambda: _in_blocks(src.ip_blocks, req.source_ip)),
        (src.not_ip_blocks, lambda: not _in_blocks(src.not_ip_blocks, req.source_ip)),
        (src.remote_ip_blocks, lambda: _in_blocks(src.remote_ip_blocks, req.remote_ip or req.source_ip)),
        (src.not_remote_ip_blocks,
         lambda: not _in_blocks(src.not_remote_ip_blocks, req.remote_ip or req.source_ip)),
    ]
    return all(check() for values, check in checks if values)


def _method(req: RequestView) -> str:
    # Istio: gRPC requests always count as POST, whatever the shell decoded.
    return "POST" if req.is_grpc else req.method


def _operation_matches(op: Operation, req: RequestView) -> bool:
    path = req.path_only
    checks = [
        (op.hosts, lambda: _any(op.hosts, req.authority)),
        (op.not_hosts, lambda: not _any(op.not_hosts, req.authority)),
        (op.ports, lambda: req.destination_port in op.ports),
        (op.not_ports, lambda: req.destination_port not in op.not_ports),
        (op.methods, lambda: _any(op.methods, _method(req))),
        (op.not_methods, lambda: not _any(op.not_methods, _method(req))),
        (op.paths, lambda: any(p.matches(path) for p in op.paths)),
        (op.not_paths, lambda: not any(p.matches(path) for p in op.not_paths)),
    ]
    return all(check() for values, check in checks if values)


def _header_values(req: RequestView, name: str) -> list[str]:
    # Istio matches a header value against each comma-separated element and the whole line.
    out: list[str] = []
    for raw in req.headers.get_all(name):
        out.append(raw)
        out.extend(p.strip() for p in raw.split(",") if "," in raw)
    return out


def _condition_value_matches(cond: Condition, value: str, req: RequestView) -> bool:
    key = cond.key
    if key in ("source.ip", "remote.ip", "destination.ip"):
        ip = {"source.ip": req.source_ip, "remote.ip": req.remote_ip or req.source_ip,
              "destination.ip": req.destination_ip}[key]
        try:
            block = ipaddress.ip_network(value, strict=False)
        except ValueError:
            return False
        return _in_blocks((block,), ip)
    if key == "destination.port":
        return value.isdigit() and req.destination_port == int(value)
    match = WildcardMatch(value)
    if key.startswith("request.headers["):
        name = key[len("request.headers["):-1]
        return any(match.matches(v) for v in _header_values(req, name))
    if key == "source.namespace":
        return match.matches(req.source_namespace)
    if key == "source.principal":
        return match.matches(req.source_principal)
    if key == "connection.sni":
        return match.matches(req.sni)
    return False


def _condition_matches(cond: Condition, req: RequestView, action: Action) -> bool:
    if not cond.supported:
        return action is Action.DENY
    if cond.values and not any(_condition_value_matches(cond, v, req) for v in cond.values):
        return False
    return not (cond.not_values and any(_condition_value_matches(cond, v, req) for v in cond.not_values))


def rule_matches(rule: Rule, req: RequestView, action: Action) -> bool:
    if rule.sources and not any(_source_matches(s, req, action) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_matches(o, req) for o in rule.operations):
        return False
    return all(_condition_matches(c, req, action) for c in rule.conditions)


def matching_rule(policy: AuthzPolicy, req: RequestView) -> int | None:
    """The index of the first rule of `policy` that matches, or None."""
    if policy.rules is None:
        return None
    for i, rule in enumerate(policy.rules):
        if rule_matches(rule, req, policy.action):
            return i
    return None


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    policy: str | None = None  # the matched rule's RBAC name (DENY that denied, or ALLOW that allowed)
    reason: str = ""
    evaluated: tuple[str, ...] = field(default_factory=tuple)

    def reply(self) -> LocalReply:
        """The 403 to send when denied."""
        return rbac_denied(self.policy)


def evaluate(policies: Sequence[AuthzPolicy], req: RequestView) -> AuthzDecision:
    """DENY first, then ALLOW, with Istio's defaults. `policies` are those bound to the destination."""
    keys = tuple(p.key for p in policies)
    for policy in policies:
        if policy.action is Action.DENY:
            idx = matching_rule(policy, req)
            if idx is not None:
                return AuthzDecision(False, policy.rule_id(idx), f"denied by DENY policy {policy.key}", keys)
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return AuthzDecision(True, None, "no ALLOW policy applies", keys)
    for policy in allows:
        idx = matching_rule(policy, req)
        if idx is not None:
            return AuthzDecision(True, policy.rule_id(idx), f"allowed by ALLOW policy {policy.key}", keys)
    return AuthzDecision(False, None, "ALLOW policies exist but none matched", keys)

"""L4 authorization: the decision for one connection, as ztunnel makes it at the destination.

Pure functions over immutable inputs, so the same code decides a new connection, re-checks live ones
after a policy change, and is tested exhaustively without sockets.

The algorithm is Istio's: a matching DENY denies; with no ALLOW policy at all the connection is allowed;
a matching ALLOW allows; anything else is denied. Matching follows ztunnel's `rbac.rs` exactly:
- a policy matches when any of its rules matches (no rules: it never matches);
- a rule matches when all its clauses match (no clauses: it always matches);
- a clause matches when any of its matches does (no matches: it matches); a Match with no field set is
  skipped, i.e. it never matches;
- inside a Match every field that is set must hold: any value of a positive field, none of a `not_`
  field.
The peer's namespace and service account come from its SPIFFE identity; a plaintext peer has none, so it
fails every positive identity field and passes every `not_` one. Principals are compared without the
`spiffe://` scheme, as Istio writes them (`cluster.local/ns/default/sa/sleep`).

Dry-run policies never change the decision; the decision reports which of them matched and what the
verdict would be if they were enforced, so an operator can try a policy on live traffic first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from mesh.config.model import (
    SPIFFE_SCHEME,
    Action,
    Authorization,
    IPAddress,
    Match,
    Workload,
)
from mesh.config.store import MeshSnapshot

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Peer:
    """The source identity split into the parts policies match on ("" when there is none)."""

    principal: str  # the SPIFFE ID without "spiffe://"
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def present(self) -> bool:
        return self.principal != ""


NO_PEER = Peer("", "", "", "")


@lru_cache(maxsize=4096)
def _parse_identity(text: str) -> Peer:
    rest = text[len(SPIFFE_SCHEME) :] if text.startswith(SPIFFE_SCHEME) else text
    parts = rest.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and all(parts):
        return Peer(rest, parts[0], parts[2], parts[4])
    # Not a workload identity: only principal patterns can match it, never namespace/SA fields.
    return Peer(rest, "", "", "")


def peer_of(identity: Any) -> Peer:
    """A Peer from None, a SPIFFE ID string, or an object with trust_domain/namespace/service_account."""
    if identity is None or identity == "":
        return NO_PEER
    if isinstance(identity, Peer):
        return identity
    if isinstance(identity, str):
        return _parse_identity(identity)
    td = getattr(identity, "trust_domain", None)
    ns = getattr(identity, "namespace", None)
    sa = getattr(identity, "service_account", None)
    if isinstance(td, str) and isinstance(ns, str) and isinstance(sa, str):
        return Peer(f"{td}/ns/{ns}/sa/{sa}", td, ns, sa)
    return _parse_identity(str(identity))


def _ip(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    return ipaddress.ip_address(value)


@dataclass(frozen=True)
class ConnInfo:
    """What the destination knows about a connection when it decides.

    `src_identity` is the peer's verified SPIFFE ID (a `SpiffeId` or its string), None for plaintext.
    `dst_uid`, `dst_namespace` and `dst_labels` describe the destination workload; they are only used to
    find the applicable policies when the caller does not pass them (see `authorize`).
    """

    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int
    src_identity: Any = None
    src_port: int = 0
    dst_uid: str | None = None
    dst_namespace: str = ""
    dst_labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_ip", _ip(self.src_ip))
        object.__setattr__(self, "dst_ip", _ip(self.dst_ip))
        if not 0 <= int(self.dst_port) <= 65535:
            raise ValueError(f"dst_port {self.dst_port} is not a port number")

    @property
    def peer(self) -> Peer:
        return peer_of(self.src_identity)


class Reason(StrEnum):
    DENY_MATCHED = "denied by a DENY policy"
    NO_ALLOW_POLICY = "no ALLOW policy applies"
    ALLOW_MATCHED = "allowed by an ALLOW policy"
    NO_ALLOW_MATCHED = "no ALLOW policy matched"
    UNKNOWN_DESTINATION = "destination workload unknown"


@dataclass(frozen=True)
class Decision:
    """The verdict. `policy` is the "namespace/name" of the deciding policy, if one decided.

    `dry_run_matched` lists the dry-run policies that matched; `dry_run_allowed` is the verdict had they
    been enforced (None when no dry-run policy applies).
    """

    allowed: bool
    policy: str | None
    reason: Reason
    dry_run_matched: tuple[str, ...] = ()
    dry_run_allowed: bool | None = None

    @property
    def response_flags(self) -> str:
        """The `response_flags` metric label: `DENY` for a denied connection, `-` otherwise."""
        return "-" if self.allowed else "DENY"

    def __str__(self) -> str:
        verdict = "allow" if self.allowed else "deny"
        by = f" ({self.policy})" if self.policy else ""
        return f"{verdict}: {self.reason.value}{by}"


# --- matching -----------------------------------------------------------------------------------------


def _field(positive: tuple[Any, ...], negative: tuple[Any, ...], test: Any) -> bool:
    if positive and not any(test(v) for v in positive):
        return False
    return not (negative and any(test(v) for v in negative))


def match_matches(m: Match, conn: ConnInfo, peer: Peer) -> bool:
    """One Match against a connection (an empty Match is the caller's business: it never matches)."""
    src, dst, port = conn.src_ip, conn.dst_ip, conn.dst_port
    if not _field(m.destination_ips, m.not_destination_ips, lambda n: dst in n):
        return False
    if not _field(m.source_ips, m.not_source_ips, lambda n: src in n):
        return False
    if not _field(m.destination_ports, m.not_destination_ports, lambda p: p == port):
        return False
    if not _field(
        m.service_accounts,
        m.not_service_accounts,
        lambda sa: peer.present and sa.namespace == peer.namespace and sa.service_account == peer.service_account,
    ):
        return False
    # A plaintext peer has no principal: every StringMatch fails on it (presence needs non-empty).
    if not _field(m.principals, m.not_principals, lambda s: peer.present and s.matches(peer.principal)):
        return False
    return _field(m.namespaces, m.not_namespaces, lambda s: s.matches(peer.namespace))


def policy_matches(policy: Authorization, conn: ConnInfo, peer: Peer | None = None) -> bool:
    if peer is None:
        peer = conn.peer
    for rule in policy.rules:
        rule_ok = True
        for clause in rule:
            if not clause:
                continue
            if not any(not m.is_empty() and match_matches(m, conn, peer) for m in clause):
                rule_ok = False
                break
        if rule_ok:
            return True
    return False


def _decide(
    conn: ConnInfo, peer: Peer, deny: list[Authorization], allow: list[Authorization]
) -> tuple[bool, Reason, str | None]:
    for pol in deny:
        if policy_matches(pol, conn, peer):
            return False, Reason.DENY_MATCHED, pol.key
    if not allow:
        return True, Reason.NO_ALLOW_POLICY, None
    for pol in allow:
        if policy_matches(pol, conn, peer):
            return True, Reason.ALLOW_MATCHED, pol.key
    return False, Reason.NO_ALLOW_MATCHED, None


def evaluate(conn: ConnInfo, policies: Iterable[Authorization]) -> Decision:
    """Decide one connection against the policies that apply to its destination."""
    peer = conn.peer
    deny: list[Authorization] = []
    allow: list[Authorization] = []
    dry: list[Authorization] = []
    seen: set[str] = set()
    for pol in policies:
        if pol.key in seen:
            continue
        seen.add(pol.key)
        if pol.dry_run:
            dry.append(pol)
        elif pol.action is Action.DENY:
            deny.append(pol)
        else:
            allow.append(pol)
    allowed, reason, key = _decide(conn, peer, deny, allow)
    if not dry:
        return Decision(allowed, key, reason)
    matched = tuple(p.key for p in dry if policy_matches(p, conn, peer))
    shadow_allowed, _, _ = _decide(
        conn,
        peer,
        deny + [p for p in dry if p.action is Action.DENY],
        allow + [p for p in dry if p.action is Action.ALLOW],
    )
    return Decision(allowed, key, reason, dry_run_matched=matched, dry_run_allowed=shadow_allowed)


# --- which policies apply -------------------------------------------------------------------------------


def policies_for(workload: Workload, state: MeshSnapshot) -> list[Authorization]:
    """The policies that apply to a destination workload: its namespace's, the global ones, and the
    selector policies that select it (listed by the control plane, or matched by labels here)."""
    out = list(state.namespace_policies(workload.namespace))
    out.extend(state.global_policies())
    out.extend(state.selected_policies(workload))
    return out


def destination_of(conn: ConnInfo, state: MeshSnapshot) -> Workload | None:
    """The destination workload: by uid when the caller knows it, else by destination IP."""
    if conn.dst_uid is not None:
        wl = state.workload(conn.dst_uid)
        if wl is not None:
            return wl
    return state.workload_by_ip(conn.dst_ip)


def authorize(conn: ConnInfo, state: MeshSnapshot) -> Decision:
    """Find the destination workload and its policies in `state`, then decide.

    An unknown destination is denied (fail closed), as ztunnel does.
    """
    wl = destination_of(conn, state)
    if wl is None:
        return Decision(False, None, Reason.UNKNOWN_DESTINATION)
    return evaluate(conn, policies_for(wl, state))

"""Policy routing inside a pod's namespace that turns the pod's outbound TCP into local
deliveries, where the sk_lookup program hands them to the agent's 15001 listener.

The rules, in the pod's namespace only (never the node's):

====  ========================================================  ======================
pref  selector                                                  lookup
====  ========================================================  ======================
9000  ``fwmark 0x539/0xfff`` (the agent's own sockets)          main
9001  ``to <excluded CIDR | node address | 169.254.7.127>``     main
9001  ``ipproto tcp dport <excluded outbound port>``            main
9001  ``ipproto tcp sport <excluded inbound port | 15008>``     main
9002  ``ipproto tcp [to <capture CIDR>]``                       15001
====  ========================================================  ======================

and table 15001 holds one route, ``local 0.0.0.0/0 dev lo src <pod IP>`` (without
``src`` the kernel picks no source and ``connect()`` fails with ENETUNREACH).

Why the ``sport`` and node-address rules: routing has no notion of "reply". An
uncaptured inbound connection (a kubelet probe, an excluded port) is answered by the
application's socket, which is unmarked TCP and would otherwise take the capture route
and be delivered back to the pod itself. Replies of captured connections come from the
agent's marked sockets and take rule 9000. The price: an outbound connection whose
*ephemeral source port* equals an excluded inbound port is not captured either
(ephemeral ports start at 32768, excluded inbound ports are service ports).

The local table (pref 0) still comes first, so loopback and the pod's own IP are never
captured. Only TCP is matched: DNS over UDP and everything else routes as before.

Two per-namespace settings make the replies of *remote* peers survive the kernel's
reverse-path check: with a TCP-wide local route in place, validating the source of any
incoming TCP packet finds "local", which the kernel only accepts with ``accept_local=1``
on the receiving interface, and never with strict ``rp_filter`` (1). So the agent sets
``accept_local=1`` on the pod's eth0 and, only if reverse-path filtering there is strict,
makes it loose (2). It records the previous values and puts them back on removal.

This module is the only writer of these rules. It plans (pure functions), reads what is
there, and changes only the difference, so re-adopting a pod after an agent restart
touches nothing when nothing changed and a live connection never sees a gap.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from agent.redirect.exclusions import CaptureExclusions
from agent.redirect.model import HBONE_PORT, MESH_MARK, MESH_MARK_MASK
from mesh.netns import NetnsRef, run_in_netns

TPROXY_MARK = 0x111
PREF_MARK = 9000
PREF_EXCLUDE = 9001
PREF_CAPTURE = 9002
OUR_PREFS = (PREF_MARK, PREF_EXCLUDE, PREF_CAPTURE)
CAPTURE_TABLE = 15001
MAIN_TABLE = 254
IPPROTO_TCP = 6
RTN_LOCAL = 2
RT_SCOPE_HOST = 254


@dataclass(frozen=True, order=True)
class RuleSpec:
    """One ``ip rule``; ``None`` means the selector is absent."""

    priority: int
    table: int
    dst: str | None = None  # "a.b.c.d/len"
    fwmark: int | None = None
    fwmask: int | None = None
    ipproto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None

    def describe(self) -> str:
        parts = [f"{self.priority}:"]
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}/{(self.fwmask or 0xFFFFFFFF):#x}")
        if self.dst:
            parts.append(f"to {self.dst}")
        if self.ipproto == IPPROTO_TCP:
            parts.append("ipproto tcp")
        for name, rng in (("sport", self.sport), ("dport", self.dport)):
            if rng:
                parts.append(f"{name} {rng[0]}" if rng[0] == rng[1] else f"{name} {rng[0]}-{rng[1]}")
        parts.append("lookup " + ("main" if self.table == MAIN_TABLE else str(self.table)))
        return " ".join(parts)


@dataclass(frozen=True, order=True)
class RouteSpec:
    table: int
    dst: str
    kind: str  # "local"
    dev: str  # "lo"
    src: str

    def describe(self) -> str:
        return f"{self.kind} {self.dst} dev {self.dev} table {self.table} src {self.src}"


# --- planning (pure) ------------------------------------------------------------------------


def plan_rules(exclusions: CaptureExclusions, node_addresses: tuple[IPv4Network, ...]) -> list[RuleSpec]:
    rules = [RuleSpec(PREF_MARK, MAIN_TABLE, fwmark=MESH_MARK, fwmask=MESH_MARK_MASK)]
    bypass = list(dict.fromkeys([*exclusions.outbound_cidrs, *node_addresses]))
    rules += [RuleSpec(PREF_EXCLUDE, MAIN_TABLE, dst=str(net)) for net in bypass]
    rules += [
        RuleSpec(PREF_EXCLUDE, MAIN_TABLE, ipproto=IPPROTO_TCP, dport=(p, p)) for p in sorted(exclusions.outbound_ports)
    ]
    # 15008 too: with the agent down (restarting), the kernel answers a tunnel's SYN with a RST that no
    # socket marks; without this rule it would be "captured" back into the pod and the remote agent would
    # wait for a timeout instead of seeing the refusal at once.
    reply_ports = sorted({*exclusions.inbound_ports, HBONE_PORT})
    rules += [RuleSpec(PREF_EXCLUDE, MAIN_TABLE, ipproto=IPPROTO_TCP, sport=(p, p)) for p in reply_ports]
    if exclusions.capture_cidrs is None:
        rules.append(RuleSpec(PREF_CAPTURE, CAPTURE_TABLE, ipproto=IPPROTO_TCP))
    else:
        rules += [
            RuleSpec(PREF_CAPTURE, CAPTURE_TABLE, dst=str(net), ipproto=IPPROTO_TCP) for net in exclusions.capture_cidrs
        ]
    return rules


def plan_rules_nftables() -> list[RuleSpec]:
    """The nftables backend captures with nat rules; routing only brings the application's replies
    to connections the agent opened with the client's address back to the agent (see nftables.py)."""
    return [RuleSpec(PREF_CAPTURE, CAPTURE_TABLE, fwmark=TPROXY_MARK, fwmask=MESH_MARK_MASK)]


def plan_routes(pod_ip: IPv4Address) -> list[RouteSpec]:
    return [RouteSpec(CAPTURE_TABLE, "0.0.0.0/0", "local", "lo", str(pod_ip))]


@dataclass(frozen=True)
class RoutingDiff:
    add_rules: list[RuleSpec]
    del_rules: list[RuleSpec]
    add_routes: list[RouteSpec]
    del_routes: list[RouteSpec]

    @property
    def empty(self) -> bool:
        return not (self.add_rules or self.del_rules or self.add_routes or self.del_routes)


def diff(
    want_rules: list[RuleSpec], have_rules: list[RuleSpec], want_routes: list[RouteSpec], have_routes: list[RouteSpec]
) -> RoutingDiff:
    """What to change to get from ``have`` to ``want``; order of additions is kept
    (rules sharing a priority are evaluated in insertion order, and all ours at one
    priority lead to the same table, so order within one never changes a decision)."""
    return RoutingDiff(
        add_rules=[r for r in want_rules if r not in have_rules],
        del_rules=[r for r in have_rules if r not in want_rules],
        add_routes=[r for r in want_routes if r not in have_routes],
        del_routes=[r for r in have_routes if r not in want_routes],
    )


# --- reading and writing (netlink, inside the namespace) ------------------------------------


def _range(value: Any) -> tuple[int, int] | None:
    if not value:
        return None
    a, _, b = str(value).partition(":")
    return int(a), int(b or a)


def _rule_from_msg(msg: Any) -> RuleSpec:
    dst = msg.get("FRA_DST")
    return RuleSpec(
        priority=msg.get("FRA_PRIORITY") or 0,
        table=msg.get("FRA_TABLE") or msg["table"],
        dst=f"{dst}/{msg['dst_len']}" if dst else None,
        fwmark=msg.get("FRA_FWMARK"),
        fwmask=msg.get("FRA_FWMASK") if msg.get("FRA_FWMARK") is not None else None,
        ipproto=msg.get("FRA_IP_PROTO"),
        sport=_range(msg.get("FRA_SPORT_RANGE")),
        dport=_range(msg.get("FRA_DPORT_RANGE")),
    )


def _rule_kwargs(rule: RuleSpec) -> dict[str, Any]:
    kw: dict[str, Any] = {"priority": rule.priority, "table": rule.table, "family": socket.AF_INET}
    if rule.dst:
        addr, _, plen = rule.dst.partition("/")
        kw.update(dst=addr, dst_len=int(plen))
    if rule.fwmark is not None:
        kw.update(fwmark=rule.fwmark, fwmask=rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF)
    if rule.ipproto is not None:
        kw["ip_proto"] = rule.ipproto
    if rule.sport:
        kw["sport_range"] = f"{rule.sport[0]}:{rule.sport[1]}"
    if rule.dport:
        kw["dport_range"] = f"{rule.dport[0]}:{rule.dport[1]}"
    return kw


def _read(ipr: Any) -> tuple[list[RuleSpec], list[RouteSpec]]:
    rules = [_rule_from_msg(m) for m in ipr.get_rules(family=socket.AF_INET)]
    ours = [r for r in rules if r.priority in OUR_PREFS]
    routes: list[RouteSpec] = []
    for m in ipr.get_routes(family=socket.AF_INET, table=CAPTURE_TABLE):
        if (m.get("RTA_TABLE") or m["table"]) != CAPTURE_TABLE:
            continue
        dst = m.get("RTA_DST") or "0.0.0.0"
        kind = "local" if m["type"] == RTN_LOCAL else str(m["type"])
        dev = "lo" if m.get("RTA_OIF") == 1 else str(m.get("RTA_OIF"))
        routes.append(RouteSpec(CAPTURE_TABLE, f"{dst}/{m['dst_len']}", kind, dev, m.get("RTA_PREFSRC") or ""))
    return ours, routes


def _route_kwargs(route: RouteSpec) -> dict[str, Any]:
    return {
        "dst": route.dst,
        "table": route.table,
        "oif": 1,
        "type": RTN_LOCAL,
        "scope": RT_SCOPE_HOST,
        "prefsrc": route.src,
        "family": socket.AF_INET,
    }


def read(netns: NetnsRef) -> tuple[list[RuleSpec], list[RouteSpec]]:
    """Our rules (by priority) and our capture table's routes, as installed in ``netns``."""
    from pyroute2 import IPRoute

    def body() -> tuple[list[RuleSpec], list[RouteSpec]]:
        with IPRoute() as ipr:
            return _read(ipr)

    return run_in_netns(netns, body)


def apply(netns: NetnsRef, rules: list[RuleSpec], routes: list[RouteSpec]) -> RoutingDiff:
    """Make ``netns`` hold exactly these rules and routes of ours; returns what changed.

    Order matters for a pod that is live: the route first and the capture rule last on
    install, so that no instant exists where TCP is sent to an empty table; the reverse on
    removal. An error leaves the namespace as it was before the call where it can.
    """
    from pyroute2 import IPRoute

    def body() -> RoutingDiff:
        with IPRoute() as ipr:
            have_rules, have_routes = _read(ipr)
            d = diff(rules, have_rules, routes, have_routes)
            done: list[tuple[str, Any]] = []
            try:
                # Removing first: a capture rule that should go must go before its route.
                for r in sorted(d.del_rules, key=lambda r: -r.priority):
                    ipr.rule("del", **_rule_kwargs(r))
                    done.append(("rule-del", r))
                for rt in d.del_routes:
                    ipr.route("del", **_route_kwargs(rt))
                    done.append(("route-del", rt))
                for rt in d.add_routes:
                    ipr.route("add", **_route_kwargs(rt))
                    done.append(("route-add", rt))
                for r in sorted(d.add_rules, key=lambda r: r.priority):
                    ipr.rule("add", **_rule_kwargs(r))
                    done.append(("rule-add", r))
            except Exception:
                _undo(ipr, done)
                raise
            return d

    return run_in_netns(netns, body)


def _undo(ipr: Any, done: list[tuple[str, Any]]) -> None:
    for what, obj in reversed(done):
        try:
            if what == "rule-add":
                ipr.rule("del", **_rule_kwargs(obj))
            elif what == "rule-del":
                ipr.rule("add", **_rule_kwargs(obj))
            elif what == "route-add":
                ipr.route("del", **_route_kwargs(obj))
            elif what == "route-del":
                ipr.route("add", **_route_kwargs(obj))
        except Exception:  # best effort: the original error is what the caller must see
            pass


def remove(netns: NetnsRef) -> RoutingDiff:
    """Delete every rule at our priorities and every route of our table in ``netns``."""
    return apply(netns, [], [])


# --- the sysctls the capture route needs (see the module docstring) --------------------------

_SYSCTL_DIR = "/proc/sys/net/ipv4/conf"


def sysctl_keys(eth0: str) -> list[str]:
    return [f"{eth0}/accept_local", f"{eth0}/rp_filter", "all/rp_filter"]


def read_sysctls(netns: NetnsRef, eth0: str) -> dict[str, int]:
    """The current values of the settings :func:`plan_sysctls` may change."""

    def body() -> dict[str, int]:
        out: dict[str, int] = {}
        for key in sysctl_keys(eth0):
            with open(f"{_SYSCTL_DIR}/{key}") as fh:
                out[key] = int(fh.read().strip())
        return out

    try:
        return run_in_netns(netns, body)
    except FileNotFoundError:
        raise FileNotFoundError(f"interface {eth0!r} does not exist in the pod namespace") from None


def plan_sysctls(current: dict[str, int], eth0: str) -> dict[str, int]:
    """The values to write (only those that differ from ``current``)."""
    want = {f"{eth0}/accept_local": 1}
    if current.get(f"{eth0}/rp_filter") == 1:
        want[f"{eth0}/rp_filter"] = 2
    if current.get("all/rp_filter") == 1:
        want["all/rp_filter"] = 2
    return {k: v for k, v in want.items() if current.get(k) != v}


def write_sysctls(netns: NetnsRef, values: dict[str, int]) -> None:
    if not values:
        return

    def body() -> None:
        for key, value in values.items():
            if ".." in key or key.startswith("/"):
                raise ValueError(f"bad sysctl key {key!r}")
            with open(f"{_SYSCTL_DIR}/{key}", "w") as fh:
                fh.write(str(value))

    run_in_netns(netns, body)

"""Where an outbound connection goes: the pure decision behind the 15001 listener.

It follows ztunnel's order (reference ztunnel.md §7, "How ztunnel routes to a waypoint"):
1. A Service VIP whose Service has a waypoint goes by HBONE to the waypoint, `:authority` = VIP:port, so
   the waypoint does the load balancing and L7 policy.
2. A Service VIP without one is load-balanced to a ready endpoint; a mesh endpoint is reached by HBONE to
   `podIP:15008` with `:authority` = podIP:targetPort, the expected identity being the endpoint's (plus the
   Service's subjectAltNames); a non-mesh endpoint by plain TCP.
3. A workload IP: its waypoint if it has one (unless the traffic comes from that waypoint), else HBONE
   when it is in the mesh, else plain TCP.
4. Anything else passes through unchanged.

No sockets here: the caller passes the snapshot and a chooser, and gets a plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.config import GatewayAddress, MeshSnapshot, NamespacedHostname, Service, Workload

HBONE_PORT = 15008
# The agent's own capture ports: a connection *to* one of them would loop back into the agent.
CAPTURE_PORTS = frozenset({15001, 15006})

Chooser = Callable[[Sequence[str]], "str | None"]


@dataclass(frozen=True)
class Hbone:
    """Tunnel to `dst` (ip, 15008) asking for `authority`; the server must prove one of `identities`."""

    dst: tuple[str, int]
    authority: str
    identities: tuple[str, ...]
    workload: Workload
    service: Service | None = None
    via_waypoint: bool = False

    @property
    def endpoint_key(self) -> str:
        return self.workload.uid


@dataclass(frozen=True)
class Direct:
    """Plain TCP to a known workload outside the mesh (protocol TCP)."""

    dst: tuple[str, int]
    workload: Workload
    service: Service | None = None

    @property
    def endpoint_key(self) -> str:
        return self.workload.uid


@dataclass(frozen=True)
class Passthrough:
    """A destination the mesh does not know: forwarded unchanged, as plain TCP."""

    dst: tuple[str, int]


@dataclass(frozen=True)
class Refuse:
    """No way to serve this connection; `reason` goes to the log and the response flag."""

    reason: str
    flag: str = "NR"


Plan = Hbone | Direct | Passthrough | Refuse


def _first_ip(w: Workload) -> str | None:
    return str(w.workload_ips[0]) if w.workload_ips else None


def waypoint_workloads(snap: MeshSnapshot, gw: GatewayAddress) -> list[Workload]:
    """The waypoint pods behind a GatewayAddress (an address of a pod or service, or a service hostname)."""
    dest = gw.destination
    svc: Service | None
    if isinstance(dest, NamespacedHostname):
        svc = snap.service(f"{dest.namespace}/{dest.hostname}")
    else:
        wl = snap.workload_by_ip(dest.address, dest.network)
        if wl is not None:
            return [wl]
        svc = snap.service_by_vip(dest.address, dest.network)
    if svc is None:
        return []
    return [wl for wl, _ in snap.ready_endpoints(svc.key)]


def _is_from(source: Workload | None, workloads: list[Workload]) -> bool:
    return source is not None and any(w.uid == source.uid for w in workloads)


def _to_waypoint(
    snap: MeshSnapshot, gw: GatewayAddress, source: Workload | None, authority: str, choose: Chooser,
    service: Service | None,
) -> Plan | None:
    """A plan through the waypoint, None when the source *is* that waypoint (it must reach the backend)."""
    pods = waypoint_workloads(snap, gw)
    if _is_from(source, pods):
        return None
    by_uid = {w.uid: w for w in pods if _first_ip(w)}
    key = choose(list(by_uid))
    if key is None:
        return Refuse("waypoint has no ready endpoint", "UH")
    wp = by_uid[key]
    return Hbone(dst=(_first_ip(wp) or "", gw.hbone_mtls_port), authority=authority, identities=(wp.identity,),
                 workload=wp, service=service, via_waypoint=True)


def _to_workload(wl: Workload, target_port: int, service: Service | None) -> Plan:
    ip = _first_ip(wl)
    if ip is None:
        return Refuse(f"workload {wl.uid} has no address", "UH")
    if wl.in_mesh:
        sans = (wl.identity, *(service.subject_alt_names if service else ()))
        return Hbone(dst=(ip, HBONE_PORT), authority=f"{ip}:{target_port}", identities=tuple(dict.fromkeys(sans)),
                     workload=wl, service=service)
    return Direct(dst=(ip, target_port), workload=wl, service=service)


def plan_outbound(snap: MeshSnapshot, source: Workload | None, dst_ip: str, dst_port: int, choose: Chooser) -> Plan:
    """Decide how to carry a connection from `source` to the original destination `dst_ip:dst_port`."""
    authority = f"{dst_ip}:{dst_port}"
    svc = snap.service_by_vip(dst_ip)
    if svc is not None:
        if svc.waypoint is not None:
            plan = _to_waypoint(snap, svc.waypoint, source, authority, choose, svc)
            if plan is not None:
                return plan
        if dst_port not in svc.ports:
            return Refuse(f"service {svc.key} has no port {dst_port}")
        ready = {wl.uid: (wl, ep) for wl, ep in snap.ready_endpoints(svc.key)}
        key = choose(list(ready))
        if key is None:
            return Refuse(f"service {svc.key} has no ready endpoint", "UH")
        wl, ep = ready[key]
        target = ep.ports.get(dst_port) or svc.ports.get(dst_port) or dst_port
        return _to_workload(wl, target, svc)

    wl = snap.workload_by_ip(dst_ip)
    if wl is not None:
        if dst_port in CAPTURE_PORTS and wl.in_mesh:
            return Refuse(f"{authority} is a capture port of the agent", "NR")
        if wl.waypoint is not None:
            plan = _to_waypoint(snap, wl.waypoint, source, authority, choose, None)
            if plan is not None:
                return plan
        return _to_workload(wl, dst_port, None)
    return Passthrough((dst_ip, dst_port))

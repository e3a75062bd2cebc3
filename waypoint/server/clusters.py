"""Where a request can go: the Service behind a CONNECT authority, its endpoints, and per-cluster state.

The mesh snapshot (workloads and services, shared with the node agents) answers "what is
`10.96.0.10:80`" and "which pods back `reviews`"; the waypoint config (DestinationRules) answers how to
treat each upstream *cluster* `(host, port, subset)`: load balancer, circuit-breaker ceilings and outlier
detection. Both change while requests are in flight, so lookups are cached per snapshot version and a
cluster keeps its live counters (active requests, ejections, connections) across config changes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.config import ConfigStore as MeshStore
from mesh.config import MeshSnapshot, Protocol, Service, Workload
from mesh.config.model import GatewayAddress, NamespacedHostname
from waypoint.config.model import Backend, ClusterPolicy, ServiceRef
from waypoint.config.store import WaypointConfig, WaypointIdentity
from waypoint.lb import Endpoint, HostPicker, LbKind, LoadBalancer, make_balancer
from waypoint.resilience.circuit import CircuitBreaker
from waypoint.resilience.outlier import OutlierDetector
from waypoint.server.upstream import ClusterConnections, UpstreamTarget


@dataclass(frozen=True, slots=True)
class Destination:
    """What the client addressed: a Service (VIP) or, for workload-addressed traffic, one pod."""

    port: int
    service: Service | None = None
    workload: Workload | None = None

    @property
    def service_ref(self) -> ServiceRef | None:
        return ServiceRef(self.service.namespace, self.service.name) if self.service is not None else None


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    workload: Workload
    ip: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class Resolver:
    """Mesh lookups for the waypoint, cached per mesh snapshot version."""

    def __init__(self, mesh: MeshStore, waypoint: WaypointIdentity, domain: str = "cluster.local") -> None:
        self.mesh = mesh
        self.waypoint = waypoint
        self.domain = domain
        self.own_hostname = f"{waypoint.name}.{waypoint.namespace}.svc.{domain}"
        self.own_addresses: set[str] = set()
        self._version = -1
        self._dest: dict[tuple[str, int], Destination | None] = {}
        self._eps: dict[tuple[str, int | None, tuple[tuple[str, str], ...]], tuple[list[Endpoint],
                                                                                   dict[str, EndpointInfo]]] = {}

    @property
    def snapshot(self) -> MeshSnapshot:
        snap = self.mesh.snapshot
        if snap.version != self._version:
            self._version = snap.version
            self._dest.clear()
            self._eps.clear()
        return snap

    def destination(self, ip: str, port: int) -> Destination | None:
        snap = self.snapshot
        key = (ip, port)
        if key in self._dest:
            return self._dest[key]
        found: Destination | None = None
        try:
            svc = snap.service_by_vip(ip)
            wl = None if svc is not None else snap.workload_by_ip(ip)
        except ValueError:
            svc = wl = None
        if svc is not None:
            found = Destination(port, service=svc)
        elif wl is not None:
            found = Destination(port, workload=wl)
        self._dest[key] = found
        return found

    def served_by_us(self, dest: Destination) -> bool:
        """Only traffic of Services/pods bound to this waypoint is accepted (Istio's waypoint rule)."""
        gw = dest.service.waypoint if dest.service is not None else dest.workload.waypoint if dest.workload else None
        return self._is_us(gw)

    def _is_us(self, gw: GatewayAddress | None) -> bool:
        if gw is None:
            return False
        target = gw.destination
        if isinstance(target, NamespacedHostname):
            return target.hostname == self.own_hostname and target.namespace == self.waypoint.namespace
        return str(target.address) in self.own_addresses

    def endpoints(self, backend: Backend, port: int, subset_labels: dict[str, str] | None = None
                  ) -> tuple[list[Endpoint], dict[str, EndpointInfo]]:
        """The ready endpoints of `backend`'s Service for service port `port`, as LB hosts."""
        snap = self.snapshot
        labels = tuple(sorted((subset_labels or {}).items()))
        key = (f"{backend.namespace}/{backend.host}", port, labels)
        cached = self._eps.get(key)
        if cached is not None:
            return cached
        svc = snap.service(key[0])
        hosts: list[Endpoint] = []
        infos: dict[str, EndpointInfo] = {}
        for wl, ep in snap.ready_endpoints(key[0]):
            if labels and any(wl.labels.get(k) != v for k, v in labels):
                continue
            if not wl.workload_ips:
                continue
            target = ep.ports.get(port) or (svc.ports.get(port) if svc is not None else None) or port
            info = EndpointInfo(wl, str(wl.workload_ips[0]), int(target))
            host = Endpoint(info.address, max(1, wl.capacity))
            hosts.append(host)
            infos[host.address] = info
        result = (hosts, infos)
        self._eps[key] = result
        return result

    def workload_by_ip(self, ip: str | None) -> Workload | None:
        if not ip:
            return None
        try:
            return self.snapshot.workload_by_ip(ip)
        except ValueError:
            return None


class Cluster:
    """The live state of one upstream cluster: breaker, connections, outlier detector, balancer."""

    def __init__(self, name: str, policy: ClusterPolicy, rng: random.Random, clock: Callable[[], float]) -> None:
        self.name = name
        self.policy = policy
        self.rng = rng
        self.clock = clock
        self.breaker = CircuitBreaker(policy.thresholds)
        self.connections = ClusterConnections(name, self.breaker, policy.idle_timeout)
        self.outlier = OutlierDetector(policy.outlier, clock) if policy.outlier is not None else None
        self.balancer: LoadBalancer = make_balancer(policy.lb, rng)
        self.active: dict[str, int] = {}
        self._hosts_key: tuple[str, ...] = ()
        self.version = -1

    def update(self, policy: ClusterPolicy) -> None:
        if policy == self.policy:
            return
        old, self.policy = self.policy, policy
        self.breaker.thresholds = policy.thresholds
        self.connections.idle_timeout = policy.idle_timeout
        if policy.lb != old.lb:
            self.balancer = make_balancer(policy.lb, self.rng)
        if policy.outlier != old.outlier:
            self.outlier = OutlierDetector(policy.outlier, self.clock) if policy.outlier is not None else None
            self._hosts_key = ()

    def healthy(self, hosts: list[Endpoint]) -> list[Endpoint]:
        if self.outlier is None:
            return hosts
        key = tuple(h.address for h in hosts)
        if key != self._hosts_key:
            self._hosts_key = key
            self.outlier.set_hosts(list(key))
        ejected = self.outlier.ejected()
        if not ejected:
            return hosts
        healthy = [h for h in hosts if h.address not in ejected]
        threshold = self.outlier.config.min_health_percent
        if threshold > 0 and hosts and 100.0 * len(healthy) / len(hosts) < threshold:
            return hosts
        return healthy

    def active_requests(self, host: Endpoint) -> int:
        return self.active.get(host.address, 0)

    def picker(self, max_attempts: int) -> HostPicker:
        return HostPicker(self.balancer, max_attempts)

    @property
    def passthrough(self) -> bool:
        return self.policy.lb.kind is LbKind.PASSTHROUGH


class Clusters:
    """Cluster state by (host, port, subset), refreshed from the waypoint config when it changes."""

    def __init__(self, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rng = rng or random.Random()
        self.clock = clock
        self._clusters: dict[tuple[str, int, str | None], Cluster] = {}

    def get(self, config: WaypointConfig, backend: Backend, port: int) -> Cluster | None:
        """The cluster for `backend` at service port `port`; None when its subset is not defined."""
        key = (backend.host, port, backend.subset)
        cluster = self._clusters.get(key)
        if cluster is not None and cluster.version == config.version:
            return cluster
        policy = config.cluster_policy(backend.host, port, backend.subset)
        if policy is None:
            return None
        if cluster is None:
            subset = f"http/{backend.subset}" if backend.subset else "http"
            cluster = Cluster(f"inbound-vip|{port}|{subset}|{backend.host}", policy, self.rng, self.clock)
            self._clusters[key] = cluster
        else:
            cluster.update(policy)
        cluster.version = config.version
        return cluster

    def tick(self) -> None:
        """The outlier detectors' interval sweep."""
        for cluster in self._clusters.values():
            if cluster.outlier is not None:
                cluster.outlier.tick()

    def all(self) -> list[Cluster]:
        return list(self._clusters.values())


def target_for(info: EndpointInfo, http2: bool) -> UpstreamTarget:
    return UpstreamTarget(info.ip, info.port, info.workload.identity, http2)


def in_mesh(workload: Workload) -> bool:
    return workload.protocol is Protocol.HBONE

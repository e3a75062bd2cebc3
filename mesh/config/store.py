"""The mesh state every connection consults: one immutable snapshot, rebuilt and swapped on each change.

Several sources feed it (the lab state, a local config file, policy files, later the Kubernetes watch).
Each source owns its contribution and replaces it whole; the store merges all contributions into a new
`MeshSnapshot` with its lookup indexes and swaps it in one assignment, so a reader always sees a
consistent state without locks. Subscribers are told after each swap, with what kind of thing changed,
so the agent can re-check live connections when authorization may have changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mesh.config.model import (
    DEFAULT_ROOT_NAMESPACE,
    Authorization,
    ConfigSet,
    Endpoint,
    HealthStatus,
    IPAddress,
    NetworkAddress,
    NetworkMode,
    Protocol,
    Scope,
    Service,
    Workload,
)

log = logging.getLogger(__name__)

_NONE: tuple[Any, ...] = ()


def _addr(ip: Any, network: str) -> NetworkAddress:
    import ipaddress

    return NetworkAddress(network, ip if not isinstance(ip, str) else ipaddress.ip_address(ip))


def _rank(w: Workload) -> tuple[bool, bool, str]:
    """Which of several workloads claiming one IP wins: a pod over other kinds (pods cannot spoof an IP
    the way a hand-written entry can), then one in the mesh, then a stable tie-break on uid. Pod uids
    look like `cluster//Pod/ns/name` or, with the version, `cluster//v1/Pod/ns/name`."""
    return ("/Pod/" in w.uid, w.protocol is Protocol.HBONE, w.uid)


@dataclass(frozen=True)
class MeshSnapshot:
    """A consistent view of the mesh. Never mutated: the store builds a new one for every change."""

    version: int = 0
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    policies: Mapping[str, Authorization] = field(default_factory=dict)
    conflicts: tuple[str, ...] = ()
    _by_addr: Mapping[NetworkAddress, Workload] = field(default_factory=dict, repr=False)
    _by_vip: Mapping[NetworkAddress, Service] = field(default_factory=dict, repr=False)
    _endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict, repr=False)
    _global: tuple[Authorization, ...] = field(default=(), repr=False)
    _by_namespace: Mapping[str, tuple[Authorization, ...]] = field(default_factory=dict, repr=False)
    _selected: Mapping[str, tuple[Authorization, ...]] = field(default_factory=dict, repr=False)

    # --- lookups ---------------------------------------------------------------------------------------

    def workload(self, uid: str) -> Workload | None:
        return self.workloads.get(uid)

    def workload_by_ip(self, ip: IPAddress | str, network: str = "") -> Workload | None:
        return self._by_addr.get(_addr(ip, network))

    def service(self, key: str) -> Service | None:
        """A service by its "namespace/hostname" key."""
        return self.services.get(key)

    def service_by_vip(self, ip: IPAddress | str, network: str = "") -> Service | None:
        return self._by_vip.get(_addr(ip, network))

    def lookup(self, ip: IPAddress | str, network: str = "") -> Workload | Service | None:
        """What an address is: a workload IP first, then a service VIP (ztunnel's order)."""
        addr = _addr(ip, network)
        return self._by_addr.get(addr) or self._by_vip.get(addr)

    def endpoints(self, service_key: str) -> tuple[Endpoint, ...]:
        """Every workload that names the service, healthy or not, with its port map."""
        return self._endpoints.get(service_key, _NONE)

    def ready_endpoints(self, service_key: str) -> list[tuple[Workload, Endpoint]]:
        """The endpoints that should receive traffic: healthy ones, or all under an AllowAll policy."""
        svc = self.services.get(service_key)
        out = []
        for ep in self._endpoints.get(service_key, _NONE):
            wl = self.workloads.get(ep.workload_uid)
            if wl is None:
                continue
            if svc is not None and not svc.accepts(ep.status):
                continue
            if svc is None and ep.status is not HealthStatus.HEALTHY:
                continue
            out.append((wl, ep))
        return out

    def services_of(self, workload: Workload) -> list[Service]:
        return [s for k in workload.services if (s := self.services.get(k)) is not None]

    def workloads_on_node(self, node: str) -> list[Workload]:
        return [w for w in self.workloads.values() if w.node == node]

    # --- policies --------------------------------------------------------------------------------------

    def global_policies(self) -> tuple[Authorization, ...]:
        return self._global

    def namespace_policies(self, namespace: str) -> tuple[Authorization, ...]:
        return self._by_namespace.get(namespace, _NONE)

    def selected_policies(self, workload: Workload) -> tuple[Authorization, ...]:
        """Policies that apply to this workload specifically: listed in its `authorization_policies`, or
        selecting it by labels. Computed for workloads in the snapshot; computed on the fly otherwise."""
        cached = self._selected.get(workload.uid)
        if cached is not None and self.workloads.get(workload.uid) is workload:
            return cached
        return _select(workload, self.policies, self.root_namespace)


def _select(
    workload: Workload, policies: Mapping[str, Authorization], root_namespace: str
) -> tuple[Authorization, ...]:
    out: dict[str, Authorization] = {}
    for key in workload.authorization_policies:
        pol = policies.get(key)
        if pol is None:
            log.debug("workload %s lists unknown policy %s", workload.uid, key)
            continue
        out[key] = pol
    for key, pol in policies.items():
        if key not in out and pol.selects(workload, root_namespace):
            out[key] = pol
    return tuple(out.values())


def build_snapshot(
    contributions: Iterable[tuple[str, ConfigSet]],
    *,
    version: int = 0,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> MeshSnapshot:
    """Merge contributions (in order; a later one wins a key collision, which is recorded) and index."""
    workloads: dict[str, Workload] = {}
    services: dict[str, Service] = {}
    policies: dict[str, Authorization] = {}
    owner: dict[tuple[str, str], str] = {}
    conflicts: list[str] = []

    def put(kind: str, table: dict[str, Any], key: str, obj: Any, source: str) -> None:
        prev = table.get(key)
        if prev is not None and prev != obj:
            conflicts.append(f"{kind} {key}: {source} overrides {owner[(kind, key)]}")
        table[key] = obj
        owner[(kind, key)] = source

    for source, cs in contributions:
        for w in cs.workloads:
            put("workload", workloads, w.uid, w, source)
        for s in cs.services:
            put("service", services, s.key, s, source)
        for p in cs.policies:
            put("policy", policies, p.key, p, source)

    by_addr: dict[NetworkAddress, Workload] = {}
    endpoints: dict[str, list[Endpoint]] = {}
    for w in workloads.values():
        if w.network_mode is not NetworkMode.HOST_NETWORK:
            for ip in w.workload_ips:
                addr = NetworkAddress(w.network, ip)
                current = by_addr.get(addr)
                if current is None or _rank(w) > _rank(current):
                    by_addr[addr] = w
        for svc_key, ports in w.services.items():
            endpoints.setdefault(svc_key, []).append(Endpoint(w.uid, ports, w.status))

    by_vip: dict[NetworkAddress, Service] = {}
    for s in services.values():
        for vip in s.vips:
            if vip in by_vip and by_vip[vip] is not s:
                conflicts.append(f"VIP {vip}: service {s.key} and {by_vip[vip].key} share it")
            by_vip[vip] = s

    global_pols: list[Authorization] = []
    by_ns: dict[str, list[Authorization]] = {}
    for p in policies.values():
        if p.scope is Scope.GLOBAL:
            global_pols.append(p)
        elif p.scope is Scope.NAMESPACE:
            by_ns.setdefault(p.namespace, []).append(p)

    selected = {uid: _select(w, policies, root_namespace) for uid, w in workloads.items()}

    for note in conflicts:
        log.warning("config conflict: %s", note)
    return MeshSnapshot(
        version=version,
        root_namespace=root_namespace,
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        policies=MappingProxyType(policies),
        conflicts=tuple(conflicts),
        _by_addr=MappingProxyType(by_addr),
        _by_vip=MappingProxyType(by_vip),
        _endpoints=MappingProxyType({k: tuple(v) for k, v in endpoints.items()}),
        _global=tuple(global_pols),
        _by_namespace=MappingProxyType({k: tuple(v) for k, v in by_ns.items()}),
        _selected=MappingProxyType(selected),
    )


def _authz_view(s: MeshSnapshot) -> tuple[dict[str, Authorization], dict[str, tuple[Any, ...]]]:
    """Everything an authorization decision depends on: policies, and the workload attributes that
    decide which policies apply and which workload an address is."""
    return dict(s.policies), {
        uid: (w.namespace, dict(w.labels), w.authorization_policies, w.workload_ips, w.network)
        for uid, w in s.workloads.items()
    }


@dataclass(frozen=True)
class SnapshotChange:
    """What a subscriber is told after a swap. `authz_changed` means a live connection's verdict may
    differ now (policies, or the labels/addresses that decide which policies apply)."""

    old: MeshSnapshot
    new: MeshSnapshot
    source: str
    workloads_changed: bool
    services_changed: bool
    authz_changed: bool


Subscriber = Callable[[SnapshotChange], None]


class ConfigStore:
    """Holds the current snapshot and the contribution of every source.

    Sources are merged by (priority, name): a higher priority wins a collision on the same key (uid,
    "ns/hostname", "ns/name"). Thread-safe; subscribers run in the thread that made the change, in the
    order they subscribed, and an exception in one is logged without stopping the others.
    """

    def __init__(self, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self._root_namespace = root_namespace
        self._lock = threading.RLock()
        self._sources: dict[str, tuple[int, ConfigSet]] = {}
        self._subscribers: list[Subscriber] = []
        self._snapshot = MeshSnapshot(root_namespace=root_namespace)

    @property
    def snapshot(self) -> MeshSnapshot:
        return self._snapshot

    @property
    def root_namespace(self) -> str:
        return self._root_namespace

    def sources(self) -> dict[str, ConfigSet]:
        with self._lock:
            return {name: cs for name, (_, cs) in self._sources.items()}

    def contribution(self, source: str) -> ConfigSet | None:
        entry = self._sources.get(source)
        return entry[1] if entry else None

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback` after every change; returns a function that unsubscribes it."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def replace(self, source: str, config: ConfigSet, *, priority: int = 0) -> MeshSnapshot:
        """Make `config` the whole contribution of `source`. A no-op when nothing changed."""
        with self._lock:
            if self._sources.get(source) == (priority, config):
                return self._snapshot
            self._sources[source] = (priority, config)
            return self._rebuild(source)

    def remove(self, source: str) -> MeshSnapshot:
        with self._lock:
            if source not in self._sources:
                return self._snapshot
            del self._sources[source]
            return self._rebuild(source)

    def _rebuild(self, source: str) -> MeshSnapshot:
        old = self._snapshot
        ordered = sorted(self._sources.items(), key=lambda kv: (kv[1][0], kv[0]))
        new = build_snapshot(
            [(name, cs) for name, (_, cs) in ordered],
            version=old.version + 1,
            root_namespace=self._root_namespace,
        )
        self._snapshot = new
        change = SnapshotChange(
            old=old,
            new=new,
            source=source,
            workloads_changed=dict(old.workloads) != dict(new.workloads),
            services_changed=dict(old.services) != dict(new.services),
            authz_changed=_authz_view(old) != _authz_view(new),
        )
        for cb in list(self._subscribers):
            try:
                cb(change)
            except Exception:
                log.exception("config subscriber %r failed", cb)
        return new

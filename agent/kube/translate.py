"""Kubernetes objects as the mesh's config model: the same `ConfigSet` the lab and local files feed.

Pure and sans-IO: `translate(objects)` takes the raw objects the watch holds (by kind) and returns a
`Translation`; it never talks to the API server, so it is tested with plain dicts and can be re-run on
every change. The rules are Istio ambient's, so a cluster's existing labels and policies mean here what
they mean there:

- **Pods** with an IP and phase `Running`, on *every* node, are workloads: the agent needs remote pods to
  route to them and to check who a peer is, not only the pods it captures. A pod is in the mesh
  (protocol HBONE) iff it is enrolled: `istio.io/dataplane-mode=ambient` on the pod, or on its namespace
  with the pod not saying `none`. A pod carrying `sidecar.istio.io/status` (an injected sidecar) or using
  the host network is never enrolled; it stays a plain TCP workload, known by address so the services in
  front of it keep their endpoints. A pod labelled `networking.istio.io/tunnel=http` (a waypoint, or a
  sidecar with HBONE) speaks HBONE itself: protocol HBONE with `native_tunnel`, never captured.
- **Services**: hostname `<name>.<ns>.svc.<domain>`, VIPs from `spec.clusterIPs` (and load-balancer
  ingress IPs), TCP ports only. A numeric `targetPort` is kept on the service; a named one is resolved per
  pod against its containers' ports (a pod without that port name is no endpoint for that port, as in
  Kubernetes) and the service records target 0 ("the endpoint's"). `publishNotReadyAddresses` means
  unready endpoints still get traffic (health policy AllowAll). ExternalName services have no address
  and are left out.
- **Endpoints**: a pod is an endpoint of each service whose selector picks it; a service without a
  selector gets the pods its EndpointSlices name (by `targetRef`, or by address). Health comes from the
  EndpointSlices that list the pod's address (`ready`, unset meaning ready; a terminating endpoint that
  is still `serving` counts as unready, as Istio marks terminating pods), and from the pod's `Ready`
  condition when no slice lists it yet.
- **Waypoints**: a `Gateway` of class `istio-waypoint` or `nodemesh-waypoint` with an HBONE listener.
  `istio.io/use-waypoint` on a Service or Pod, else on its namespace, names it (`name`, `ns/name`, or
  with `istio.io/use-waypoint-namespace`); `#none` opts out. The Gateway's `istio.io/waypoint-for`
  (`service` by default, `workload`, `all`, `none`) decides whether services, workloads or both use it.
  A name that matches no waypoint Gateway gives no waypoint (traffic goes direct, as in Istio) and a
  warning. The waypoint's own pods and Service never use a waypoint.
- **AuthorizationPolicies** go through `mesh.config.istio.translate_policy`; those with `targetRefs` are
  for waypoints and are kept aside in `waypoint_policies`, never enforced at L4.

An object that cannot be used is skipped, never fatal: it lands in `skipped` with its kind, key, the field
at fault and why, and everything else is translated as usual.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from mesh.config.errors import ConfigError
from mesh.config.istio import TranslatedPolicy, translate_policy
from mesh.config.labstate import (
    CLUSTER_DOMAIN,
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    ambient_enrolled,
)
from mesh.config.model import (
    DEFAULT_ROOT_NAMESPACE,
    HBONE_PORT,
    ConfigSet,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    LoadBalancer,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Protocol,
    Service,
    Workload,
)

DEFAULT_CLUSTER_ID = "Kubernetes"
WAYPOINT_CLASSES = frozenset({"istio-waypoint", "nodemesh-waypoint"})
WAYPOINT_FOR = "istio.io/waypoint-for"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
TUNNEL_LABEL = "networking.istio.io/tunnel"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NO_WAYPOINT = "#none"

_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class TranslateOptions:
    """Cluster-wide facts the objects do not carry."""

    cluster_id: str = DEFAULT_CLUSTER_ID
    trust_domain: str = ""  # "" means cluster.local, as in the model
    domain: str = CLUSTER_DOMAIN  # the cluster DNS suffix of service hostnames
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    network: str = ""
    waypoint_classes: frozenset[str] = WAYPOINT_CLASSES


@dataclass(frozen=True)
class Skipped:
    """An object left out of the model, and why; `field` is the path of the offending field."""

    kind: str
    key: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.kind} {self.key}: {where}{self.reason}"


@dataclass(frozen=True)
class Waypoint:
    """A waypoint Gateway as the mesh uses it: where it is reached and what kind of traffic it takes."""

    namespace: str
    name: str
    waypoint_for: str
    address: GatewayAddress

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def serves(self, what: str) -> bool:
        """Whether this waypoint takes traffic addressed to a `service` or to a `workload`."""
        return self.waypoint_for in (what, "all")


@dataclass(frozen=True)
class Translation:
    """The mesh config the cluster describes, plus what the node agent does not enforce itself."""

    config: ConfigSet
    waypoint_policies: tuple[TranslatedPolicy, ...] = ()
    waypoints: Mapping[str, Waypoint] = field(default_factory=lambda: MappingProxyType({}))
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()


class _Invalid(Exception):
    """A field of the object being translated is unusable; caught per object and turned into `Skipped`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --- small readers that name the field they refuse --------------------------------------------------------


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Invalid(path, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, path: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise _Invalid(path, f"expected a string, got {type(value).__name__}")
    return value


def _str_map(value: Any, path: str) -> dict[str, str]:
    m = _mapping(value, path)
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _Invalid(path, "expected a map of strings")
    return dict(m)


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _Invalid(path, f"{value!r} is not a port number (1-65535)")
    return value


def _ip(value: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise _Invalid(path, f"{value!r} is not an IP address") from None


@dataclass(frozen=True)
class _Meta:
    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


def _meta(obj: Any, namespaced: bool = True) -> _Meta:
    if not isinstance(obj, Mapping):
        raise _Invalid("", f"expected an object, got {type(obj).__name__}")
    meta = _mapping(obj.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _Invalid("metadata.name", "missing or not a string")
    ns = meta.get("namespace")
    if namespaced and (not isinstance(ns, str) or not ns):
        raise _Invalid("metadata.namespace", "missing or not a string")
    return _Meta(name, ns if namespaced else "", _str_map(meta.get("labels"), "metadata.labels"),
                 _str_map(meta.get("annotations"), "metadata.annotations"))


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping) and isinstance(obj.get("metadata"), Mapping):
        meta = obj["metadata"]
        parts = [p for p in (meta.get("namespace"), meta.get("name")) if isinstance(p, str) and p]
        if parts:
            return "/".join(parts)
    return "<unnamed>"


# --- the pieces ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pod:
    meta: _Meta
    obj: Mapping[str, Any]
    ips: tuple[IPAddress, ...]
    node: str
    service_account: str
    host_network: bool
    ready: bool
    terminating: bool
    container_ports: Mapping[tuple[str, str], int]  # (port name, protocol) -> containerPort


@dataclass(frozen=True)
class _ServicePort:
    port: int
    name: str
    protocol: str
    target: int | str  # a number, or a container port name


@dataclass(frozen=True)
class _Svc:
    meta: _Meta
    selector: Mapping[str, str] | None  # None: no selector (endpoints come from slices)
    vips: tuple[IPAddress, ...]
    ports: tuple[_ServicePort, ...]
    publish_not_ready: bool
    hostname: str

    @property
    def key(self) -> str:
        return f"{self.meta.namespace}/{self.hostname}"


def _pod(obj: Any) -> _Pod | None:
    """The facts of a pod the model needs; None when it is not (or no longer) a workload."""
    meta = _meta(obj)
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    phase = _str(status.get("phase"), "status.phase")
    ips: list[IPAddress] = []
    for n, item in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        ip = _ip(_mapping(item, f"status.podIPs[{n}]").get("ip"), f"status.podIPs[{n}].ip")
        if ip not in ips:
            ips.append(ip)
    if not ips and status.get("podIP"):
        ips.append(_ip(status["podIP"], "status.podIP"))
    if phase != "Running" or not ips:
        return None
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise _Invalid("spec.hostNetwork", "expected a boolean")
    ready = False
    for n, cond in enumerate(_list(status.get("conditions"), "status.conditions")):
        cond = _mapping(cond, f"status.conditions[{n}]")
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    ports: dict[tuple[str, str], int] = {}
    for c, container in enumerate(_list(spec.get("containers"), "spec.containers")):
        container = _mapping(container, f"spec.containers[{c}]")
        for p, cport in enumerate(_list(container.get("ports"), f"spec.containers[{c}].ports")):
            path = f"spec.containers[{c}].ports[{p}]"
            cport = _mapping(cport, path)
            name = _str(cport.get("name"), f"{path}.name")
            if name:
                proto = _str(cport.get("protocol"), f"{path}.protocol", "TCP")
                ports.setdefault((name, proto), _port(cport.get("containerPort"), f"{path}.containerPort"))
    meta_raw = obj.get("metadata") or {}
    return _Pod(
        meta=meta,
        obj=obj,
        ips=tuple(ips),
        node=_str(spec.get("nodeName"), "spec.nodeName"),
        service_account=_str(spec.get("serviceAccountName"), "spec.serviceAccountName") or "default",
        host_network=host_network,
        ready=ready,
        terminating=bool(meta_raw.get("deletionTimestamp")),
        container_ports=MappingProxyType(ports),
    )


def _service(obj: Any, domain: str) -> _Svc | None:
    meta = _meta(obj)
    spec = _mapping(obj.get("spec"), "spec")
    if spec.get("type") == "ExternalName":
        return None  # a DNS alias: no address of its own to route
    vips: list[IPAddress] = []
    cluster_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs")
    if not cluster_ips and spec.get("clusterIP") is not None:
        cluster_ips = [spec.get("clusterIP")]
    for n, ip in enumerate(cluster_ips):
        if ip in ("None", "", None):
            continue  # headless: endpoints are addressed directly
        vip = _ip(ip, f"spec.clusterIPs[{n}]")
        if vip not in vips:
            vips.append(vip)
    lb = _mapping(_mapping(obj.get("status"), "status").get("loadBalancer"), "status.loadBalancer")
    for n, ingress in enumerate(_list(lb.get("ingress"), "status.loadBalancer.ingress")):
        ingress = _mapping(ingress, f"status.loadBalancer.ingress[{n}]")
        if ingress.get("ip"):
            vip = _ip(ingress["ip"], f"status.loadBalancer.ingress[{n}].ip")
            if vip not in vips:
                vips.append(vip)
    ports: list[_ServicePort] = []
    for n, p in enumerate(_list(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{n}]"
        p = _mapping(p, path)
        port = _port(p.get("port"), f"{path}.port")
        protocol = _str(p.get("protocol"), f"{path}.protocol", "TCP")
        target = p.get("targetPort", port)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, int) and not isinstance(target, bool):
            target = _port(target, f"{path}.targetPort")
        elif not isinstance(target, str) or not _PORT_NAME.match(target) or len(target) > 15:
            raise _Invalid(f"{path}.targetPort", f"{target!r} is neither a port number nor a port name")
        if protocol == "TCP":  # the mesh carries TCP only
            ports.append(_ServicePort(port, _str(p.get("name"), f"{path}.name"), protocol, target))
    selector = spec.get("selector")
    return _Svc(
        meta=meta,
        selector=_str_map(selector, "spec.selector") or None,
        vips=tuple(vips),
        ports=tuple(ports),
        publish_not_ready=spec.get("publishNotReadyAddresses") is True,
        hostname=f"{meta.name}.{meta.namespace}.svc.{domain}",
    )


def _gateway(obj: Any, classes: frozenset[str], domain: str) -> Waypoint | None:
    meta = _meta(obj)
    spec = _mapping(obj.get("spec"), "spec")
    if _str(spec.get("gatewayClassName"), "spec.gatewayClassName") not in classes:
        return None  # an ingress or east-west gateway: not a waypoint
    waypoint_for = meta.labels.get(WAYPOINT_FOR, "service")
    if waypoint_for not in WAYPOINT_FOR_VALUES:
        raise _Invalid(f"metadata.labels[{WAYPOINT_FOR}]",
                       f"{waypoint_for!r} is not one of {', '.join(WAYPOINT_FOR_VALUES)}")
    hbone_port = None
    for n, listener in enumerate(_list(spec.get("listeners"), "spec.listeners")):
        listener = _mapping(listener, f"spec.listeners[{n}]")
        if listener.get("protocol") == "HBONE":
            hbone_port = _port(listener.get("port"), f"spec.listeners[{n}].port")
            break
    if hbone_port is None:
        raise _Invalid("spec.listeners", f"a waypoint needs a listener with protocol HBONE "
                                         f"(name mesh, port {HBONE_PORT})")
    ns = meta.namespace
    address = GatewayAddress(NamespacedHostname(ns, f"{meta.name}.{ns}.svc.{domain}"), hbone_port)
    return Waypoint(ns, meta.name, waypoint_for, address)


def _enrolled(pod: _Pod, ns_labels: Mapping[str, str]) -> bool:
    if pod.host_network:
        return False  # host-network pods share the node's namespace: nothing of theirs can be captured
    return ambient_enrolled({"labels": pod.meta.labels, "annotations": pod.meta.annotations}, ns_labels)


def _canonical(labels: Mapping[str, str], fallback: str) -> tuple[str, str]:
    name = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
            or labels.get("app") or fallback)
    revision = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
                or labels.get("version") or "latest")
    return name, revision


def _workload_name(pod: _Pod) -> tuple[str, str]:
    """(workload name, type) the way Istio names telemetry: a Deployment behind its ReplicaSet, a Job."""
    for ref in (pod.obj.get("metadata") or {}).get("ownerReferences") or []:
        if not isinstance(ref, Mapping) or not ref.get("controller"):
            continue
        kind, name = ref.get("kind"), ref.get("name")
        if not isinstance(name, str):
            continue
        if kind == "ReplicaSet":
            template_hash = pod.meta.labels.get("pod-template-hash")
            if template_hash and name.endswith(f"-{template_hash}"):
                return name[: -len(template_hash) - 1], "deployment"
            return name, "replicaset"
        if kind == "Job":
            return name, "job"
        if kind in ("StatefulSet", "DaemonSet"):
            return name, kind.lower()
    return pod.meta.name, "pod"


class _WaypointResolver:
    """`istio.io/use-waypoint` resolution: the object's own label wins, then its namespace's."""

    def __init__(self, waypoints: Mapping[str, Waypoint], namespaces: Mapping[str, Mapping[str, str]],
                 classes: frozenset[str] = WAYPOINT_CLASSES) -> None:
        self.waypoints = waypoints
        self.namespaces = namespaces
        self.classes = classes
        self.missing: dict[str, list[str]] = {}  # waypoint key -> the objects naming it

    @property
    def warnings(self) -> list[str]:
        """One line per missing waypoint, however many objects name it (a namespace label names it for
        every pod and service in the namespace)."""
        out = []
        for key, users in sorted(self.missing.items()):
            shown = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
            out.append(f"waypoint {key} is not a waypoint Gateway (class "
                       f"{' or '.join(sorted(self.classes))}); {shown} send traffic direct")
        return out

    def resolve(self, kind: str, meta: _Meta, what: str) -> GatewayAddress | None:
        if GATEWAY_NAME_LABEL in meta.labels:
            return None  # the waypoint's own pods and Service: never through a waypoint
        ns_labels = self.namespaces.get(meta.namespace, {})
        source = meta.labels if USE_WAYPOINT in meta.labels else ns_labels
        name = source.get(USE_WAYPOINT, "")
        if not name or name == NO_WAYPOINT:
            return None
        wp_ns = source.get(USE_WAYPOINT_NAMESPACE) or meta.namespace
        if "/" in name:
            wp_ns, name = name.split("/", 1)
        waypoint = self.waypoints.get(f"{wp_ns}/{name}")
        if waypoint is None:
            self.missing.setdefault(f"{wp_ns}/{name}", []).append(f"{kind} {meta.key}")
            return None
        if not waypoint.serves(what):
            return None  # e.g. a namespace label with a service-only waypoint does not apply to its pods
        return waypoint.address


def _objects(objects: Mapping[str, Any], kind: str) -> list[Any]:
    value = objects.get(kind)
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value[k] for k in sorted(value)]
    return list(value)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _resolve_target(sp: _ServicePort, pod: _Pod) -> int | None:
    if isinstance(sp.target, int):
        return sp.target
    return pod.container_ports.get((sp.target, sp.protocol))


def _pod_at(pod_by_ip: Mapping[tuple[str, IPAddress], _Pod], namespace: str, addresses: Iterable[Any]) -> _Pod | None:
    for address in addresses:
        try:
            pod = pod_by_ip.get((namespace, ipaddress.ip_address(address)))
        except (ValueError, TypeError):
            continue
        if pod is not None:
            return pod
    return None


def _slice_health(slices: list[tuple[Mapping[str, Any], _Svc | None]]) -> dict[IPAddress, bool]:
    """Pod address -> ready, from every slice listing it (unset `ready` means ready). Slices of services
    that publish unready addresses say nothing about readiness and are ignored here."""
    health: dict[IPAddress, bool] = {}
    for obj, svc in slices:
        if svc is not None and svc.publish_not_ready:
            continue
        for endpoint in obj.get("endpoints") or []:
            if not isinstance(endpoint, Mapping):
                continue
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready") is not False if isinstance(conditions, Mapping) else True
            for address in endpoint.get("addresses") or []:
                try:
                    ip = ipaddress.ip_address(address)
                except (ValueError, TypeError):
                    continue
                health[ip] = health.get(ip, True) and ready
    return health


def _endpoint_slice(obj: Any, services: Mapping[tuple[str, str], _Svc]) -> tuple[Mapping[str, Any], _Svc | None]:
    """A slice checked for the fields read here, with the service it belongs to (if known)."""
    meta = _meta(obj)
    for n, endpoint in enumerate(_list(obj.get("endpoints"), "endpoints")):
        endpoint = _mapping(endpoint, f"endpoints[{n}]")
        _mapping(endpoint.get("conditions"), f"endpoints[{n}].conditions")
        _list(endpoint.get("addresses"), f"endpoints[{n}].addresses")
    _list(obj.get("ports"), "ports")
    return obj, services.get((meta.namespace, meta.labels.get(SERVICE_NAME_LABEL, "")))


Memberships = dict[tuple[str, str], dict[str, dict[int, int]]]  # pod -> {"ns/hostname": {port: target}}


def _memberships(services: list[_Svc], pods: list[_Pod],
                 slices: list[tuple[Mapping[str, Any], _Svc | None]]) -> Memberships:
    """Which pods are endpoints of which services, with each service port's target port on that pod."""
    members: Memberships = {}
    pods_by_ns: dict[str, list[_Pod]] = {}
    for pod in pods:
        pods_by_ns.setdefault(pod.meta.namespace, []).append(pod)
    for svc in services:
        if svc.selector is None:
            continue
        for pod in pods_by_ns.get(svc.meta.namespace, ()):
            if not _selects(svc.selector, pod.meta.labels):
                continue
            ports = {sp.port: t for sp in svc.ports if (t := _resolve_target(sp, pod)) is not None}
            if svc.ports and not ports:
                continue  # no port of the service exists on this pod: not an endpoint
            members.setdefault((pod.meta.namespace, pod.meta.name), {})[svc.key] = ports
    pod_by_ip = {(p.meta.namespace, ip): p for p in pods for ip in p.ips}
    pod_by_name = {(p.meta.namespace, p.meta.name): p for p in pods}
    for obj, svc in slices:
        if svc is None or svc.selector is not None:
            continue  # selector services come from the pods above; their slices would only lag behind
        by_port_name = {p.get("name") or "": p.get("port") for p in obj.get("ports") or [] if isinstance(p, Mapping)}
        ports = {sp.port: t for sp in svc.ports
                 if isinstance(t := by_port_name.get(sp.name, sp.target), int) and not isinstance(t, bool)}
        for endpoint in obj.get("endpoints") or []:
            if not isinstance(endpoint, Mapping):
                continue
            ref = endpoint.get("targetRef")
            pod = None
            if isinstance(ref, Mapping) and ref.get("kind") == "Pod":
                pod = pod_by_name.get((str(ref.get("namespace") or svc.meta.namespace), str(ref.get("name"))))
            if pod is None:
                pod = _pod_at(pod_by_ip, svc.meta.namespace, endpoint.get("addresses") or [])
            if pod is not None:
                members.setdefault((pod.meta.namespace, pod.meta.name), {})[svc.key] = ports
    return members


def _workload(pod: _Pod, opts: TranslateOptions, ns_labels: Mapping[str, str], health: Mapping[IPAddress, bool],
              members: Memberships, resolver: _WaypointResolver) -> Workload:
    native = pod.meta.labels.get(TUNNEL_LABEL) == "http"
    enrolled = _enrolled(pod, ns_labels)
    healthy = not pod.terminating and all(health.get(ip, pod.ready) for ip in pod.ips)
    canonical_name, canonical_rev = _canonical(pod.meta.labels, pod.meta.name)
    workload_name, workload_type = _workload_name(pod)
    return Workload(
        uid=f"{opts.cluster_id}//Pod/{pod.meta.namespace}/{pod.meta.name}",
        name=pod.meta.name,
        namespace=pod.meta.namespace,
        workload_ips=pod.ips,
        service_account=pod.service_account,
        protocol=Protocol.HBONE if (enrolled or native) else Protocol.TCP,
        node=pod.node,
        network=opts.network,
        trust_domain=opts.trust_domain,
        cluster_id=opts.cluster_id,
        canonical_name=canonical_name,
        canonical_revision=canonical_rev,
        workload_name=workload_name,
        workload_type=workload_type,
        services=members.get((pod.meta.namespace, pod.meta.name), {}),
        waypoint=resolver.resolve("Pod", pod.meta, "workload") if enrolled else None,
        status=HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY,
        network_mode=NetworkMode.HOST_NETWORK if pod.host_network else NetworkMode.STANDARD,
        native_tunnel=native,
        labels=pod.meta.labels,
    )


def _service_model(svc: _Svc, opts: TranslateOptions, resolver: _WaypointResolver) -> Service:
    return Service(
        name=svc.meta.name,
        namespace=svc.meta.namespace,
        hostname=svc.hostname,
        vips=tuple(NetworkAddress(opts.network, ip) for ip in svc.vips),
        ports={sp.port: sp.target if isinstance(sp.target, int) else 0 for sp in svc.ports},
        waypoint=resolver.resolve("Service", svc.meta, "service"),
        load_balancer=LoadBalancer(health_policy=HealthPolicy.ALLOW_ALL) if svc.publish_not_ready else None,
    )


T = TypeVar("T")


def translate(objects: Mapping[str, Any], options: TranslateOptions | None = None) -> Translation:
    """Everything the cluster says about the mesh. `objects` maps a kind ("Pod", "Service", "Namespace",
    "EndpointSlice", "AuthorizationPolicy", "Gateway") to its objects (a list, or a map keyed by name)."""
    opts = options or TranslateOptions()
    skipped: list[Skipped] = []

    def parse_all(kind: str, parse: Callable[[Any], T | None]) -> list[T]:
        out = []
        for obj in _objects(objects, kind):
            try:
                item = parse(obj)
            except _Invalid as err:
                skipped.append(Skipped(kind, _describe(obj), err.field, err.reason))
            except ConfigError as err:
                skipped.append(Skipped(kind, _describe(obj), err.path, err.message))
            else:
                if item is not None:
                    out.append(item)
        return out

    namespaces = {m.name: m.labels for m in parse_all("Namespace", lambda o: _meta(o, namespaced=False))}
    waypoints = {w.key: w for w in parse_all("Gateway", lambda o: _gateway(o, opts.waypoint_classes, opts.domain))}
    resolver = _WaypointResolver(waypoints, namespaces, opts.waypoint_classes)
    services = parse_all("Service", lambda o: _service(o, opts.domain))
    by_name = {(s.meta.namespace, s.meta.name): s for s in services}
    pods = parse_all("Pod", _pod)
    slices = parse_all("EndpointSlice", lambda o: _endpoint_slice(o, by_name))
    health = _slice_health(slices)
    members = _memberships(services, pods, slices)

    out_services = [_service_model(svc, opts, resolver) for svc in services]
    workloads = [_workload(pod, opts, namespaces.get(pod.meta.namespace, {}), health, members, resolver)
                 for pod in pods]
    translated = parse_all("AuthorizationPolicy", lambda o: translate_policy(o, root_namespace=opts.root_namespace))
    warnings = [f"AuthorizationPolicy {tp.key}: {w}" for tp in translated for w in tp.warnings]
    warnings.extend(resolver.warnings)
    policies = [tp.authorization for tp in translated if not tp.for_waypoint and tp.authorization is not None]
    return Translation(
        config=ConfigSet(
            workloads=tuple(sorted(workloads, key=lambda w: w.uid)),
            services=tuple(sorted(out_services, key=lambda s: s.key)),
            policies=tuple(sorted(policies, key=lambda p: p.key)),
        ),
        waypoint_policies=tuple(sorted((tp for tp in translated if tp.for_waypoint), key=lambda p: p.key)),
        waypoints=MappingProxyType(dict(sorted(waypoints.items()))),
        skipped=tuple(skipped),
        warnings=tuple(warnings),
    )


def captured(workload: Workload) -> bool:
    """Whether the node agent captures this workload's traffic: in the mesh by enrolment, not a native
    HBONE speaker (a waypoint), and with its own network namespace."""
    return (workload.protocol is Protocol.HBONE and not workload.native_tunnel
            and workload.network_mode is NetworkMode.STANDARD)

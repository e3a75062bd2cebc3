"""The netns lab as a config source: its pods become workloads, its services become services.

The lab writes a JSON state file (pods with their IP, node, netns, labels; optionally services with a
label selector and namespaces with labels). The agent in a lab reads it the way it would watch the
Kubernetes API: pods enrolled in ambient mode (Istio's label rules) are HBONE workloads, the others are
plain TCP workloads the mesh still knows by address. Unknown keys are ignored because the lab grows
new ones; missing or malformed ones are refused with their path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from mesh.config.errors import ConfigError
from mesh.config.localconfig import NETNS_DIR
from mesh.config.model import (
    ConfigSet,
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Protocol,
    Service,
    Workload,
)
from mesh.config.validation import IPField, PortField, load_document, validate

DATAPLANE_MODE = "istio.io/dataplane-mode"
SIDECAR_STATUS = "sidecar.istio.io/status"
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
CLUSTER_DOMAIN = "cluster.local"

Enrolled = Callable[[Mapping[str, Any], Mapping[str, str]], bool]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, alias_generator=to_camel)


class LabPod(_Loose):
    name: str
    namespace: str = "default"
    service_account: str = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    node: str = ""
    ip: IPField
    netns: str = ""


class LabPort(_Loose):
    port: PortField
    target_port: PortField | None = None
    name: str | None = None


class LabService(_Loose):
    name: str
    namespace: str = "default"
    vip: IPField
    ports: list[LabPort] = []
    selector: dict[str, str] = {}
    labels: dict[str, str] = {}


class LabNamespace(_Loose):
    labels: dict[str, str] = {}


class LabState(_Loose):
    name: str = ""
    trust_domain: str = ""
    pods: list[LabPod] = []
    services: list[LabService] = []
    namespaces: dict[str, LabNamespace] = {}


def ambient_enrolled(pod: Mapping[str, Any], namespace_labels: Mapping[str, str]) -> bool:
    """Istio's rule: the pod's `istio.io/dataplane-mode` label wins (`none` opts out), then the
    namespace's; a pod with an injected sidecar is never ambient."""
    labels = pod.get("labels") or {}
    annotations = pod.get("annotations") or {}
    mode = labels.get(DATAPLANE_MODE)
    if mode == "none" or SIDECAR_STATUS in annotations:
        return False
    if mode == "ambient":
        return True
    return namespace_labels.get(DATAPLANE_MODE) == "ambient"


def _canonical(labels: Mapping[str, str], fallback: str) -> tuple[str, str]:
    name = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or fallback
    )
    rev = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return name, rev


def _waypoint(
    own: Mapping[str, str], namespace: str, ns_labels: Mapping[str, str] | None, domain: str
) -> GatewayAddress | None:
    """`istio.io/use-waypoint` on the object (or, when given, its namespace); `#none` opts out."""
    source = own if USE_WAYPOINT in own else (ns_labels or {})
    name = source.get(USE_WAYPOINT, "")
    if not name or name == "#none":
        return None
    wp_ns = source.get(USE_WAYPOINT_NAMESPACE) or namespace
    if "/" in name:
        wp_ns, name = name.split("/", 1)
    return GatewayAddress(NamespacedHostname(wp_ns, f"{name}.{wp_ns}.svc.{domain}"))


def service_hostname(name: str, namespace: str, domain: str = CLUSTER_DOMAIN) -> str:
    return f"{name}.{namespace}.svc.{domain}"


def _parse(state: Mapping[str, Any]) -> LabState:
    if not isinstance(state, Mapping):
        raise ConfigError("", f"lab state must be a JSON object, got {type(state).__name__}")
    return validate(LabState, dict(state))


def _namespace_labels(st: LabState) -> dict[str, dict[str, str]]:
    return {ns: dict(v.labels) for ns, v in st.namespaces.items()}


def workloads_from_lab_state(
    state: Mapping[str, Any],
    enrolled: Enrolled = ambient_enrolled,
    *,
    domain: str = CLUSTER_DOMAIN,
) -> list[Workload]:
    """Every lab pod as a Workload: HBONE when `enrolled(pod, namespace_labels)`, else TCP."""
    st = _parse(state)
    ns_labels = _namespace_labels(st)
    memberships = _memberships(st, domain)
    out = []
    for pod in st.pods:
        nsl = ns_labels.get(pod.namespace, {})
        raw = pod.model_dump(by_alias=True)
        canonical_name, canonical_rev = _canonical(pod.labels, pod.name)
        uid = f"lab//v1/Pod/{pod.namespace}/{pod.name}"
        netns = pod.netns if (not pod.netns or "/" in pod.netns) else f"{NETNS_DIR}/{pod.netns}"
        out.append(
            Workload(
                uid=uid,
                name=pod.name,
                namespace=pod.namespace,
                workload_ips=(pod.ip,),
                service_account=pod.service_account,
                protocol=Protocol.HBONE if enrolled(raw, nsl) else Protocol.TCP,
                node=pod.node,
                trust_domain=st.trust_domain,
                canonical_name=canonical_name,
                canonical_revision=canonical_rev,
                workload_name=pod.name,
                workload_type="pod",
                services=memberships.get(uid, {}),
                waypoint=_waypoint(pod.labels, pod.namespace, None, domain),
                labels=pod.labels,
                netns=netns or None,
            )
        )
    return out


def _memberships(st: LabState, domain: str) -> dict[str, dict[str, dict[int, int]]]:
    """uid -> {"ns/hostname": {port: targetPort}} for every service whose selector picks the pod."""
    out: dict[str, dict[str, dict[int, int]]] = {}
    for svc in st.services:
        if not svc.selector:
            continue  # like Kubernetes: no selector, no endpoints
        key = f"{svc.namespace}/{service_hostname(svc.name, svc.namespace, domain)}"
        ports = {p.port: p.target_port or p.port for p in svc.ports}
        for pod in st.pods:
            if pod.namespace == svc.namespace and all(pod.labels.get(k) == v for k, v in svc.selector.items()):
                out.setdefault(f"lab//v1/Pod/{pod.namespace}/{pod.name}", {})[key] = ports
    return out


def services_from_lab_state(state: Mapping[str, Any], *, domain: str = CLUSTER_DOMAIN) -> list[Service]:
    st = _parse(state)
    ns_labels = _namespace_labels(st)
    out = []
    for svc in st.services:
        out.append(
            Service(
                name=svc.name,
                namespace=svc.namespace,
                hostname=service_hostname(svc.name, svc.namespace, domain),
                vips=(NetworkAddress("", svc.vip),),
                ports={p.port: p.target_port or p.port for p in svc.ports},
                waypoint=_waypoint(svc.labels, svc.namespace, ns_labels.get(svc.namespace, {}), domain),
            )
        )
    return out


def config_from_lab_state(
    state: Mapping[str, Any], enrolled: Enrolled = ambient_enrolled, *, domain: str = CLUSTER_DOMAIN
) -> ConfigSet:
    return ConfigSet(
        workloads=tuple(workloads_from_lab_state(state, enrolled, domain=domain)),
        services=tuple(services_from_lab_state(state, domain=domain)),
    )


def parse_lab_state(text: str | bytes, enrolled: Enrolled = ambient_enrolled) -> ConfigSet:
    """A file source parser for a lab state file."""
    return config_from_lab_state(load_document(text, "lab state"), enrolled)

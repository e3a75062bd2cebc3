"""The kinds the agent watches, where they live on the API server, and what makes an object usable.

A kind's `check` returns why an object cannot be used (or None): the informer logs and skips such objects
instead of passing them on, so one bad object in the cluster never stops the agent. The checks cover only
the fields the mesh reads; anything else in an object is passed through untouched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Mapping[str, Any]], str | None]


def _is_str_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def check_metadata(obj: Any, namespaced: bool) -> str | None:
    if not isinstance(obj, Mapping):
        return f"expected an object, got {type(obj).__name__}"
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return "metadata: missing or not an object"
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        return "metadata.name: missing or not a string"
    if namespaced and (not isinstance(meta.get("namespace"), str) or not meta["namespace"]):
        return "metadata.namespace: missing or not a string"
    for field in ("labels", "annotations"):
        if meta.get(field) is not None and not _is_str_map(meta[field]):
            return f"metadata.{field}: not a map of strings"
    rv = meta.get("resourceVersion")
    if rv is not None and not isinstance(rv, str):
        return "metadata.resourceVersion: not a string"
    return None


def _ip_error(value: Any, field: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except (ValueError, TypeError):
        return f"{field}: {value!r} is not an IP address"
    return None


def _section(obj: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any], str | None]:
    value = obj.get(name)
    if value is None:
        return {}, None
    if not isinstance(value, Mapping):
        return {}, f"{name}: not an object"
    return value, None


def check_pod(obj: Mapping[str, Any]) -> str | None:
    spec, err = _section(obj, "spec")
    status, err2 = _section(obj, "status")
    if err or err2:
        return err or err2
    for field in ("nodeName", "serviceAccountName"):
        if spec.get(field) is not None and not isinstance(spec[field], str):
            return f"spec.{field}: not a string"
    if spec.get("hostNetwork") is not None and not isinstance(spec["hostNetwork"], bool):
        return "spec.hostNetwork: not a boolean"
    if status.get("podIP") and (err := _ip_error(status["podIP"], "status.podIP")):
        return err
    ips = status.get("podIPs")
    if ips is not None:
        if not isinstance(ips, list) or not all(isinstance(i, Mapping) for i in ips):
            return "status.podIPs: not a list of objects"
        for n, item in enumerate(ips):
            if err := _ip_error(item.get("ip"), f"status.podIPs[{n}].ip"):
                return err
    if status.get("phase") is not None and not isinstance(status["phase"], str):
        return "status.phase: not a string"
    conditions = status.get("conditions")
    if conditions is not None and (not isinstance(conditions, list)
                                   or not all(isinstance(c, Mapping) for c in conditions)):
        return "status.conditions: not a list of objects"
    return None


def check_service(obj: Mapping[str, Any]) -> str | None:
    spec, err = _section(obj, "spec")
    if err:
        return err
    cip = spec.get("clusterIP")
    if cip not in (None, "", "None") and (err := _ip_error(cip, "spec.clusterIP")):
        return err
    ips = spec.get("clusterIPs")
    if ips is not None and (not isinstance(ips, list) or not all(isinstance(i, str) for i in ips)):
        return "spec.clusterIPs: not a list of strings"
    ports = spec.get("ports")
    if ports is not None:
        if not isinstance(ports, list):
            return "spec.ports: not a list"
        for n, p in enumerate(ports):
            if not isinstance(p, Mapping) or not isinstance(p.get("port"), int) or isinstance(p.get("port"), bool):
                return f"spec.ports[{n}].port: missing or not an integer"
            target = p.get("targetPort")
            if target is not None and not isinstance(target, int | str):
                return f"spec.ports[{n}].targetPort: neither a number nor a name"
    if spec.get("selector") is not None and not _is_str_map(spec["selector"]):
        return "spec.selector: not a map of strings"
    return None


def check_endpointslice(obj: Mapping[str, Any]) -> str | None:
    if not isinstance(obj.get("addressType"), str):
        return "addressType: missing or not a string"
    endpoints = obj.get("endpoints")
    if endpoints is not None:
        if not isinstance(endpoints, list):
            return "endpoints: not a list"
        for n, e in enumerate(endpoints):
            if not isinstance(e, Mapping) or not isinstance(e.get("addresses"), list) \
                    or not all(isinstance(a, str) for a in e["addresses"]):
                return f"endpoints[{n}].addresses: missing or not a list of strings"
            if e.get("conditions") is not None and not isinstance(e["conditions"], Mapping):
                return f"endpoints[{n}].conditions: not an object"
    ports = obj.get("ports")
    if ports is not None and (not isinstance(ports, list) or not all(isinstance(p, Mapping) for p in ports)):
        return "ports: not a list of objects"
    return None


def check_spec_object(obj: Mapping[str, Any]) -> str | None:
    _, err = _section(obj, "spec")
    return err


def check_gateway(obj: Mapping[str, Any]) -> str | None:
    spec, err = _section(obj, "spec")
    if err:
        return err
    if not isinstance(spec.get("gatewayClassName"), str):
        return "spec.gatewayClassName: missing or not a string"
    listeners = spec.get("listeners")
    if listeners is not None and (not isinstance(listeners, list)
                                  or not all(isinstance(x, Mapping) for x in listeners)):
        return "spec.listeners: not a list of objects"
    return None


@dataclass(frozen=True)
class Kind:
    """One watched kind: its REST location and the check that tells a usable object from a broken one."""

    name: str  # the object kind, e.g. "Pod"
    group: str
    version: str
    plural: str
    namespaced: bool
    check: Check
    node_scoped: bool = False  # watched with fieldSelector spec.nodeName=<this node>

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The cluster-wide collection URL (all namespaces)."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{root}/{self.plural}"

    def problem(self, obj: Any) -> str | None:
        return check_metadata(obj, self.namespaced) or self.check(obj)

    def key(self, obj: Mapping[str, Any]) -> str:
        meta = obj["metadata"]
        return f"{meta['namespace']}/{meta['name']}" if self.namespaced else meta["name"]


NAMESPACES = Kind("Namespace", "", "v1", "namespaces", False, lambda _o: None)
PODS = Kind("Pod", "", "v1", "pods", True, check_pod, node_scoped=True)
SERVICES = Kind("Service", "", "v1", "services", True, check_service)
ENDPOINTSLICES = Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True, check_endpointslice)
AUTHORIZATION_POLICIES = Kind("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", True,
                              check_spec_object)
GATEWAYS = Kind("Gateway", "gateway.networking.k8s.io", "v1", "gateways", True, check_gateway)

MESH_KINDS: tuple[Kind, ...] = (NAMESPACES, PODS, SERVICES, ENDPOINTSLICES, AUTHORIZATION_POLICIES, GATEWAYS)

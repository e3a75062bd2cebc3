"""What the real server does to an object between the request and storage: checks, defaults, immutability.

Sans-IO: functions over dicts that raise `ApiError` (400 for a malformed request, 422 naming the invalid
fields). Only the checks a user of this mesh would trip over are kept: names, labels and annotations for
every type, and the fields of Pods, Services, Namespaces and EndpointSlices that the mesh reads. Custom
resources (Istio, Gateway API) are opaque beyond metadata, as they are to a server without their schemas.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from mesh.kube.apiserver import kinds
from mesh.kube.apiserver.errors import bad_request, invalid
from mesh.kube.apiserver.kinds import ResourceType
from mesh.kube.apiserver.selectors import label_key_error, label_value_error

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAX_ANNOTATIONS = 256 * 1024

# Server-owned metadata a client cannot set on create (it is assigned) or change on update (it is kept).
SERVER_META = ("uid", "creationTimestamp", "resourceVersion", "generation", "deletionTimestamp",
               "deletionGracePeriodSeconds", "selfLink", "managedFields")


def name_error(rtype: ResourceType, name: str) -> str | None:
    """Services need RFC 1035 labels, namespaces RFC 1123 labels, everything else RFC 1123 subdomains."""
    if rtype is kinds.CORE_SERVICES:
        ok = len(name) <= 63 and bool(_DNS_1035.match(name))
        what = "an RFC 1035 label (lowercase letters, digits, '-', starting with a letter, at most 63)"
    elif rtype is kinds.CORE_NAMESPACES:
        ok = len(name) <= 63 and bool(_DNS_LABEL.match(name))
        what = "an RFC 1123 label (lowercase letters, digits, '-', at most 63)"
    else:
        ok = len(name) <= 253 and bool(_DNS_SUBDOMAIN.match(name))
        what = "an RFC 1123 subdomain (lowercase letters, digits, '-', '.', at most 253)"
    return None if ok else f'Invalid value: "{name}": a name must be {what}'


def check_envelope(rtype: ResourceType, obj: Any, url_namespace: str | None) -> dict[str, Any]:
    """The checks every write body gets: an object of this type, metadata a dict, namespace as in the URL."""
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON or YAML object")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if api_version is not None and api_version != rtype.group_version:
        raise bad_request(f"the API version in the data ({api_version}) does not match the expected API version "
                          f"({rtype.group_version})")
    if kind is not None and kind != rtype.kind:
        raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})")
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise bad_request("metadata: must be an object")
    out = dict(obj)
    out["apiVersion"], out["kind"], out["metadata"] = rtype.group_version, rtype.kind, dict(meta)
    ns = meta.get("namespace")
    if rtype.namespaced:
        if ns not in (None, "") and url_namespace is not None and ns != url_namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if url_namespace is not None:
            out["metadata"]["namespace"] = url_namespace
        elif ns in (None, ""):
            raise bad_request("metadata.namespace: a namespaced object needs a namespace")
    else:
        out["metadata"].pop("namespace", None)
    return out


def validate_meta(rtype: ResourceType, obj: Mapping[str, Any]) -> None:
    meta = obj["metadata"]
    name = meta.get("name", "")
    causes: list[tuple[str, str]] = []
    if not isinstance(name, str) or not name:
        causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif err := name_error(rtype, name):
        causes.append(("metadata.name", err))
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            causes.append((f"metadata.{field}", "Invalid value: must be a map of strings"))
            continue
        for k, v in value.items():
            if not isinstance(v, str):
                causes.append((f"metadata.{field}", f"Invalid value: {k!r}: values must be strings"))
            elif err := label_key_error(str(k)) or (label_value_error(v) if field == "labels" else None):
                causes.append((f"metadata.{field}", f"Invalid value: {err}"))
        if field == "annotations" and sum(len(k) + len(str(v)) for k, v in value.items()) > _MAX_ANNOTATIONS:
            causes.append(("metadata.annotations", "Too long: must have at most 262144 bytes"))
    for field in ("finalizers",):
        value = meta.get(field)
        if value is not None and (not isinstance(value, list) or not all(isinstance(f, str) for f in value)):
            causes.append((f"metadata.{field}", "Invalid value: must be a list of strings"))
    if meta.get("ownerReferences") is not None and not isinstance(meta.get("ownerReferences"), list):
        causes.append(("metadata.ownerReferences", "Invalid value: must be a list"))
    causes += _type_causes(rtype, obj)
    if causes:
        raise invalid(rtype.kind, str(name), causes, rtype.group)


def _ip_error(value: Any) -> str | None:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return f'Invalid value: "{value}": must be a valid IP address'
    return None


def _port_error(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        return f"Invalid value: {value!r}: must be between 1 and 65535, inclusive"
    return None


def _type_causes(rtype: ResourceType, obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    spec = obj.get("spec")
    causes: list[tuple[str, str]] = []
    if spec is not None and not isinstance(spec, dict):
        return [("spec", "Invalid value: must be an object")]
    spec = spec or {}
    if rtype is kinds.CORE_PODS:
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            causes.append(("spec.containers", "Required value: a pod needs at least one container"))
        else:
            for i, c in enumerate(containers):
                if not isinstance(c, dict) or not c.get("name"):
                    causes.append((f"spec.containers[{i}].name", "Required value"))
                elif not c.get("image"):
                    causes.append((f"spec.containers[{i}].image", "Required value"))
        status = obj.get("status") or {}
        if isinstance(status, dict) and status.get("podIP") and (err := _ip_error(status["podIP"])):
            causes.append(("status.podIP", err))
    elif rtype is kinds.CORE_SERVICES:
        ports = spec.get("ports", [])
        if not isinstance(ports, list):
            causes.append(("spec.ports", "Invalid value: must be a list"))
            ports = []
        for i, p in enumerate(ports):
            if not isinstance(p, dict):
                causes.append((f"spec.ports[{i}]", "Invalid value: must be an object"))
                continue
            if err := _port_error(p.get("port")):
                causes.append((f"spec.ports[{i}].port", err))
            if p.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
                causes.append((f"spec.ports[{i}].protocol", f'Unsupported value: "{p.get("protocol")}": '
                               'supported values: "SCTP", "TCP", "UDP"'))
            target = p.get("targetPort")
            if target is not None and not isinstance(target, str) and (err := _port_error(target)):
                causes.append((f"spec.ports[{i}].targetPort", err))
        if len(ports) > 1 and any(isinstance(p, dict) and not p.get("name") for p in ports):
            causes.append(("spec.ports", "Required value: each port needs a name when there is more than one"))
        selector = spec.get("selector")
        if selector is not None and (not isinstance(selector, dict)
                                     or not all(isinstance(v, str) for v in selector.values())):
            causes.append(("spec.selector", "Invalid value: must be a map of strings"))
        cip = spec.get("clusterIP")
        if cip not in (None, "", "None") and (err := _ip_error(cip)):
            causes.append(("spec.clusterIP", err))
    elif rtype is kinds.ENDPOINTSLICES:
        if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
            causes.append(("addressType", f'Unsupported value: "{obj.get("addressType")}": '
                           'supported values: "FQDN", "IPv4", "IPv6"'))
        endpoints = obj.get("endpoints") or []
        if not isinstance(endpoints, list):
            causes.append(("endpoints", "Invalid value: must be a list"))
        else:
            for i, e in enumerate(endpoints):
                if not isinstance(e, dict) or not isinstance(e.get("addresses"), list) or not e["addresses"]:
                    causes.append((f"endpoints[{i}].addresses", "Required value: at least one address"))
    return causes


# --- defaults ---------------------------------------------------------------------------------------


def default_on_create(rtype: ResourceType, obj: dict[str, Any]) -> None:
    """Fill what the real server fills on create (in place on a fresh copy)."""
    spec = obj.get("spec")
    if rtype is kinds.CORE_PODS:
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif rtype is kinds.CORE_SERVICES:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for p in spec.get("ports", []):
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        obj["status"] = {"loadBalancer": {}}
    elif rtype is kinds.CORE_NAMESPACES:
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj["status"] = {"phase": "Active"}
        labels = obj["metadata"].setdefault("labels", {})
        labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    elif rtype.status_subresource and rtype.group not in kinds.BUILTIN_GROUPS:
        obj.pop("status", None)


def check_update(rtype: ResourceType, old: Mapping[str, Any], new: dict[str, Any]) -> None:
    """Immutable fields, as the real server guards them (422 naming the field)."""
    name = old["metadata"]["name"]
    causes: list[tuple[str, str]] = []
    if rtype is kinds.CORE_PODS:
        old_spec, new_spec = dict(old.get("spec") or {}), dict(new.get("spec") or {})
        if old_spec.get("nodeName") and new_spec.get("nodeName") != old_spec.get("nodeName"):
            causes.append(("spec.nodeName", "Forbidden: the node of a scheduled pod cannot change"))
        mutable = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "nodeName")

        def frozen(spec: dict[str, Any]) -> dict[str, Any]:
            out = {k: v for k, v in spec.items() if k not in mutable}
            out["containers"] = [{k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c
                                 for c in spec.get("containers", [])]
            return out

        if not causes and frozen(old_spec) != frozen(new_spec):
            causes.append(("spec", "Forbidden: pod updates may not change fields other than container images, "
                                   "activeDeadlineSeconds, tolerations and terminationGracePeriodSeconds"))
    elif rtype is kinds.CORE_SERVICES:
        old_ip = (old.get("spec") or {}).get("clusterIP")
        spec = new.setdefault("spec", {})
        if not spec.get("clusterIP"):
            spec["clusterIP"] = old_ip
            if (old.get("spec") or {}).get("clusterIPs"):
                spec["clusterIPs"] = old["spec"]["clusterIPs"]
        elif spec.get("clusterIP") != old_ip:
            causes.append(("spec.clusterIP", "Invalid value: field is immutable"))
    if causes:
        raise invalid(rtype.kind, name, causes, rtype.group)

"""Populating the test double from a netns lab's state, as kubelet and a user's manifests would.

Pods appear Running and Ready with `status.podIP` = the pod's address in its netns and `spec.nodeName` =
its lab node, each with one `pause` container (the lab backs every pod with a pause process in its netns,
as a real sandbox is). Services get `spec.clusterIP` = the lab's VIP. Objects made here carry the
annotation `nodemesh.io/lab`, so a later sync removes those the lab no longer has and leaves alone what a
user created with kubectl.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mesh.kube.apiserver import kinds
from mesh.kube.apiserver.errors import ApiError
from mesh.kube.apiserver.store import Store, now_rfc3339

LAB_ANNOTATION = "nodemesh.io/lab"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


class LabStateError(ValueError):
    """The lab state does not have the shape expected; the message names the field."""


def _field(data: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise LabStateError(f"{where}.{key}: missing")
    value = data[key]
    if not isinstance(value, kind):
        raise LabStateError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def node_object(node: Mapping[str, Any], lab: str) -> dict[str, Any]:
    name = _field(node, "name", "nodes[]")
    pod_cidr = node.get("podCidr", "")
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                     "annotations": {LAB_ANNOTATION: lab}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr] if pod_cidr else []},
        "status": {
            "addresses": [{"type": "InternalIP", "address": node.get("fabricIp", "")},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastTransitionTime": now_rfc3339()}],
            "nodeInfo": {"kubeletVersion": "v1.32.0-nodemesh-lab", "operatingSystem": "linux",
                         "architecture": "amd64"},
        },
    }


def pod_objects(pod: Mapping[str, Any], lab: str, host_ips: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the object a user would create, the status kubelet would report) for one lab pod."""
    name = _field(pod, "name", "pods[]")
    where = f"pods[{name}]"
    ns = _field(pod, "namespace", where)
    node = _field(pod, "node", where)
    ip = _field(pod, "ip", where)
    labels = dict(pod.get("labels") or {})
    annotations = {**dict(pod.get("annotations") or {}), LAB_ANNOTATION: lab}
    body = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": {"nodeName": node, "serviceAccountName": pod.get("serviceAccount") or "default",
                 "containers": [{"name": "pause", "image": PAUSE_IMAGE}], "restartPolicy": "Always"},
    }
    started = now_rfc3339()
    host_ip = host_ips.get(node, "")
    conditions = [{"type": t, "status": "True", "lastTransitionTime": started}
                  for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
    status = {
        "phase": "Running", "conditions": conditions, "podIP": ip, "podIPs": [{"ip": ip}],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}] if host_ip else [], "startTime": started,
        "qosClass": "BestEffort",
        "containerStatuses": [{"name": "pause", "image": PAUSE_IMAGE, "imageID": "", "ready": True, "started": True,
                               "restartCount": 0, "state": {"running": {"startedAt": started}}}],
    }
    return body, status


def service_object(svc: Mapping[str, Any], lab: str) -> dict[str, Any]:
    name = _field(svc, "name", "services[]")
    where = f"services[{name}]"
    ports = []
    for i, p in enumerate(_field(svc, "ports", where, list)):
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
            raise LabStateError(f"{where}.ports[{i}].port: expected an integer")
        port: dict[str, Any] = {"port": p["port"], "targetPort": p.get("targetPort") or p["port"], "protocol": "TCP"}
        port["name"] = p.get("name") or (f"port-{p['port']}" if len(svc["ports"]) > 1 else "")
        if not port["name"]:
            del port["name"]
        if p.get("appProtocol"):
            port["appProtocol"] = p["appProtocol"]
        ports.append(port)
    spec: dict[str, Any] = {"type": "ClusterIP", "ports": ports,
                            "selector": dict(_field(svc, "selector", where, Mapping))}
    if svc.get("vip"):
        spec["clusterIP"] = str(svc["vip"])
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": svc.get("namespace", "default"),
                         "labels": dict(svc.get("labels") or {}), "annotations": {LAB_ANNOTATION: lab}},
            "spec": spec}


def _upsert(store: Store, rtype: kinds.ResourceType, body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    ns = meta.get("namespace")
    existing = store.peek(rtype, ns, meta["name"])
    if existing is None:
        return store.create(rtype, ns, body)
    wanted = copy.deepcopy(existing)
    for k, v in body.items():
        if k == "metadata":
            wanted["metadata"]["labels"] = v.get("labels", {})
            wanted["metadata"]["annotations"] = v.get("annotations", {})
        elif k == "spec":  # keep what the server defaulted (clusterIPs, dnsPolicy...)
            wanted["spec"] = {**existing.get("spec", {}), **v}
        elif k not in ("status",):
            wanted[k] = v
    return store.update(rtype, ns, meta["name"], wanted)


def _set_status(store: Store, rtype: kinds.ResourceType, ns: str | None, name: str, status: dict[str, Any]) -> None:
    current = store.get(rtype, ns, name)
    if _comparable_status(current.get("status")) == _comparable_status(status):
        return
    current["status"] = status
    store.update(rtype, ns, name, current, subresource="status")


def _comparable_status(status: Any) -> Any:
    """Status without timestamps, so a re-sync of an unchanged lab writes nothing."""
    if isinstance(status, dict):
        return {k: _comparable_status(v) for k, v in status.items()
                if k not in ("lastTransitionTime", "startTime", "startedAt")}
    if isinstance(status, list):
        return [_comparable_status(v) for v in status]
    return status


def sync_lab(store: Store, state: Mapping[str, Any]) -> dict[str, int]:
    """Make the store hold what lab `state` (the lab state file's JSON) describes; returns counts by kind.

    Creates namespaces (with the lab's namespace labels), nodes, service accounts, pods (then their status,
    as kubelet would) and services; removes lab-made pods, services and nodes the state no longer lists.
    Raises LabStateError naming the field when the state is malformed.
    """
    if not isinstance(state, Mapping):
        raise LabStateError("lab state: expected an object")
    lab = _field(state, "name", "lab state")
    nodes = _field(state, "nodes", "lab state", list) if "nodes" in state else []
    pods = state.get("pods") or []
    services = state.get("services") or []
    ns_labels: Mapping[str, Any] = state.get("namespaces") or {}
    if not isinstance(pods, list) or not isinstance(services, list) or not isinstance(ns_labels, Mapping):
        raise LabStateError("lab state: pods and services must be lists, namespaces an object")
    host_ips = {n.get("name"): n.get("fabricIp", "") for n in nodes if isinstance(n, Mapping)}
    namespaces = {p.get("namespace", "default") for p in pods if isinstance(p, Mapping)}
    namespaces |= {s.get("namespace", "default") for s in services if isinstance(s, Mapping)}
    namespaces |= set(ns_labels)
    try:
        for ns in sorted(namespaces):
            labels = dict((ns_labels.get(ns) or {}).get("labels") or {})
            existing = store.peek(kinds.CORE_NAMESPACES, None, ns)
            if existing is None:
                store.create(kinds.CORE_NAMESPACES, None, {"metadata": {"name": ns, "labels": labels}})
            elif labels:
                current = store.get(kinds.CORE_NAMESPACES, None, ns)
                merged = {**(current["metadata"].get("labels") or {}), **labels}
                if merged != current["metadata"].get("labels"):
                    current["metadata"]["labels"] = merged
                    store.update(kinds.CORE_NAMESPACES, None, ns, current)
        wanted_nodes = set()
        for node in nodes:
            body = node_object(node, lab)
            wanted_nodes.add(("", body["metadata"]["name"]))
            status = body.pop("status")
            _upsert(store, kinds.CORE_NODES, body)
            _set_status(store, kinds.CORE_NODES, None, body["metadata"]["name"], status)
        wanted_pods = set()
        for pod in pods:
            body, status = pod_objects(pod, lab, host_ips)
            ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
            wanted_pods.add((ns, name))
            sa = body["spec"]["serviceAccountName"]
            if store.peek(kinds.CORE_SERVICEACCOUNTS, ns, sa) is None:
                store.create(kinds.CORE_SERVICEACCOUNTS, ns, {"metadata": {"name": sa}})
            existing = store.peek(kinds.CORE_PODS, ns, name)
            if existing is not None and (existing.get("spec") or {}).get("nodeName") != node_of(body):
                store.delete(kinds.CORE_PODS, ns, name)  # a pod never moves: a new one replaces it
            _upsert(store, kinds.CORE_PODS, body)
            _set_status(store, kinds.CORE_PODS, ns, name, status)
        wanted_svcs = set()
        for svc in services:
            body = service_object(svc, lab)
            wanted_svcs.add((body["metadata"]["namespace"], body["metadata"]["name"]))
            _upsert(store, kinds.CORE_SERVICES, body)
        for rtype, wanted in ((kinds.CORE_PODS, wanted_pods), (kinds.CORE_SERVICES, wanted_svcs),
                              (kinds.CORE_NODES, wanted_nodes)):
            for key, obj in list(store.items(rtype)):
                annotations = (obj.get("metadata") or {}).get("annotations") or {} if isinstance(obj, dict) else {}
                if annotations.get(LAB_ANNOTATION) == lab and key not in wanted:
                    store.delete(rtype, key[0] or None, key[1])
    except ApiError as err:
        raise LabStateError(f"lab state rejected by the API server: {err.message}") from None
    return {"namespaces": len(namespaces), "nodes": len(wanted_nodes), "pods": len(wanted_pods),
            "services": len(wanted_svcs)}


def node_of(pod_body: Mapping[str, Any]) -> str:
    return pod_body["spec"]["nodeName"]

"""The few controllers a cluster needs for the mesh to see what it would see on a real one.

- EndpointSlices kept in step with Services and Pods, as kube-controller-manager's endpointslice controller
  does: one slice per Service (per distinct port mapping), endpoints for pods with an IP whose labels match
  the selector, ready/serving/terminating conditions, targetRef and nodeName.
- Namespaces: a "default" ServiceAccount in each; deleting a namespace removes everything in it, then it.
- Garbage collection: objects whose owner (by `ownerReferences` uid) is deleted are deleted too.

They run synchronously after the write that triggers them (see `Store.add_controller`), so a client that
created a Service and pods sees the slice by the time its next request is served.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from mesh.kube.apiserver import kinds
from mesh.kube.apiserver.errors import ApiError
from mesh.kube.apiserver.selectors import selector_from_match_labels
from mesh.kube.apiserver.store import Change, Store

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"


def install_controllers(store: Store) -> None:
    namespaces = NamespaceController(store)
    store.add_controller(namespaces)
    namespaces.sync_all()
    store.add_controller(GarbageCollector(store))
    store.add_controller(EndpointSliceController(store))


class NamespaceController:
    def __init__(self, store: Store) -> None:
        self.store = store

    def sync_all(self) -> None:
        for (_, name), ns in list(self.store.items(kinds.CORE_NAMESPACES)):
            if not (ns.get("metadata") or {}).get("deletionTimestamp"):
                self._ensure_default_sa(name)

    def _ensure_default_sa(self, ns: str) -> None:
        if self.store.peek(kinds.CORE_SERVICEACCOUNTS, ns, "default") is None:
            self.store.create(kinds.CORE_SERVICEACCOUNTS, ns, {"metadata": {"name": "default"}})

    def __call__(self, change: Change) -> None:
        if change.rtype is not kinds.CORE_NAMESPACES or not isinstance(change.obj, dict):
            return
        name = change.key[1]
        if change.type == "ADDED":
            self._ensure_default_sa(name)
        elif change.type == "MODIFIED" and (change.obj.get("metadata") or {}).get("deletionTimestamp"):
            for rtype in self.store.registry.types:
                if not rtype.namespaced:
                    continue
                for (_, obj_name), _obj in list(self.store.items(rtype, name)):
                    _delete_quietly(self.store, rtype, name, obj_name, force=True)
            self.store.finalize_namespace(name)


class GarbageCollector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, change: Change) -> None:
        if change.type != "DELETED" or not isinstance(change.obj, dict):
            return
        uid = (change.obj.get("metadata") or {}).get("uid")
        if not uid:
            return
        ns = change.key[0]
        for rtype in self.store.registry.types:
            if ns and not rtype.namespaced:
                continue  # a namespaced owner cannot own cluster-scoped objects
            for (obj_ns, obj_name), obj in list(self.store.items(rtype, ns or None)):
                refs = (obj.get("metadata") or {}).get("ownerReferences") if isinstance(obj, dict) else None
                if isinstance(refs, list) and any(isinstance(r, dict) and r.get("uid") == uid for r in refs):
                    _delete_quietly(self.store, rtype, obj_ns, obj_name)


def _delete_quietly(store: Store, rtype: kinds.ResourceType, ns: str, name: str, force: bool = False) -> None:
    try:
        if force and store.peek(rtype, ns, name) is not None:
            obj = store.peek(rtype, ns, name)
            if isinstance(obj, dict) and (obj.get("metadata") or {}).get("finalizers"):
                store.patch(rtype, ns, name, "application/merge-patch+json", {"metadata": {"finalizers": None}})
                return
        store.delete(rtype, ns, name)
    except ApiError as err:
        if err.code != 404:
            log.warning("could not delete %s %s/%s: %s", rtype.plural, ns, name, err.message)


# --- endpointslices --------------------------------------------------------------------------------


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _resolve_target_port(service_port: Mapping[str, Any], pod: Mapping[str, Any]) -> int | None:
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in (container or {}).get("ports") or []:
            if isinstance(port, dict) and port.get("name") == target and \
                    port.get("protocol", "TCP") == service_port.get("protocol", "TCP"):
                return port.get("containerPort")
    return None


class EndpointSliceController:
    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, change: Change) -> None:
        rtype = change.rtype
        if rtype is kinds.CORE_SERVICES or rtype is kinds.CORE_PODS:
            ns = change.key[0]
            if rtype is kinds.CORE_SERVICES:
                self.reconcile(ns, change.key[1])
            else:
                for (_, svc_name), _svc in list(self.store.items(kinds.CORE_SERVICES, ns)):
                    self.reconcile(ns, svc_name)
        elif rtype is kinds.ENDPOINTSLICES and change.type == "DELETED" and isinstance(change.obj, dict):
            labels = (change.obj.get("metadata") or {}).get("labels") or {}
            if labels.get(MANAGED_BY_LABEL) == MANAGED_BY and labels.get(SERVICE_NAME_LABEL):
                self.reconcile(change.key[0], labels[SERVICE_NAME_LABEL])

    def _owned(self, ns: str, service: str) -> list[dict[str, Any]]:
        out = []
        for _, s in self.store.items(kinds.ENDPOINTSLICES, ns):
            labels = (s.get("metadata") or {}).get("labels") or {} if isinstance(s, dict) else {}
            if labels.get(SERVICE_NAME_LABEL) == service and labels.get(MANAGED_BY_LABEL) == MANAGED_BY:
                out.append(s)
        return out

    def desired(self, svc: Mapping[str, Any]) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """(ports, endpoints) groups: one slice for each distinct mapping of service ports to pod ports."""
        ns = svc["metadata"]["namespace"]
        spec = svc.get("spec") or {}
        selector = selector_from_match_labels(spec.get("selector") or {})
        groups: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for (_, pod_name), pod in self.store.items(kinds.CORE_PODS, ns):
            if not isinstance(pod, dict) or not selector.matches((pod.get("metadata") or {}).get("labels") or {}):
                continue
            status = pod.get("status") or {}
            ip = status.get("podIP")
            if not ip or status.get("phase") in ("Succeeded", "Failed"):
                continue
            ports = []
            for sp in spec.get("ports") or []:
                port = _resolve_target_port(sp, pod)
                if port is None:
                    continue
                ports.append({"name": sp.get("name", ""), "port": port, "protocol": sp.get("protocol", "TCP")})
                if sp.get("appProtocol"):
                    ports[-1]["appProtocol"] = sp["appProtocol"]
            terminating = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
            ready = _pod_ready(pod)
            endpoint: dict[str, Any] = {
                "addresses": [ip],
                "conditions": {"ready": ready and not terminating, "serving": ready, "terminating": terminating},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name,
                              "uid": (pod.get("metadata") or {}).get("uid", "")},
            }
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                endpoint["nodeName"] = node
            group_key = repr(sorted((p["name"], p["port"], p["protocol"]) for p in ports))
            groups.setdefault(group_key, (ports, []))[1].append(endpoint)
        if not groups:
            groups["[]"] = ([], [])  # a selector with no pods still gets one (empty) slice, as on the real server
        out = []
        for ports, endpoints in groups.values():
            endpoints.sort(key=lambda e: e["addresses"][0])
            out.append((ports, endpoints))
        return out

    def reconcile(self, ns: str, name: str) -> None:
        svc = self.store.peek(kinds.CORE_SERVICES, ns, name)
        owned = self._owned(ns, name)
        if svc is None or not isinstance(svc, dict) or not isinstance(svc.get("spec"), dict) \
                or not svc["spec"].get("selector"):
            for s in owned:
                _delete_quietly(self.store, kinds.ENDPOINTSLICES, ns, s["metadata"]["name"])
            return
        svc_labels = {k: v for k, v in ((svc.get("metadata") or {}).get("labels") or {}).items()
                      if k != SERVICE_NAME_LABEL}
        labels = {**svc_labels, SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}
        owner = {"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc["metadata"]["uid"],
                 "controller": True, "blockOwnerDeletion": True}
        remaining = list(owned)
        for ports, endpoints in self.desired(svc):
            body: dict[str, Any] = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"labels": labels, "ownerReferences": [owner], "namespace": ns,
                             "annotations": {}},
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
            }
            match = next((s for s in remaining if _slice_ports(s) == _key_ports(ports)), None) or \
                (remaining[0] if remaining else None)
            if match is None:
                body["metadata"]["generateName"] = f"{name}-"
                body["metadata"].pop("annotations")
                self.store.create(kinds.ENDPOINTSLICES, ns, body)
                continue
            remaining.remove(match)
            current = copy.deepcopy(match)
            wanted = copy.deepcopy(current)
            wanted["metadata"]["labels"] = labels
            wanted["metadata"]["ownerReferences"] = [owner]
            wanted["endpoints"], wanted["ports"] = endpoints, ports
            if wanted != current:
                self.store.update(kinds.ENDPOINTSLICES, ns, match["metadata"]["name"], wanted)
        for s in remaining:
            _delete_quietly(self.store, kinds.ENDPOINTSLICES, ns, s["metadata"]["name"])


def _key_ports(ports: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((p.get("name"), p.get("port"), p.get("protocol")) for p in ports)


def _slice_ports(s: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    return _key_ports([p for p in s.get("ports") or [] if isinstance(p, dict)])

"""Server-side printing: the `Table` objects `kubectl get` asks for, with the columns the real server sends.

kubectl asks for `as=Table` in its Accept header and prints whatever columns come back, so these decide
what a user sees in `kubectl get pods -o wide` against the lab: the pod IP and node included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from mesh.kube.apiserver import kinds
from mesh.kube.apiserver.kinds import ResourceType

Column = tuple[str, str, int, Callable[[Mapping[str, Any]], Any]]  # name, type, priority, cell


def human_age(created: str | None, now: datetime | None = None) -> str:
    """kubectl's short durations: 45s, 5m3s, 47m, 3h12m, 26h, 3d4h, 12d."""
    if not created:
        return "<unknown>"
    try:
        then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<invalid>"
    s = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    m, h, d = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if h < 3:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    return f"{d}d"


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def _name(o: Mapping[str, Any]) -> Any:
    return _get(o, "metadata", "name")


def _age(o: Mapping[str, Any]) -> str:
    return human_age(_get(o, "metadata", "creationTimestamp"))


def _pod_ready(o: Mapping[str, Any]) -> str:
    statuses = _get(o, "status", "containerStatuses") or []
    total = len(_get(o, "spec", "containers") or [])
    ready = sum(1 for s in statuses if isinstance(s, Mapping) and s.get("ready"))
    return f"{ready}/{total}"


def _pod_status(o: Mapping[str, Any]) -> str:
    if _get(o, "metadata", "deletionTimestamp"):
        return "Terminating"
    return str(_get(o, "status", "phase") or "Pending")


def _pod_restarts(o: Mapping[str, Any]) -> str:
    return str(sum(int(s.get("restartCount", 0)) for s in _get(o, "status", "containerStatuses") or []
                   if isinstance(s, Mapping)))


def _svc_ports(o: Mapping[str, Any]) -> str:
    parts = [f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in _get(o, "spec", "ports") or []
             if isinstance(p, Mapping)]
    return ",".join(parts) or "<none>"


def _svc_selector(o: Mapping[str, Any]) -> str:
    sel = _get(o, "spec", "selector") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>"


def _slice_ports(o: Mapping[str, Any]) -> str:
    return ",".join(str(p.get("port")) for p in o.get("ports") or [] if isinstance(p, Mapping)) or "<unset>"


def _slice_endpoints(o: Mapping[str, Any]) -> str:
    addrs = [a for e in o.get("endpoints") or [] if isinstance(e, Mapping) for a in e.get("addresses") or []]
    if not addrs:
        return "<unset>"
    return ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")


def _node_status(o: Mapping[str, Any]) -> str:
    for c in _get(o, "status", "conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            return "Ready" if c.get("status") == "True" else "NotReady"
    return "Unknown"


def _node_ip(o: Mapping[str, Any]) -> str:
    for a in _get(o, "status", "addresses") or []:
        if isinstance(a, Mapping) and a.get("type") == "InternalIP":
            return str(a.get("address"))
    return "<none>"


def _or_none(value: Any) -> Any:
    return "<none>" if value in (None, "", []) else value


NAME: Column = ("Name", "string", 0, _name)
AGE: Column = ("Age", "string", 0, _age)

COLUMNS: dict[ResourceType, list[Column]] = {
    kinds.CORE_PODS: [
        NAME, ("Ready", "string", 0, _pod_ready), ("Status", "string", 0, _pod_status),
        ("Restarts", "string", 0, _pod_restarts), AGE,
        ("IP", "string", 1, lambda o: _or_none(_get(o, "status", "podIP"))),
        ("Node", "string", 1, lambda o: _or_none(_get(o, "spec", "nodeName"))),
        ("Nominated Node", "string", 1, lambda o: _or_none(_get(o, "status", "nominatedNodeName"))),
        ("Readiness Gates", "string", 1, lambda o: "<none>"),
    ],
    kinds.CORE_SERVICES: [
        NAME, ("Type", "string", 0, lambda o: _get(o, "spec", "type") or "ClusterIP"),
        ("Cluster-IP", "string", 0, lambda o: _or_none(_get(o, "spec", "clusterIP"))),
        ("External-IP", "string", 0, lambda o: "<none>"), ("Port(s)", "string", 0, _svc_ports), AGE,
        ("Selector", "string", 1, _svc_selector),
    ],
    kinds.CORE_NAMESPACES: [NAME, ("Status", "string", 0, lambda o: _get(o, "status", "phase") or "Active"), AGE],
    kinds.CORE_NODES: [
        NAME, ("Status", "string", 0, _node_status), ("Roles", "string", 0, lambda o: "<none>"), AGE,
        ("Version", "string", 0, lambda o: _get(o, "status", "nodeInfo", "kubeletVersion") or ""),
        ("Internal-IP", "string", 1, _node_ip),
    ],
    kinds.CORE_SERVICEACCOUNTS: [NAME, ("Secrets", "string", 0, lambda o: str(len(o.get("secrets") or []))), AGE],
    kinds.ENDPOINTSLICES: [
        NAME, ("AddressType", "string", 0, lambda o: o.get("addressType", "")),
        ("Ports", "string", 0, _slice_ports), ("Endpoints", "string", 0, _slice_endpoints), AGE,
    ],
    kinds.AUTHORIZATION_POLICIES: [NAME, ("Action", "string", 0, lambda o: _or_none(_get(o, "spec", "action"))),
                                   AGE],
    kinds.GATEWAYS: [
        NAME, ("Class", "string", 0, lambda o: _or_none(_get(o, "spec", "gatewayClassName"))),
        ("Address", "string", 0, lambda o: _or_none(((_get(o, "status", "addresses") or [{}])[0] or {})
                                                    .get("value"))),
        ("Programmed", "string", 0, lambda o: next((c.get("status") for c in _get(o, "status", "conditions") or []
                                                    if isinstance(c, Mapping) and c.get("type") == "Programmed"),
                                                   "Unknown")),
        AGE,
    ],
    kinds.HTTP_ROUTES: [NAME, ("Hostnames", "string", 0, lambda o: _or_none(_get(o, "spec", "hostnames"))), AGE],
    kinds.VIRTUAL_SERVICES: [
        NAME, ("Gateways", "string", 0, lambda o: _or_none(_get(o, "spec", "gateways"))),
        ("Hosts", "string", 0, lambda o: _or_none(_get(o, "spec", "hosts"))), AGE,
    ],
    kinds.DESTINATION_RULES: [NAME, ("Host", "string", 0, lambda o: _or_none(_get(o, "spec", "host"))), AGE],
}


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]" if value else "<none>"
    return value


def table(rtype: ResourceType, objects: list[Any], resource_version: str, include_object: str = "Metadata",
          continue_token: str | None = None) -> dict[str, Any]:
    columns = COLUMNS.get(rtype, [NAME, AGE])
    rows = []
    for obj in objects:
        o = obj if isinstance(obj, Mapping) else {}
        cells = []
        for _, _, _, fn in columns:
            try:
                cells.append(_cell(fn(o)))
            except (TypeError, ValueError, AttributeError):
                cells.append("<invalid>")
        row: dict[str, Any] = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": o.get("metadata") if isinstance(o.get("metadata"), Mapping) else {}}
        rows.append(row)
    meta: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": [
            {"name": n, "type": t, "format": "name" if n == "Name" else "", "description": n, "priority": p}
            for n, t, p, _ in columns
        ],
        "rows": rows,
    }

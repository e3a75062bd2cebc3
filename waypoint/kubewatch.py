"""The waypoint's inputs from the Kubernetes API: its L7 config and the mesh model.

`KubeConfigWatch` lists and watches HTTPRoute, GRPCRoute, ReferenceGrant, VirtualService, DestinationRule
and AuthorizationPolicy and feeds the config store; a resource the store rejects gets a status condition
`Accepted=False` whose message names the field (the last good version stays in force), so
`kubectl get httproute r -o yaml` shows why. `KubeMeshSource` turns Pods, Services and Namespaces into the
mesh model (which pods back which Service, who uses this waypoint) with the same rules as the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any

from mesh.config import ConfigStore as MeshStore
from mesh.config.labstate import config_from_lab_state
from waypoint.config.store import ApplyResult, ConfigStore, Outcome
from waypoint.kube import MERGE, Kube, KubeError, list_and_watch, load_configuration, resource_path

log = logging.getLogger("waypoint.kubewatch")
CONTROLLER_NAME = "nodemesh.io/waypoint"

CONFIG_KINDS = (
    ("gateway.networking.k8s.io", "v1", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "grpcroutes"),
    ("gateway.networking.k8s.io", "v1beta1", "referencegrants"),
    ("networking.istio.io", "v1", "virtualservices"),
    ("networking.istio.io", "v1", "destinationrules"),
    ("security.istio.io", "v1", "authorizationpolicies"),
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_patch(obj: dict[str, Any], result: ApplyResult) -> dict[str, Any] | None:
    """The status to write for `result` (Gateway API routes report per parent), None to write nothing."""
    conditions = [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message[:32000],
                   "lastTransitionTime": _now(),
                   "observedGeneration": (obj.get("metadata") or {}).get("generation", 0)}
                  for c in result.conditions()]
    if not conditions:
        return None
    if obj.get("kind") in ("HTTPRoute", "GRPCRoute"):
        parents = ((obj.get("spec") or {}).get("parentRefs") or [])[:32]
        return {"status": {"parents": [{"parentRef": p, "controllerName": CONTROLLER_NAME, "conditions": conditions}
                                       for p in parents if isinstance(p, dict)]}}
    return {"status": {"conditions": conditions}}


class KubeConfigWatch:
    def __init__(self, store: ConfigStore, *, kubeconfig: str | None = None, kube: Kube | None = None,
                 write_status: bool = True) -> None:
        self.store = store
        self.kubeconfig = kubeconfig
        self.kube = kube
        self.write_status = write_status
        self._tasks: list[asyncio.Task[None]] = []
        self._written: dict[tuple[str, str, str], str] = {}
        self._owns_client = kube is None

    async def start(self) -> None:
        if self.kube is None:
            self.kube = Kube(await load_configuration(self.kubeconfig))
        for group, version, plural in CONFIG_KINDS:
            path = resource_path(group, version, plural)
            task = asyncio.get_running_loop().create_task(
                list_and_watch(self.kube, path, lambda e, g=group, v=version, p=plural: self._event(g, v, p, e)))
            self._tasks.append(task)

    async def _event(self, group: str, version: str, plural: str, event: dict[str, Any]) -> None:
        result = self.store.on_event(event)
        if result is None or result.ref is None:
            return
        if result.outcome is Outcome.REJECTED:
            log.error("waypoint config rejected: %s", result.message)
        if not self.write_status or result.outcome not in (Outcome.ACCEPTED, Outcome.REJECTED):
            return
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        key = (plural, meta.get("namespace", "default"), meta.get("name", ""))
        fingerprint = f"{meta.get('generation')}|{result.outcome}|{result.message}|{result.warnings}"
        if self._written.get(key) == fingerprint:
            return  # our own status write comes back as MODIFIED: do not loop
        patch = status_patch(obj, result)
        if patch is None:
            return
        self._written[key] = fingerprint
        path = resource_path(group, version, plural, key[1], key[2], "status")
        try:
            assert self.kube is not None
            await self.kube.request("PATCH", path, patch, content_type=MERGE)
        except KubeError as exc:
            log.warning("cannot write status of %s %s/%s: %s", plural, key[1], key[2], exc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._owns_client and self.kube is not None:
            await self.kube.close()


def lab_shape(pods: list[dict[str, Any]], services: list[dict[str, Any]], namespaces: list[dict[str, Any]],
              trust_domain: str = "cluster.local") -> dict[str, Any]:
    """Kubernetes objects in the shape of a lab state, so the lab's enrollment rules build the model."""
    out_pods = []
    for p in pods:
        meta, spec, status = p.get("metadata") or {}, p.get("spec") or {}, p.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") in ("Succeeded", "Failed") or spec.get("hostNetwork"):
            continue
        out_pods.append({"name": meta.get("name"), "namespace": meta.get("namespace", "default"),
                         "serviceAccount": spec.get("serviceAccountName") or "default",
                         "labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {},
                         "node": spec.get("nodeName") or "", "ip": ip})
    out_svcs = []
    for s in services:
        meta, spec = s.get("metadata") or {}, s.get("spec") or {}
        vip = spec.get("clusterIP")
        if not vip or vip == "None":
            continue
        ports = [{"port": pt["port"], "targetPort": pt.get("targetPort") if isinstance(pt.get("targetPort"), int)
                  else pt["port"], "name": pt.get("name")} for pt in spec.get("ports") or [] if "port" in pt]
        out_svcs.append({"name": meta.get("name"), "namespace": meta.get("namespace", "default"), "vip": vip,
                         "ports": ports, "selector": spec.get("selector") or {}, "labels": meta.get("labels") or {}})
    ns = {(n.get("metadata") or {}).get("name"): {"labels": (n.get("metadata") or {}).get("labels") or {}}
          for n in namespaces}
    return {"name": "kube", "trustDomain": trust_domain, "pods": out_pods, "services": out_svcs, "namespaces": ns}


class KubeMeshSource:
    """Pods, Services and Namespaces -> the mesh store's `kube` contribution, rebuilt on every change."""

    KINDS = (("", "v1", "pods"), ("", "v1", "services"), ("", "v1", "namespaces"))

    def __init__(self, mesh: MeshStore, kube: Kube, trust_domain: str = "cluster.local") -> None:
        self.mesh = mesh
        self.kube = kube
        self.trust_domain = trust_domain
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k[2]: {} for k in self.KINDS}
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: asyncio.Event | None = None

    async def start(self) -> None:
        self._dirty = asyncio.Event()
        loop = asyncio.get_running_loop()
        for group, version, plural in self.KINDS:
            self._tasks.append(loop.create_task(list_and_watch(
                self.kube, resource_path(group, version, plural), lambda e, p=plural: self._event(p, e),
                on_sync=lambda items, p=plural: self._sync(p, items))))
        self._tasks.append(loop.create_task(self._rebuild_loop()))

    def _key(self, obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace", ""), meta.get("name", ""))

    def _sync(self, plural: str, items: list[dict[str, Any]]) -> None:
        self.objects[plural] = {self._key(o): o for o in items}
        assert self._dirty is not None
        self._dirty.set()

    def _event(self, plural: str, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        if event.get("type") == "DELETED":
            self.objects[plural].pop(self._key(obj), None)
        else:
            self.objects[plural][self._key(obj)] = obj
        assert self._dirty is not None
        self._dirty.set()

    async def _rebuild_loop(self) -> None:
        assert self._dirty is not None
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.1)  # coalesce bursts of events into one snapshot
            self._dirty.clear()
            try:
                state = lab_shape(list(self.objects["pods"].values()), list(self.objects["services"].values()),
                                  list(self.objects["namespaces"].values()), self.trust_domain)
                self.mesh.replace("kube", config_from_lab_state(state))
            except Exception:
                log.exception("building the mesh model from the Kubernetes objects failed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

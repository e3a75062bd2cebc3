"""The waypoint controller: a `Gateway` of class `istio-waypoint` (or the project's `nodemesh-waypoint`)
becomes a waypoint ServiceAccount, Deployment and Service in the Gateway's namespace, as istiod does.

Reconciliation is level-based: on every Gateway event (and on a periodic resync) the wanted objects are
computed from the Gateway alone (`desired_objects`, a pure function) and created or replaced when they
differ; they carry an owner reference to the Gateway (Kubernetes garbage-collects them), and the
controller deletes them itself when the Gateway goes. The Gateway's status says what happened:
`Accepted`/`Programmed` conditions and the Service address, or `Accepted=False` with a message naming
the field that is wrong (for example a listener that is not HBONE on 15008), in which case nothing is
deployed or changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from waypoint.kube import MERGE, Kube, KubeError, list_and_watch, resource_path

log = logging.getLogger("waypoint.controller")

WAYPOINT_CLASSES = ("istio-waypoint", "nodemesh-waypoint")
WAYPOINT_FOR = ("service", "workload", "all", "none")
DEFAULT_IMAGE = "ghcr.io/nodemesh/nodemesh:0.1.0"
MANAGED_BY = "nodemesh-waypoint-controller"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
GATEWAYS = ("gateway.networking.k8s.io", "v1", "gateways")


class GatewayInvalid(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def validate_gateway(gw: dict[str, Any]) -> None:
    """Raise GatewayInvalid naming the field when the Gateway cannot be a waypoint."""
    meta = gw.get("metadata") or {}
    spec = gw.get("spec") or {}
    listeners = spec.get("listeners")
    if not isinstance(listeners, list) or not listeners:
        raise GatewayInvalid("spec.listeners", "a waypoint needs a listener {name: mesh, port: 15008, protocol: HBONE}")
    hbone = False
    for i, listener in enumerate(listeners):
        if not isinstance(listener, dict):
            raise GatewayInvalid(f"spec.listeners[{i}]", "must be a mapping")
        proto = listener.get("protocol")
        if proto == "HBONE":
            if listener.get("port") != 15008:
                raise GatewayInvalid(f"spec.listeners[{i}].port",
                                     f"a waypoint takes HBONE on port 15008 (got {listener.get('port')!r})")
            hbone = True
        elif proto not in ("HTTP", "TCP", "TLS", "HTTPS"):
            raise GatewayInvalid(f"spec.listeners[{i}].protocol",
                                 f"must be HBONE, HTTP, HTTPS, TCP or TLS (got {proto!r})")
    if not hbone:
        raise GatewayInvalid("spec.listeners", "no HBONE listener on port 15008: clients could not reach the waypoint")
    wf = (meta.get("labels") or {}).get("istio.io/waypoint-for")
    if wf is not None and wf not in WAYPOINT_FOR:
        raise GatewayInvalid('metadata.labels["istio.io/waypoint-for"]',
                             f"must be one of {', '.join(WAYPOINT_FOR)} (got {wf!r})")


DEFAULT_CA_URL = "https://nodemesh-ca.nodemesh-system.svc:15012"
CA_ROOTS_ENV = "NODEMESH_CA_ROOTS_PEM"


@dataclass(frozen=True)
class Settings:
    image: str = DEFAULT_IMAGE
    trust_domain: str = "cluster.local"
    classes: Sequence[str] = WAYPOINT_CLASSES
    resync: float = 300.0
    ca_url: str = DEFAULT_CA_URL
    # The CA's root certificate (PEM), handed to each waypoint in its pod spec: public data, and it spares
    # copying a ConfigMap into every namespace that has a waypoint.
    ca_roots_pem: str = ""


def _labels(gw: dict[str, Any]) -> dict[str, str]:
    name = gw["metadata"]["name"]
    return {GATEWAY_NAME_LABEL: name, "app.kubernetes.io/name": name, "app.kubernetes.io/component": "waypoint",
            "app.kubernetes.io/managed-by": MANAGED_BY,
            # The waypoint's own traffic is not captured by the node agents: it speaks HBONE itself.
            "istio.io/dataplane-mode": "none"}


def desired_objects(gw: dict[str, Any], settings: Settings = Settings()) -> list[dict[str, Any]]:
    """ServiceAccount, Deployment and Service for a valid waypoint Gateway (a pure function)."""
    meta = gw["metadata"]
    name, ns = meta["name"], meta.get("namespace", "default")
    labels = _labels(gw)
    owner = [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": name,
              "uid": meta.get("uid", ""), "controller": True, "blockOwnerDeletion": True}]
    common = {"namespace": ns, "labels": labels, "ownerReferences": owner}
    selector = {GATEWAY_NAME_LABEL: name}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, **common}}
    args = ["waypoint", f"--name={ns}/{name}", "--kube", "--mesh-config=kube",
            f"--trust-domain={settings.trust_domain}", f"--ca-url={settings.ca_url}",
            "--ca-token=/var/run/secrets/nodemesh/tokens/nodemesh-token",
            f"--ca-roots=env:{CA_ROOTS_ENV}",
            "--listen=0.0.0.0:15008", "--admin=0.0.0.0:15020"]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, **common},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": "15020",
                    "prometheus.io/path": "/stats/prometheus"}},
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "waypoint",
                        "image": settings.image,
                        "args": args,
                        "ports": [{"name": "hbone", "containerPort": 15008, "protocol": "TCP"},
                                  {"name": "http-metrics", "containerPort": 15020, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15020},
                                           "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"memory": "1Gi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                            "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "env": [{"name": CA_ROOTS_ENV, "value": settings.ca_roots_pem}],
                        "volumeMounts": [
                            {"name": "ca-token", "mountPath": "/var/run/secrets/nodemesh/tokens", "readOnly": True}],
                    }],
                    # The waypoint obtains its own identity from the CA with its service-account token (the
                    # CA runs with --workload-tokens); the CA's root certificate comes in the pod spec.
                    "volumes": [
                        {"name": "ca-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "nodemesh-ca", "expirationSeconds": 43200, "path": "nodemesh-token"}}]}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, **common},
        "spec": {"selector": selector, "ports": [
            {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "all"},
            {"name": "http-metrics", "port": 15020, "targetPort": 15020, "protocol": "TCP"}]},
    }
    return [sa, deployment, service]


_PATHS = {"ServiceAccount": ("", "v1", "serviceaccounts"), "Deployment": ("apps", "v1", "deployments"),
          "Service": ("", "v1", "services")}


def _differs(want: dict[str, Any], have: dict[str, Any]) -> bool:
    """Does the live object lack what we want? Fields the API server fills in are ignored."""
    def covers(w: Any, h: Any) -> bool:
        if isinstance(w, dict):
            return isinstance(h, dict) and all(covers(v, h.get(k)) for k, v in w.items())
        if isinstance(w, list):
            return isinstance(h, list) and len(w) == len(h) and all(covers(a, b) for a, b in zip(w, h, strict=True))
        return bool(w == h)

    wm, hm = want["metadata"], have.get("metadata") or {}
    return not (covers(wm.get("labels"), hm.get("labels")) and covers(want.get("spec"), have.get("spec")))


class WaypointController:
    def __init__(self, kube: Kube, settings: Settings = Settings()) -> None:
        self.kube = kube
        self.settings = settings
        self.gateways: dict[tuple[str, str], dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()

    def ours(self, gw: dict[str, Any]) -> bool:
        return (gw.get("spec") or {}).get("gatewayClassName") in self.settings.classes

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(list_and_watch(self.kube, resource_path(*GATEWAYS), self._event)))
        self._tasks.append(loop.create_task(self._resync()))

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync)
            for gw in list(self.gateways.values()):
                await self.reconcile(gw)

    async def _event(self, event: dict[str, Any]) -> None:
        gw = event.get("object") or {}
        meta = gw.get("metadata") or {}
        key = (meta.get("namespace", "default"), meta.get("name", ""))
        if event.get("type") == "DELETED":
            if self.gateways.pop(key, None) is not None:
                await self.remove(*key)
            return
        if not self.ours(gw):
            if self.gateways.pop(key, None) is not None:  # its class changed away from ours
                await self.remove(*key)
            return
        self.gateways[key] = gw
        await self.reconcile(gw)

    async def reconcile(self, gw: dict[str, Any]) -> None:
        meta = gw["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        async with self._lock:
            try:
                validate_gateway(gw)
            except GatewayInvalid as exc:
                log.error("Gateway %s/%s rejected: %s", ns, name, exc)
                await self._status(gw, accepted=False, reason="Invalid", message=str(exc))
                return
            try:
                for want in desired_objects(gw, self.settings):
                    await self._apply(want)
                svc = await self.kube.get(resource_path("", "v1", "services", ns, name))
                address = ((svc or {}).get("spec") or {}).get("clusterIP")
                await self._status(gw, accepted=True, reason="Accepted",
                                   message="waypoint Deployment and Service are in place", address=address)
            except KubeError as exc:
                log.error("reconciling Gateway %s/%s failed: %s", ns, name, exc)
                await self._status(gw, accepted=True, programmed=False, reason="Pending",
                                   message=f"creating the waypoint's objects failed: {exc}")

    async def _apply(self, want: dict[str, Any]) -> None:
        group, version, plural = _PATHS[want["kind"]]
        ns, name = want["metadata"]["namespace"], want["metadata"]["name"]
        have = await self.kube.get(resource_path(group, version, plural, ns, name))
        if have is None:
            await self.kube.request("POST", resource_path(group, version, plural, ns), want)
            log.info("created %s %s/%s", want["kind"], ns, name)
        elif _differs(want, have):
            body = dict(want)
            body["metadata"] = {**want["metadata"],
                                "resourceVersion": (have.get("metadata") or {}).get("resourceVersion")}
            if want["kind"] == "Service":  # clusterIP is immutable: keep the allocated one
                body["spec"] = {**want["spec"], "clusterIP": (have.get("spec") or {}).get("clusterIP")}
            await self.kube.request("PUT", resource_path(group, version, plural, ns, name), body)
            log.info("updated %s %s/%s", want["kind"], ns, name)

    async def remove(self, ns: str, name: str) -> None:
        for kind in ("Deployment", "Service", "ServiceAccount"):
            group, version, plural = _PATHS[kind]
            path = resource_path(group, version, plural, ns, name)
            have = await self.kube.get(path)
            if have is not None and (have["metadata"].get("labels") or {}).get(
                    "app.kubernetes.io/managed-by") == MANAGED_BY:
                with contextlib.suppress(KubeError):
                    await self.kube.request("DELETE", path)
                    log.info("deleted %s %s/%s", kind, ns, name)

    async def _status(self, gw: dict[str, Any], *, accepted: bool, reason: str, message: str,
                      address: str | None = None, programmed: bool | None = None) -> None:
        meta = gw["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        gen = meta.get("generation", 0)
        prog = accepted if programmed is None else programmed
        status: dict[str, Any] = {"conditions": [
            {"type": "Accepted", "status": "True" if accepted else "False", "reason": reason if not accepted
             else "Accepted", "message": message, "lastTransitionTime": now, "observedGeneration": gen},
            {"type": "Programmed", "status": "True" if prog else "False",
             "reason": "Programmed" if prog else reason, "message": message, "lastTransitionTime": now,
             "observedGeneration": gen}]}
        if address:
            status["addresses"] = [{"type": "IPAddress", "value": address}]
        old = gw.get("status") or {}
        if [(c.get("type"), c.get("status"), c.get("message")) for c in old.get("conditions") or []] == [
                (c["type"], c["status"], c["message"]) for c in status["conditions"]] and \
                old.get("addresses") == status.get("addresses"):
            return  # unchanged: writing it again would only wake every watcher
        path = resource_path(*GATEWAYS, meta.get("namespace", "default"), meta["name"], "status")
        try:
            await self.kube.request("PATCH", path, {"status": status}, content_type=MERGE)
        except KubeError as exc:
            log.warning("cannot write the status of Gateway %s/%s: %s", meta.get("namespace"), meta["name"], exc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()


async def run_controller(kubeconfig: str | None, settings: Settings) -> None:
    from waypoint.kube import load_configuration

    kube = Kube(await load_configuration(kubeconfig))
    controller = WaypointController(kube, settings)
    await controller.start()
    try:
        await asyncio.Event().wait()
    finally:
        await controller.stop()
        await kube.close()

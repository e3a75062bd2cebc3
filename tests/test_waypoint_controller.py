"""The waypoint controller and the waypoint's Kubernetes inputs, against the in-repo API server test
double (there is no real API server on this machine) over real HTTP with kubernetes-asyncio: a Gateway of
class istio-waypoint becomes a ServiceAccount, Deployment and Service that validate against the
Kubernetes schemas; a bad Gateway or route is refused with a status that names the field; the mesh model
and the L7 config follow the API server."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mesh.config import ConfigStore as MeshStore
from mesh.kube.apiserver import ApiError, ApiServer, Registry, ResourceType, Store
from mesh.kube.apiserver import kinds as k
from mesh.kube.kubeconfig import write_kubeconfig
from waypoint.config.model import ServiceRef
from waypoint.config.store import ConfigStore, WaypointIdentity
from waypoint.controller import MANAGED_BY, Settings, WaypointController, desired_objects
from waypoint.kube import Kube, load_configuration
from waypoint.kubewatch import KubeConfigWatch, KubeMeshSource

pytestmark = pytest.mark.timeout(60)

DEPLOYMENTS = ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",),
                           subresources=("status",), status_subresource=True)
ROOT = Path(__file__).resolve().parent.parent


def gateway(name="waypoint", port=15008, cls="istio-waypoint", labels=None):
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "labels": labels or {"istio.io/waypoint-for": "service"}},
            "spec": {"gatewayClassName": cls, "listeners": [{"name": "mesh", "port": port, "protocol": "HBONE"}]}}


def maybe(store, rtype, ns, name):
    try:
        return store.get(rtype, ns, name)
    except ApiError:
        return None


async def eventually(predicate, timeout=15.0):
    """Wait for `predicate()`; the timeout only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.fixture
async def api(tmp_path):
    store = Store(Registry((*k.RESOURCE_TYPES, DEPLOYMENTS)))
    server = ApiServer(store=store)
    await server.start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    kube = Kube(await load_configuration(str(kubeconfig)))
    try:
        yield store, kube
    finally:
        await kube.close()
        await server.stop()


async def test_gateway_becomes_a_waypoint_deployment_and_service(api):
    store, kube = api
    controller = WaypointController(kube, Settings(image="example.com/nodemesh:test"))
    await controller.start()
    try:
        store.create(k.GATEWAYS, "default", gateway())
        dep = await eventually(lambda: maybe(store, DEPLOYMENTS, "default", "waypoint"))
        svc = await eventually(lambda: maybe(store, k.CORE_SERVICES, "default", "waypoint"))
        assert maybe(store, k.CORE_SERVICEACCOUNTS, "default", "waypoint") is not None
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--name=default/waypoint" in args and dep["spec"]["template"]["spec"]["serviceAccountName"] == "waypoint"
        assert [p["port"] for p in svc["spec"]["ports"]] == [15008, 15020]
        owner = dep["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("Gateway", "waypoint")
        gw = await eventually(lambda: (store.get(k.GATEWAYS, "default", "waypoint").get("status") or {}).get(
            "addresses") and store.get(k.GATEWAYS, "default", "waypoint"))
        conds = {c["type"]: c["status"] for c in gw["status"]["conditions"]}
        assert conds == {"Accepted": "True", "Programmed": "True"}
        assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": svc["spec"]["clusterIP"]}]
        # Drift is repaired: a hand edit of the Deployment's spec is put back.
        dep["spec"]["replicas"] = 0
        store.update(DEPLOYMENTS, "default", "waypoint", dep)
        await controller.reconcile(store.get(k.GATEWAYS, "default", "waypoint"))
        assert store.get(DEPLOYMENTS, "default", "waypoint")["spec"]["replicas"] == 1
        # The Gateway goes: so does everything made for it.
        store.delete(k.GATEWAYS, "default", "waypoint")
        await eventually(lambda: maybe(store, DEPLOYMENTS, "default", "waypoint") is None
                         and maybe(store, k.CORE_SERVICES, "default", "waypoint") is None)
    finally:
        await controller.stop()


async def test_invalid_gateway_is_refused_with_the_field_and_others_are_ignored(api):
    store, kube = api
    controller = WaypointController(kube)
    await controller.start()
    try:
        store.create(k.GATEWAYS, "default", gateway("bad", port=80))
        store.create(k.GATEWAYS, "default", gateway("ingress", cls="nginx"))
        gw = await eventually(lambda: (store.get(k.GATEWAYS, "default", "bad").get("status") or {}).get("conditions")
                              and store.get(k.GATEWAYS, "default", "bad"))
        accepted = next(c for c in gw["status"]["conditions"] if c["type"] == "Accepted")
        assert accepted["status"] == "False"
        assert accepted["message"] == "spec.listeners[0].port: a waypoint takes HBONE on port 15008 (got 80)"
        await asyncio.sleep(0.3)
        assert maybe(store, DEPLOYMENTS, "default", "bad") is None
        assert maybe(store, DEPLOYMENTS, "default", "ingress") is None
        assert not (store.get(k.GATEWAYS, "default", "ingress").get("status") or {}).get("conditions")
    finally:
        await controller.stop()


def test_generated_objects_and_manifests_validate_against_kubernetes_schemas():
    gw = gateway()
    gw["metadata"].update(namespace="apps", uid="0d6b2c5e-1111-2222-3333-444455556666")
    for obj in desired_objects(gw):
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders the manifests (the machine image ships it)"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "daemonset" / "waypoint")], capture_output=True,
                         text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "GatewayClass"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("gateway.networking.k8s.io"):
            continue  # a CRD kind: not in the core schemas
        kubernetes_validate.validate(doc, "1.32.0", strict=True)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][0] == "waypoint-controller"
    role = next(d for d in docs if d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == "nodemesh-waypoint-controller")
    verbs = {(r["apiGroups"][0], res): set(r["verbs"]) for r in role["rules"] for res in r["resources"]}
    assert verbs[("gateway.networking.k8s.io", "gateways")] == {"get", "list", "watch"}
    assert "delete" not in verbs[("gateway.networking.k8s.io", "gateways")]


async def test_routes_from_the_api_with_status_for_rejections(api):
    store, kube = api
    config = ConfigStore(waypoint=WaypointIdentity("default", "waypoint"))
    watch = KubeConfigWatch(config, kube=kube)
    await watch.start()
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "r1"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]}]}}
    try:
        store.create(k.HTTP_ROUTES, "default", route)
        await eventually(lambda: config.snapshot().route_table(ServiceRef("default", "web")).has_routes)
        status = await eventually(
            lambda: (store.get(k.HTTP_ROUTES, "default", "r1").get("status") or {}).get("parents"))
        assert status[0]["conditions"][0]["status"] == "True"
        bad = store.get(k.HTTP_ROUTES, "default", "r1")
        bad["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"
        store.update(k.HTTP_ROUTES, "default", "r1", bad)

        def rejected():
            parents = (store.get(k.HTTP_ROUTES, "default", "r1").get("status") or {}).get("parents") or []
            return parents and parents[0]["conditions"][0]["status"] == "False" and parents[0]["conditions"][0]

        cond = await eventually(rejected)
        assert "spec.rules[0].matches[0].path.type: must be one of Exact, PathPrefix, RegularExpression" in \
            cond["message"]
        assert "previously accepted version stays in force" in cond["message"]
        table = config.snapshot().route_table(ServiceRef("default", "web"))
        assert table.entries[0].match.path.value == "/api"  # the last good version still routes
    finally:
        await watch.stop()


async def test_mesh_model_from_pods_services_and_labels(api):
    store, kube = api
    mesh = MeshStore()
    source = KubeMeshSource(mesh, kube)
    await source.start()
    try:
        store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "web", "labels": {
            "istio.io/use-waypoint": "waypoint"}}, "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080}]}})
        store.create(k.CORE_PODS, "default", {"metadata": {"name": "web-1", "labels": {
            "app": "web", "istio.io/dataplane-mode": "ambient"}}, "spec": {"nodeName": "n1", "containers": [
                {"name": "app", "image": "x"}]}})
        pod = store.get(k.CORE_PODS, "default", "web-1")
        pod["status"] = {"phase": "Running", "podIP": "10.244.1.7"}
        store.update(k.CORE_PODS, "default", "web-1", pod, subresource="status")

        def ready():
            snap = mesh.snapshot
            svc = snap.service("default/web.default.svc.cluster.local")
            return svc is not None and snap.ready_endpoints(svc.key) and svc

        svc = await eventually(ready)
        assert svc.waypoint.destination.hostname == "waypoint.default.svc.cluster.local"
        (wl, ep), = mesh.snapshot.ready_endpoints(svc.key)
        assert (str(wl.workload_ips[0]), dict(ep.ports), wl.in_mesh) == ("10.244.1.7", {80: 8080}, True)
    finally:
        await source.stop()


def test_controller_only_touches_what_it_manages():
    dep = desired_objects(gateway())[1]
    assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == MANAGED_BY
    assert dep["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"

"""Kubernetes objects -> the mesh config model (agent.kube.translate), without any server.

The objects are written in the shape the API server sends them; one test also takes them from the API
server double's store, with EndpointSlices made by its controller, to keep the hand-written shapes honest.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from agent.kube.translate import TranslateOptions, captured, translate
from mesh.config import ConfigStore
from mesh.config.model import HealthPolicy, HealthStatus, NamespacedHostname, NetworkMode, Protocol
from mesh.kube.apiserver import Store
from mesh.kube.apiserver import kinds as k
from mesh.kube.apiserver.controllers import install_controllers

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def ns(name, labels=None):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def pod(name, ip="10.244.1.10", namespace="default", node="node-a", labels=None, annotations=None, sa=None,
        phase="Running", ready=True, ports=None, host_network=None, owner=None, ips=None):
    meta = {"name": name, "namespace": namespace, "labels": labels or {"app": name}, "uid": f"uid-{name}"}
    if annotations:
        meta["annotations"] = annotations
    if owner:
        meta["ownerReferences"] = [owner]
    spec = {"nodeName": node, "containers": [{"name": "app", "image": "img", "ports": ports or []}]}
    if sa:
        spec["serviceAccountName"] = sa
    if host_network is not None:
        spec["hostNetwork"] = host_network
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": i} for i in (ips or [ip])]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def svc(name, cluster_ip="10.96.0.10", namespace="default", selector=None, ports=None, labels=None, **spec):
    body = {"clusterIP": cluster_ip, "ports": ports if ports is not None else [{"name": "http", "port": 80}],
            **spec}
    if cluster_ip and cluster_ip != "None":
        body["clusterIPs"] = [cluster_ip]
    if selector is not False:
        body["selector"] = selector or {"app": name}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}}, "spec": body}


def eps(service, endpoints, namespace="default", ports=None, name=None):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name or f"{service}-abc", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": endpoints, "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def gateway(name, namespace="default", waypoint_for=None, cls="istio-waypoint", port=15008, protocol="HBONE"):
    labels = {WAYPOINT_FOR: waypoint_for} if waypoint_for else {}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"gatewayClassName": cls, "listeners": [{"name": "mesh", "port": port, "protocol": protocol}]}}


def policy(name, namespace="default", **spec):
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


WAYPOINT_FOR = "istio.io/waypoint-for"


def run(*objects, options=None):
    by_kind: dict[str, list] = {}
    for obj in objects:
        by_kind.setdefault(obj.get("kind", "Pod") if isinstance(obj, dict) else "Pod", []).append(obj)
    return translate(by_kind, options)


def workloads(t):
    return {w.name: w for w in t.config.workloads}


def services(t):
    return {s.name: s for s in t.config.services}


# --- enrolment ---------------------------------------------------------------------------------------------


def test_enrolment_follows_istio_labels():
    t = run(
        ns("default", AMBIENT), ns("plain"),
        pod("in-ns"),
        pod("opt-out", ip="10.244.1.11", labels={"istio.io/dataplane-mode": "none"}),
        pod("sidecar", ip="10.244.1.12", annotations={"sidecar.istio.io/status": "{}"}),
        pod("own-label", ip="10.244.1.13", namespace="plain", labels=AMBIENT),
        pod("not-enrolled", ip="10.244.1.14", namespace="plain"),
        pod("hostnet", ip="192.168.0.5", host_network=True),
        pod("waypoint-pod", ip="10.244.1.15", labels={"networking.istio.io/tunnel": "http"}, namespace="plain"),
    )
    w = workloads(t)
    assert w["in-ns"].protocol is Protocol.HBONE, "namespace label enrols"
    assert w["own-label"].protocol is Protocol.HBONE, "the pod's own label enrols"
    assert w["opt-out"].protocol is Protocol.TCP, "`none` on the pod wins over the namespace"
    assert w["sidecar"].protocol is Protocol.TCP, "a sidecar pod is never ambient"
    assert w["not-enrolled"].protocol is Protocol.TCP
    assert w["hostnet"].protocol is Protocol.TCP and w["hostnet"].network_mode is NetworkMode.HOST_NETWORK
    assert w["waypoint-pod"].protocol is Protocol.HBONE and w["waypoint-pod"].native_tunnel
    assert {n for n, wl in w.items() if captured(wl)} == {"in-ns", "own-label"}
    assert not t.skipped


def test_only_running_pods_with_an_ip_are_workloads_on_every_node():
    t = run(
        ns("default", AMBIENT),
        pod("local"), pod("remote", ip="10.244.2.10", node="node-b"),
        pod("pending", ip=None, phase="Pending"), pod("done", ip="10.244.1.99", phase="Succeeded"),
        pod("failed", ip="10.244.1.98", phase="Failed"),
    )
    w = workloads(t)
    assert sorted(w) == ["local", "remote"]
    assert w["remote"].node == "node-b" and w["remote"].protocol is Protocol.HBONE
    assert w["local"].uid == "Kubernetes//Pod/default/local"


def test_workload_identity_and_telemetry_names():
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9f7c", "controller": True, "uid": "x"}
    t = run(ns("shop"), pod("web-5d9f7c-abcde", namespace="shop", sa="web", owner=rs, ips=["10.244.1.10", "fd00::a"],
                            labels={"app": "web", "version": "v2", "pod-template-hash": "5d9f7c"}),
            options=TranslateOptions(trust_domain="example.org", cluster_id="c1"))
    (wl,) = t.config.workloads
    assert wl.identity == "spiffe://example.org/ns/shop/sa/web"
    assert wl.uid == "c1//Pod/shop/web-5d9f7c-abcde" and wl.cluster_id == "c1"
    assert (wl.workload_name, wl.workload_type) == ("web", "deployment")
    assert (wl.canonical_name, wl.canonical_revision) == ("web", "v2")
    assert wl.workload_ips == (ipaddress.ip_address("10.244.1.10"), ipaddress.ip_address("fd00::a"))
    assert wl.labels["app"] == "web"


# --- services and endpoints ---------------------------------------------------------------------------------


def test_services_vips_ports_and_named_target_ports_per_pod():
    t = run(
        ns("default"),
        pod("web-1", labels={"app": "web"}, ports=[{"name": "http", "containerPort": 8080}]),
        pod("web-2", ip="10.244.1.11", labels={"app": "web"}, ports=[{"name": "http", "containerPort": 9090}]),
        pod("web-3", ip="10.244.1.12", labels={"app": "web"}),  # has no port named http
        svc("web", selector={"app": "web"}, ports=[
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "admin", "port": 81, "targetPort": 9901},
            {"name": "plain", "port": 82},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]),
        svc("headless", cluster_ip="None", selector={"app": "web"}, ports=[{"port": 80, "targetPort": 8080}]),
        svc("alias", cluster_ip=None, selector=False, type="ExternalName", externalName="example.com"),
    )
    s = services(t)
    web = s["web"]
    assert web.hostname == "web.default.svc.cluster.local" and web.key == "default/web.default.svc.cluster.local"
    assert [str(v.address) for v in web.vips] == ["10.96.0.10"]
    assert dict(web.ports) == {80: 0, 81: 9901, 82: 82}, "TCP ports only; a named target is the endpoint's"
    assert s["headless"].vips == () and "alias" not in s
    w = workloads(t)
    key = web.key
    assert dict(w["web-1"].services[key]) == {80: 8080, 81: 9901, 82: 82}
    assert dict(w["web-2"].services[key]) == {80: 9090, 81: 9901, 82: 82}
    assert dict(w["web-3"].services[key]) == {81: 9901, 82: 82}, "no port named http: not behind port 80"

    store = ConfigStore()
    store.replace("k8s", t.config)
    snap = store.snapshot
    assert snap.service_by_vip("10.96.0.10") is not None
    assert {wl.name for wl, _ in snap.ready_endpoints(key)} == {"web-1", "web-2", "web-3"}


def test_endpoint_health_comes_from_endpointslices():
    t = run(
        ns("default"),
        pod("a", labels={"app": "web"}), pod("b", ip="10.244.1.11", labels={"app": "web"}),
        pod("c", ip="10.244.1.12", labels={"app": "web"}, ready=False),
        pod("d", ip="10.244.1.13", labels={"app": "web"}),
        svc("web", ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
        eps("web", [
            {"addresses": ["10.244.1.10"], "conditions": {"ready": True}},
            {"addresses": ["10.244.1.11"], "conditions": {"ready": False, "serving": True, "terminating": True}},
            {"addresses": ["10.244.1.13"], "conditions": {}},  # unset: ready
        ]),
    )
    w = workloads(t)
    assert w["a"].status is HealthStatus.HEALTHY
    assert w["b"].status is HealthStatus.UNHEALTHY, "terminating but serving: not ready"
    assert w["c"].status is HealthStatus.UNHEALTHY, "in no slice yet: the pod's Ready condition decides"
    assert w["d"].status is HealthStatus.HEALTHY, "ready unset means ready"
    store = ConfigStore()
    store.replace("k8s", t.config)
    key = services(t)["web"].key
    assert {wl.name for wl, _ in store.snapshot.ready_endpoints(key)} == {"a", "d"}


def test_publish_not_ready_addresses_keeps_unready_endpoints():
    t = run(ns("default"), pod("a", labels={"app": "db"}, ready=False),
            svc("db", ports=[{"port": 5432}], publishNotReadyAddresses=True),
            eps("db", [{"addresses": ["10.244.1.10"], "conditions": {"ready": True}}]))
    db = services(t)["db"]
    assert db.load_balancer is not None and db.load_balancer.health_policy is HealthPolicy.ALLOW_ALL
    store = ConfigStore()
    store.replace("k8s", t.config)
    assert [wl.name for wl, _ in store.snapshot.ready_endpoints(db.key)] == ["a"]


def test_a_service_without_selector_takes_its_endpoints_from_slices():
    t = run(ns("default"), pod("legacy", labels={"x": "y"}), pod("other", ip="10.244.1.11", labels={"x": "z"}),
            svc("manual", selector=False, ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
            eps("manual", [{"addresses": ["10.244.1.10"], "targetRef": {"kind": "Pod", "name": "legacy"}},
                           {"addresses": ["10.244.1.11"]},
                           {"addresses": ["192.0.2.1"]}],  # not a pod: nothing to route to
                ports=[{"name": "http", "port": 8443}]))
    key = services(t)["manual"].key
    w = workloads(t)
    assert dict(w["legacy"].services[key]) == {80: 8443}
    assert dict(w["other"].services[key]) == {80: 8443}, "found by address when there is no targetRef"


def test_from_the_api_server_double_with_its_endpointslice_controller():
    store = Store()
    install_controllers(store)
    store.create(k.CORE_NAMESPACES, None, {"metadata": {"name": "shop", "labels": AMBIENT}})
    for name, ip, ready in (("web-1", "10.244.1.10", "True"), ("web-2", "10.244.2.10", "False")):
        body = pod(name, ip=None, namespace="shop", labels={"app": "web"},
                   node="node-a" if name == "web-1" else "node-b", ports=[{"name": "http", "containerPort": 8080}])
        store.create(k.CORE_PODS, "shop", {"metadata": body["metadata"], "spec": body["spec"]})
        obj = store.get(k.CORE_PODS, "shop", name)
        obj["status"] = {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        store.update(k.CORE_PODS, "shop", name, obj, subresource="status")
    store.create(k.CORE_SERVICES, "shop", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    objects = {rt.kind: [obj for _, obj in store.items(rt)]
               for rt in (k.CORE_NAMESPACES, k.CORE_PODS, k.CORE_SERVICES, k.ENDPOINTSLICES)}
    t = translate(objects)
    assert not t.skipped
    w = workloads(t)
    web = services(t)["web"]
    assert web.vips, "the double allocated a ClusterIP"
    assert dict(w["web-1"].services[web.key]) == {80: 8080}
    assert w["web-1"].status is HealthStatus.HEALTHY and w["web-2"].status is HealthStatus.UNHEALTHY
    assert all(wl.protocol is Protocol.HBONE for wl in w.values())


# --- waypoints -----------------------------------------------------------------------------------------------


def test_waypoints_apply_by_waypoint_for():
    ns_labels = {**AMBIENT, "istio.io/use-waypoint": "wp"}
    for waypoint_for, svc_has, pod_has in (("service", True, False), (None, True, False),
                                           ("workload", False, True), ("all", True, True), ("none", False, False)):
        t = run(ns("default", ns_labels), gateway("wp", waypoint_for=waypoint_for), pod("app"), svc("app"))
        expected = NamespacedHostname("default", "wp.default.svc.cluster.local")
        got_svc = services(t)["app"].waypoint
        got_pod = workloads(t)["app"].waypoint
        assert (got_svc is not None) is svc_has, waypoint_for
        assert (got_pod is not None) is pod_has, waypoint_for
        for got in (got_svc, got_pod):
            assert got is None or (got.destination == expected and got.hbone_mtls_port == 15008)


def test_use_waypoint_on_objects_other_namespaces_and_opt_out():
    t = run(
        ns("default", AMBIENT), ns("infra"),
        gateway("shared", namespace="infra", waypoint_for="all", port=15018),
        gateway("local", waypoint_for="all"),
        gateway("ingress", cls="istio"),  # not a waypoint class
        pod("p1", labels={"app": "p1", "istio.io/use-waypoint": "shared",
                          "istio.io/use-waypoint-namespace": "infra"}),
        pod("p2", ip="10.244.1.11", labels={"app": "p2", "istio.io/use-waypoint": "infra/shared"}),
        svc("s1", labels={"istio.io/use-waypoint": "local"}),
        svc("s2", cluster_ip="10.96.0.11", labels={"istio.io/use-waypoint": "#none"}),
        svc("s3", cluster_ip="10.96.0.12", labels={"istio.io/use-waypoint": "ingress"}),
        svc("s4", cluster_ip="10.96.0.13", labels={"istio.io/use-waypoint": "missing"}),
    )
    w, s = workloads(t), services(t)
    assert w["p1"].waypoint.destination == NamespacedHostname("infra", "shared.infra.svc.cluster.local")
    assert w["p1"].waypoint.hbone_mtls_port == 15018, "the port of the Gateway's HBONE listener"
    assert w["p2"].waypoint == w["p1"].waypoint
    assert s["s1"].waypoint.destination == NamespacedHostname("default", "local.default.svc.cluster.local")
    assert s["s2"].waypoint is None and s["s3"].waypoint is None and s["s4"].waypoint is None
    assert sorted(t.waypoints) == ["default/local", "infra/shared"]
    assert any("default/missing" in msg for msg in t.warnings)
    assert any("default/ingress" in msg for msg in t.warnings)


def test_namespace_waypoint_with_per_object_opt_out_and_the_waypoint_itself():
    own = {"gateway.networking.k8s.io/gateway-name": "wp", "networking.istio.io/tunnel": "http"}
    t = run(
        ns("default", {**AMBIENT, "istio.io/use-waypoint": "wp"}),
        gateway("wp", waypoint_for="all"),
        pod("app"), pod("direct", ip="10.244.1.11", labels={"app": "direct", "istio.io/use-waypoint": "#none"}),
        pod("wp-pod", ip="10.244.1.12", labels=own),
        svc("wp", labels={"gateway.networking.k8s.io/gateway-name": "wp"}, selector=own,
            ports=[{"name": "mesh", "port": 15008}]),
    )
    w = workloads(t)
    assert w["app"].waypoint is not None and w["direct"].waypoint is None
    assert w["wp-pod"].waypoint is None and services(t)["wp"].waypoint is None, "a waypoint never loops to itself"
    assert not captured(w["wp-pod"])


def test_a_pod_not_in_the_mesh_gets_no_waypoint():
    t = run(ns("default", {"istio.io/use-waypoint": "wp"}), gateway("wp", waypoint_for="workload"), pod("app"))
    assert workloads(t)["app"].waypoint is None


# --- policies ------------------------------------------------------------------------------------------------


def test_policies_translated_and_targetref_ones_kept_for_waypoints():
    t = run(
        ns("default", AMBIENT), pod("web", labels={"app": "web"}),
        policy("allow-web", selector={"matchLabels": {"app": "web"}}, action="ALLOW",
               rules=[{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]),
        policy("global-deny", namespace="istio-system", action="DENY",
               rules=[{"to": [{"operation": {"ports": ["23"]}}]}]),
        policy("l7", targetRefs=[{"kind": "Service", "group": "", "name": "web"}], action="ALLOW",
               rules=[{"to": [{"operation": {"methods": ["GET"]}}]}]),
        policy("bad-port", action="DENY", rules=[{"to": [{"operation": {"ports": ["http"]}}]}]),
    )
    keys = [p.key for p in t.config.policies]
    assert keys == ["default/allow-web", "istio-system/global-deny"]
    assert [tp.key for tp in t.waypoint_policies] == ["default/l7"]
    (bad,) = t.skipped
    assert (bad.kind, bad.key) == ("AuthorizationPolicy", "default/bad-port")
    assert bad.field == "spec.rules[0].to[0].operation.ports[0]"
    store = ConfigStore()
    store.replace("k8s", t.config)
    web = store.snapshot.workload("Kubernetes//Pod/default/web")
    assert [p.name for p in store.snapshot.selected_policies(web)] == ["allow-web"]
    assert [p.name for p in store.snapshot.global_policies()] == ["global-deny"]


# --- malformed input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "obj", "field"), [
    ("Pod", pod("bad-ip", ip="not-an-ip"), "status.podIPs[0].ip"),
    ("Pod", {**pod("x"), "spec": {"hostNetwork": "yes"}}, "spec.hostNetwork"),
    ("Pod", {**pod("x"), "metadata": {"namespace": "default"}}, "metadata.name"),
    ("Pod", "just a string", ""),
    ("Pod", pod("bad-port", ports=[{"name": "http", "containerPort": 0}]), "spec.containers[0].ports[0].containerPort"),
    ("Service", svc("bad", ports=[{"port": "eighty"}]), "spec.ports[0].port"),
    ("Service", svc("bad", ports=[{"port": 80, "targetPort": "Not_A_Name"}]), "spec.ports[0].targetPort"),
    ("Service", svc("bad", cluster_ip="10.96.0.999"), "spec.clusterIPs[0]"),
    ("Gateway", gateway("bad", waypoint_for="everything"), "metadata.labels[istio.io/waypoint-for]"),
    ("Gateway", gateway("bad", protocol="HTTP"), "spec.listeners"),
    ("EndpointSlice", {**eps("web", []), "endpoints": "nope"}, "endpoints"),
    ("Namespace", {"kind": "Namespace", "metadata": {"labels": {}}}, "metadata.name"),
    ("AuthorizationPolicy", policy("bad", action="MAYBE"), "spec.action"),
])
def test_a_malformed_object_is_skipped_with_its_field(kind, obj, field):
    objects = {"Namespace": [ns("default", AMBIENT)], "Pod": [pod("good", ip="10.244.9.9")],
               "Service": [svc("good", cluster_ip="10.96.9.9")]}
    objects.setdefault(kind, []).append(obj)
    t = translate(objects)
    assert len(t.skipped) == 1, t.skipped
    (s,) = t.skipped
    assert s.kind == kind and s.field == field
    assert field in str(s) and s.reason
    assert "good" in workloads(t) and "good" in services(t), "everything else is still translated"


def test_translation_is_deterministic_whatever_the_input_order():
    objs = [ns("default", AMBIENT), gateway("wp"), svc("web", selector={"app": "web"}),
            *[pod(f"web-{i}", ip=f"10.244.1.{i}", labels={"app": "web"}) for i in range(1, 20)],
            policy("p", action="DENY", rules=[{}])]
    first = run(*objs)
    for seed in range(3):
        shuffled = list(objs)
        random.Random(seed).shuffle(shuffled)
        again = run(*shuffled)
        assert again.config == first.config and dict(again.waypoints) == dict(first.waypoints)

"""The lab's state file as a config source: pods -> workloads, services -> services and endpoints."""

from __future__ import annotations

import ipaddress
import json

import pytest

from mesh.config import ConfigError, ConfigStore, Protocol, config_from_lab_state, workloads_from_lab_state
from mesh.config.labstate import ambient_enrolled, parse_lab_state, services_from_lab_state
from mesh.config.model import GatewayAddress, NamespacedHostname


def pod(name, ns="default", labels=None, annotations=None, ip="10.244.1.5", node="node-a", sa="default"):
    return {
        "name": name,
        "namespace": ns,
        "serviceAccount": sa,
        "labels": labels or {},
        "annotations": annotations or {},
        "node": node,
        "ip": ip,
        "netns": f"nm-t1-{name}",
        "hostIfname": f"veth{name}",
        "gateway": "10.244.1.1",
    }


def state(pods, services=None, namespaces=None):
    doc = {
        "name": "t1",
        "trustDomain": "lab.local",
        "fabricNetns": "nm-t1-fabric",
        "nodes": [
            {
                "name": "node-a",
                "netns": "nm-t1-node-a",
                "fabricIp": "192.168.100.2",
                "podCidr": "10.244.1.0/24",
                "gateway": "10.244.1.1",
            }
        ],
        "pods": pods,
    }
    if services is not None:
        doc["services"] = services
    if namespaces is not None:
        doc["namespaces"] = namespaces
    return doc


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_pod_becomes_a_workload():
    (w,) = workloads_from_lab_state(
        state([pod("client", labels={"app": "sleep", "version": "v1", **AMBIENT}, sa="sleep")])
    )
    assert w.uid == "lab//v1/Pod/default/client"
    assert w.workload_ips == (ipaddress.ip_address("10.244.1.5"),)
    assert w.identity == "spiffe://lab.local/ns/default/sa/sleep"
    assert w.protocol is Protocol.HBONE
    assert (w.node, w.netns) == ("node-a", "/run/netns/nm-t1-client")
    assert (w.canonical_name, w.canonical_revision) == ("sleep", "v1")
    assert (w.workload_name, w.workload_type) == ("client", "pod")
    assert w.labels["app"] == "sleep"


@pytest.mark.parametrize(
    ("pod_labels", "annotations", "ns_labels", "enrolled"),
    [
        ({}, {}, {}, False),
        (AMBIENT, {}, {}, True),
        ({}, {}, AMBIENT, True),
        ({"istio.io/dataplane-mode": "none"}, {}, AMBIENT, False),
        (AMBIENT, {"sidecar.istio.io/status": "{}"}, {}, False),
        ({}, {}, {"istio.io/dataplane-mode": "sidecar"}, False),
    ],
    ids=["nothing", "pod-label", "namespace-label", "pod-opt-out", "sidecar-injected", "other-mode"],
)
def test_enrolment_follows_istio_labels(pod_labels, annotations, ns_labels, enrolled):
    st = state([pod("p", labels=pod_labels, annotations=annotations)], namespaces={"default": {"labels": ns_labels}})
    (w,) = workloads_from_lab_state(st)
    assert w.protocol is (Protocol.HBONE if enrolled else Protocol.TCP)


def test_custom_enrolled_predicate():
    st = state([pod("a", labels={"mesh": "yes"}), pod("b", ip="10.244.1.6")])
    ws = workloads_from_lab_state(st, enrolled=lambda p, ns: p["labels"].get("mesh") == "yes")
    assert [w.protocol for w in ws] == [Protocol.HBONE, Protocol.TCP]


def test_services_select_pods_and_become_endpoints():
    st = state(
        [
            pod("server-1", labels={"app": "echo"}, ip="10.244.1.10"),
            pod("server-2", labels={"app": "echo"}, ip="10.244.1.11"),
            pod("other", ns="prod", labels={"app": "echo"}, ip="10.244.1.12"),
            pod("client", labels={"app": "sleep"}, ip="10.244.1.13"),
        ],
        services=[
            {
                "name": "echo",
                "namespace": "default",
                "vip": "10.96.0.10",
                "ports": [{"port": 80, "targetPort": 8080, "name": "http"}, {"port": 9000}],
                "selector": {"app": "echo"},
            }
        ],
    )
    store = ConfigStore()
    store.replace("lab", config_from_lab_state(st))
    snap = store.snapshot
    svc = snap.service_by_vip("10.96.0.10")
    assert svc.key == "default/echo.default.svc.cluster.local"
    assert dict(svc.ports) == {80: 8080, 9000: 9000}
    eps = snap.ready_endpoints(svc.key)
    assert sorted(w.name for w, _ in eps) == ["server-1", "server-2"]  # same namespace only
    assert all(dict(ep.ports) == {80: 8080, 9000: 9000} for _, ep in eps)


def test_waypoint_labels():
    st = state(
        [pod("p", labels={"istio.io/use-waypoint": "wp-pod"})],
        services=[
            {
                "name": "a",
                "namespace": "default",
                "vip": "10.96.0.1",
                "ports": [],
                "selector": {},
                "labels": {"istio.io/use-waypoint": "infra/shared"},
            },
            {"name": "b", "namespace": "default", "vip": "10.96.0.2", "ports": [], "selector": {}},
            {
                "name": "c",
                "namespace": "default",
                "vip": "10.96.0.3",
                "ports": [],
                "selector": {},
                "labels": {"istio.io/use-waypoint": "#none"},
            },
        ],
        namespaces={"default": {"labels": {"istio.io/use-waypoint": "ns-wp"}}},
    )
    (w,) = workloads_from_lab_state(st)
    assert w.waypoint == GatewayAddress(NamespacedHostname("default", "wp-pod.default.svc.cluster.local"))
    by_name = {s.name: s for s in services_from_lab_state(st)}
    assert by_name["a"].waypoint.destination == NamespacedHostname("infra", "shared.infra.svc.cluster.local")
    assert by_name["b"].waypoint.destination == NamespacedHostname("default", "ns-wp.default.svc.cluster.local")
    assert by_name["c"].waypoint is None


def test_state_without_optional_keys():
    cs = config_from_lab_state(state([pod("p")]))
    assert len(cs.workloads) == 1 and cs.services == ()
    assert ambient_enrolled({"labels": {}}, {}) is False


def test_bad_state_is_refused_with_a_path():
    with pytest.raises(ConfigError) as info:
        parse_lab_state(json.dumps(state([pod("ok"), pod("bad", ip="10.244.1.300")])))
    assert info.value.path == "pods[1].ip"
    with pytest.raises(ConfigError) as info:
        parse_lab_state(
            json.dumps(state([pod("ok")], services=[{"name": "s", "vip": "10.96.0.1", "ports": [{"port": "http"}]}]))
        )
    assert info.value.path == "services[0].ports[0].port"
    with pytest.raises(ConfigError, match="must be a JSON object"):
        config_from_lab_state([])  # type: ignore[arg-type]


def test_a_real_lab_state_file_feeds_the_store(make_lab):
    """Contract with the lab: the state file it writes becomes the workloads the agent will serve.

    Synchronous on purpose: the lab drives netlink with its own event loop."""
    from mesh.config import lab_state_source
    from mesh.lab.state import state_path

    lab = make_lab(
        {
            "namespaces": {"shop": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
            "nodes": [
                {
                    "name": "node-a",
                    "pods": [
                        {"name": "client", "namespace": "default", "serviceAccount": "sleep", "labels": AMBIENT},
                        {"name": "legacy", "namespace": "default"},
                    ],
                },
                {
                    "name": "node-b",
                    "pods": [
                        {"name": "web", "namespace": "shop", "serviceAccount": "web", "labels": {"app": "web"}},
                    ],
                },
            ],
            "services": [
                {
                    "name": "web",
                    "namespace": "shop",
                    "ports": [{"port": 80, "targetPort": 8080}],
                    "selector": {"app": "web"},
                }
            ],
        }
    )
    store = ConfigStore()
    src = lab_state_source(state_path(lab.name), store)
    assert src.poll() and src.last_error is None
    snap = store.snapshot
    for name, protocol in (("client", Protocol.HBONE), ("legacy", Protocol.TCP), ("web", Protocol.HBONE)):
        p = lab.pod(name)
        w = snap.workload_by_ip(p.ip)
        assert (w.name, w.node, w.protocol) == (name, p.node, protocol)
        assert w.netns == p.netns_path
        assert w.identity == f"spiffe://{lab.state.trust_domain}/ns/{p.namespace}/sa/{p.service_account}"
    (svc,) = snap.services.values()
    assert [w.name for w, _ in snap.ready_endpoints(svc.key)] == ["web"]
    assert dict(svc.ports) == {80: 8080}

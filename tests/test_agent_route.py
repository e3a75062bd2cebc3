"""Outbound routing decisions (agent/proxy/route.py): ztunnel's order, exhaustively, without sockets."""

from __future__ import annotations

import random

from agent.proxy.route import Direct, Hbone, Passthrough, Refuse, plan_outbound
from mesh.config import build_snapshot, parse_local_config

CONFIG = """
workloads:
- {uid: c, name: client, namespace: default, serviceAccount: sleep, workloadIps: [10.244.1.2], protocol: HBONE,
   node: node-a}
- {uid: s1, name: server-1, namespace: default, serviceAccount: httpbin, workloadIps: [10.244.2.2],
   protocol: HBONE, node: node-b, services: {"default/server.default.svc.cluster.local": {80: 8080}}}
- {uid: s2, name: server-2, namespace: default, serviceAccount: httpbin, workloadIps: [10.244.2.3],
   protocol: HBONE, node: node-b, services: {"default/server.default.svc.cluster.local": {80: 8080}}}
- {uid: s3, name: server-3, namespace: default, serviceAccount: httpbin, workloadIps: [10.244.2.4],
   protocol: HBONE, node: node-b, status: Unhealthy,
   services: {"default/server.default.svc.cluster.local": {80: 8080}}}
- {uid: legacy, name: legacy, namespace: default, workloadIps: [10.244.2.9], protocol: TCP, node: node-b,
   services: {"default/legacy.default.svc.cluster.local": {80: 9090}}}
- {uid: wp, name: waypoint, namespace: shop, serviceAccount: waypoint, workloadIps: [10.244.1.9],
   protocol: HBONE, node: node-a, services: {"shop/waypoint.shop.svc.cluster.local": {15008: 15008}}}
- {uid: cart, name: cart, namespace: shop, serviceAccount: cart, workloadIps: [10.244.2.20], protocol: HBONE,
   node: node-b, waypoint: {destination: shop/waypoint.shop.svc.cluster.local},
   services: {"shop/cart.shop.svc.cluster.local": {80: 8080}}}
services:
- {name: server, namespace: default, hostname: server.default.svc.cluster.local, vips: ["/10.96.0.10"],
   ports: {80: 8080}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/extra"]}
- {name: legacy, namespace: default, hostname: legacy.default.svc.cluster.local, vips: ["/10.96.0.11"],
   ports: {80: 9090}}
- {name: waypoint, namespace: shop, hostname: waypoint.shop.svc.cluster.local, vips: ["/10.96.0.20"],
   ports: {15008: 15008}}
- {name: cart, namespace: shop, hostname: cart.shop.svc.cluster.local, vips: ["/10.96.0.30"], ports: {80: 8080},
   waypoint: {destination: shop/waypoint.shop.svc.cluster.local}}
- {name: empty, namespace: default, hostname: empty.default.svc.cluster.local, vips: ["/10.96.0.40"],
   ports: {80: 80}}
"""

SNAP = build_snapshot([("test", parse_local_config(CONFIG))])
CLIENT = SNAP.workload("c")
WAYPOINT = SNAP.workload("wp")


def first(keys):
    return sorted(keys)[0] if keys else None


def test_service_vip_is_balanced_to_a_ready_mesh_endpoint_by_hbone():
    plan = plan_outbound(SNAP, CLIENT, "10.96.0.10", 80, first)
    assert isinstance(plan, Hbone)
    assert plan.dst == ("10.244.2.2", 15008)
    assert plan.authority == "10.244.2.2:8080"  # the target port, not the service port
    assert plan.identities == ("spiffe://cluster.local/ns/default/sa/httpbin",
                               "spiffe://cluster.local/ns/default/sa/extra")
    assert plan.service is not None and plan.service.name == "server" and not plan.via_waypoint


def test_unhealthy_endpoints_are_never_offered():
    seen = set()
    rng = random.Random(0)
    for _ in range(50):
        plan = plan_outbound(SNAP, CLIENT, "10.96.0.10", 80, lambda keys: rng.choice(list(keys)))
        seen.add(plan.workload.uid)
    assert seen == {"s1", "s2"}


def test_service_port_not_declared_is_refused_and_no_endpoints_is_uh():
    assert isinstance(plan_outbound(SNAP, CLIENT, "10.96.0.10", 81, first), Refuse)
    plan = plan_outbound(SNAP, CLIENT, "10.96.0.40", 80, first)
    assert isinstance(plan, Refuse) and plan.flag == "UH"


def test_non_mesh_endpoint_is_plain_tcp_to_the_target_port():
    plan = plan_outbound(SNAP, CLIENT, "10.96.0.11", 80, first)
    assert isinstance(plan, Direct) and plan.dst == ("10.244.2.9", 9090)
    assert isinstance(plan_outbound(SNAP, CLIENT, "10.244.2.9", 9090, first), Direct)


def test_pod_ip_in_mesh_goes_by_hbone_with_its_own_identity():
    plan = plan_outbound(SNAP, CLIENT, "10.244.2.3", 8080, first)
    assert isinstance(plan, Hbone)
    assert (plan.dst, plan.authority) == (("10.244.2.3", 15008), "10.244.2.3:8080")
    assert plan.identities == ("spiffe://cluster.local/ns/default/sa/httpbin",)


def test_service_with_waypoint_goes_to_the_waypoint_with_the_vip_as_authority():
    plan = plan_outbound(SNAP, CLIENT, "10.96.0.30", 80, first)
    assert isinstance(plan, Hbone) and plan.via_waypoint
    assert plan.dst == ("10.244.1.9", 15008)
    assert plan.authority == "10.96.0.30:80"
    assert plan.identities == ("spiffe://cluster.local/ns/shop/sa/waypoint",)


def test_workload_with_waypoint_goes_to_the_waypoint_with_pod_authority():
    plan = plan_outbound(SNAP, CLIENT, "10.244.2.20", 8080, first)
    assert isinstance(plan, Hbone) and plan.via_waypoint and plan.authority == "10.244.2.20:8080"


def test_traffic_from_the_waypoint_itself_goes_to_the_backend():
    plan = plan_outbound(SNAP, WAYPOINT, "10.96.0.30", 80, first)
    assert isinstance(plan, Hbone) and not plan.via_waypoint
    assert plan.dst == ("10.244.2.20", 15008) and plan.authority == "10.244.2.20:8080"
    plan = plan_outbound(SNAP, WAYPOINT, "10.244.2.20", 8080, first)
    assert isinstance(plan, Hbone) and not plan.via_waypoint


def test_unknown_destinations_pass_through_and_capture_ports_are_refused():
    assert plan_outbound(SNAP, CLIENT, "192.0.2.1", 443, first) == Passthrough(("192.0.2.1", 443))
    assert isinstance(plan_outbound(SNAP, CLIENT, "10.244.2.2", 15006, first), Refuse)
    assert isinstance(plan_outbound(SNAP, CLIENT, "10.244.2.2", 15001, first), Refuse)


def test_no_chooser_result_is_refused_not_crashed():
    plan = plan_outbound(SNAP, CLIENT, "10.96.0.10", 80, lambda keys: None)
    assert isinstance(plan, Refuse) and plan.flag == "UH"

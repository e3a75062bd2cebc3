"""The merged mesh state: lookups, endpoints, policy selection, merging sources, change notices."""

from __future__ import annotations

import threading

import pytest

from mesh.authz import policies_for
from mesh.config import ConfigSet, ConfigStore, build_snapshot
from mesh.config.model import (
    Action,
    Authorization,
    HealthPolicy,
    HealthStatus,
    LoadBalancer,
    NetworkAddress,
    NetworkMode,
    Protocol,
    Scope,
    Service,
    Workload,
)


def wl(name, ip, ns="default", labels=None, services=None, status=HealthStatus.HEALTHY, **kw) -> Workload:
    return Workload(
        uid=kw.pop("uid", f"cluster//v1/Pod/{ns}/{name}"),
        name=name,
        namespace=ns,
        workload_ips=(ip,),
        protocol=kw.pop("protocol", Protocol.HBONE),
        labels=labels or {},
        services=services or {},
        status=status,
        **kw,
    )


def svc(name, vip, ns="default", ports=None, **kw) -> Service:
    import ipaddress

    return Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        vips=(NetworkAddress("", ipaddress.ip_address(vip)),),
        ports=ports or {80: 8080},
        **kw,
    )


def pol(name, ns="default", scope=Scope.NAMESPACE, action=Action.ALLOW, selector=None) -> Authorization:
    return Authorization(name, ns, scope, action, rules=((),), selector=selector)


ECHO = "default/echo.default.svc.cluster.local"


def test_lookup_by_ip_uid_vip_and_hostname():
    a = wl("a", "10.0.0.1")
    s = svc("echo", "10.96.0.1")
    snap = build_snapshot([("t", ConfigSet((a,), (s,)))])
    assert snap.workload_by_ip("10.0.0.1") is a and snap.workload(a.uid) is a
    assert snap.service_by_vip("10.96.0.1") is s and snap.service(ECHO) is s
    assert snap.lookup("10.0.0.1") is a and snap.lookup("10.96.0.1") is s
    assert snap.lookup("10.0.0.99") is None
    assert snap.workload_by_ip("10.0.0.1", network="other") is None


def test_an_ip_claimed_twice_prefers_a_pod_in_the_mesh():
    entry = wl("vm", "10.0.0.7", uid="cluster/networking.istio.io/WorkloadEntry/default/vm")
    tcp_pod = wl("tcp", "10.0.0.7", protocol=Protocol.TCP)
    mesh_pod = wl("mesh", "10.0.0.7")
    snap = build_snapshot([("t", ConfigSet((entry, tcp_pod)))])
    assert snap.workload_by_ip("10.0.0.7") is tcp_pod
    snap = build_snapshot([("t", ConfigSet((entry, mesh_pod, tcp_pod)))])
    assert snap.workload_by_ip("10.0.0.7") is mesh_pod


def test_host_network_workloads_are_not_indexed_by_ip():
    h = wl("h", "192.168.1.2", network_mode=NetworkMode.HOST_NETWORK)
    snap = build_snapshot([("t", ConfigSet((h,)))])
    assert snap.workload_by_ip("192.168.1.2") is None and snap.workload(h.uid) is h


def test_endpoints_with_ports_and_health():
    s = svc("echo", "10.96.0.1")
    up = wl("up", "10.0.0.1", services={ECHO: {80: 8080}})
    down = wl("down", "10.0.0.2", services={ECHO: {80: 8081}}, status=HealthStatus.UNHEALTHY)
    other = wl("other", "10.0.0.3")
    snap = build_snapshot([("t", ConfigSet((up, down, other), (s,)))])
    assert {e.workload_uid for e in snap.endpoints(ECHO)} == {up.uid, down.uid}
    assert [(w.name, dict(e.ports)) for w, e in snap.ready_endpoints(ECHO)] == [("up", {80: 8080})]
    allow_all = svc("echo", "10.96.0.1", load_balancer=LoadBalancer(health_policy=HealthPolicy.ALLOW_ALL))
    snap = build_snapshot([("t", ConfigSet((up, down), (allow_all,)))])
    assert {w.name for w, _ in snap.ready_endpoints(ECHO)} == {"up", "down"}
    assert [x.key for x in snap.services_of(up)] == [ECHO]


def test_policies_by_scope_and_selection():
    target = wl("httpbin", "10.0.0.1", labels={"app": "httpbin", "version": "v1"})
    elsewhere = wl("httpbin", "10.0.1.1", ns="prod", labels={"app": "httpbin"})
    policies = (
        pol("ns-wide"),
        pol("other-ns", ns="prod"),
        pol("mesh-wide", ns="istio-system", scope=Scope.GLOBAL),
        pol("sel", scope=Scope.WORKLOAD_SELECTOR, selector={"app": "httpbin"}),
        pol("sel-miss", scope=Scope.WORKLOAD_SELECTOR, selector={"app": "httpbin", "version": "v2"}),
        pol("root-sel", ns="istio-system", scope=Scope.WORKLOAD_SELECTOR, selector={"app": "httpbin"}),
        pol("listed", ns="default", scope=Scope.WORKLOAD_SELECTOR),  # no selector: only when listed
    )
    listed = Workload(**{**target.__dict__, "authorization_policies": ("default/listed", "default/gone")})
    snap = build_snapshot([("t", ConfigSet((listed, elsewhere), (), policies))])
    keys = [p.key for p in policies_for(snap.workload(listed.uid), snap)]
    assert keys == [
        "default/ns-wide",
        "istio-system/mesh-wide",
        "default/listed",
        "default/sel",
        "istio-system/root-sel",
    ]
    keys = {p.key for p in policies_for(snap.workload(elsewhere.uid), snap)}
    assert keys == {"prod/other-ns", "istio-system/mesh-wide", "istio-system/root-sel"}


def test_policies_for_a_workload_not_in_the_snapshot_are_computed():
    snap = build_snapshot([("t", ConfigSet((), (), (pol("sel", scope=Scope.WORKLOAD_SELECTOR, selector={"a": "b"}),)))])
    stranger = wl("s", "10.0.0.9", labels={"a": "b"})
    assert [p.key for p in policies_for(stranger, snap)] == ["default/sel"]


def test_sources_merge_and_each_replaces_only_its_own():
    store = ConfigStore()
    store.replace("lab", ConfigSet((wl("a", "10.0.0.1"), wl("b", "10.0.0.2"))))
    store.replace("file", ConfigSet((), (svc("echo", "10.96.0.1"),), (pol("p"),)))
    snap = store.snapshot
    assert len(snap.workloads) == 2 and ECHO in snap.services and "default/p" in snap.policies
    store.replace("lab", ConfigSet((wl("a", "10.0.0.1"),)))
    snap = store.snapshot
    assert set(snap.workloads) == {"cluster//v1/Pod/default/a"}
    assert ECHO in snap.services  # the file's contribution is untouched
    store.remove("file")
    assert not store.snapshot.services and not store.snapshot.policies


def test_collisions_are_won_by_priority_and_recorded():
    store = ConfigStore()
    store.replace("k8s", ConfigSet((wl("a", "10.0.0.1"),)), priority=10)
    store.replace("file", ConfigSet((wl("a", "10.0.0.99"),)))
    snap = store.snapshot
    assert snap.workload_by_ip("10.0.0.1") is not None and snap.workload_by_ip("10.0.0.99") is None
    assert snap.conflicts == ("workload cluster//v1/Pod/default/a: k8s overrides file",)


def test_snapshot_is_immutable():
    snap = build_snapshot([("t", ConfigSet((wl("a", "10.0.0.1", labels={"x": "y"}),)))])
    with pytest.raises(TypeError):
        snap.workloads["new"] = None  # type: ignore[index]
    w = snap.workload("cluster//v1/Pod/default/a")
    with pytest.raises(TypeError):
        w.labels["x"] = "z"  # type: ignore[index]
    with pytest.raises(AttributeError):
        w.name = "b"  # type: ignore[misc]


def test_subscribers_hear_what_changed():
    store = ConfigStore()
    seen = []
    unsubscribe = store.subscribe(seen.append)
    store.replace("s", ConfigSet((wl("a", "10.0.0.1"),)))
    store.replace("s", ConfigSet((wl("a", "10.0.0.1"),)))  # identical: no change, no notice
    store.replace("p", ConfigSet((), (), (pol("p"),)))
    store.replace("s", ConfigSet((wl("a", "10.0.0.1", labels={"app": "x"}),)))  # labels decide selection
    store.replace("s", ConfigSet((wl("a", "10.0.0.1", labels={"app": "x"}, canonical_revision="v2"),)))
    store.replace("v", ConfigSet((), (svc("echo", "10.96.0.1"),)))
    assert [(c.source, c.workloads_changed, c.services_changed, c.authz_changed) for c in seen] == [
        ("s", True, False, True),
        ("p", False, False, True),
        ("s", True, False, True),
        ("s", True, False, False),
        ("v", False, True, False),
    ]
    assert [c.new.version for c in seen] == [1, 2, 3, 4, 5]
    assert seen[1].old is seen[0].new
    unsubscribe()
    store.remove("v")
    assert len(seen) == 5


def test_a_failing_subscriber_does_not_stop_others_or_the_update(caplog):
    store = ConfigStore()
    got = []

    def broken(change):
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(got.append)
    store.replace("s", ConfigSet((wl("a", "10.0.0.1"),)))
    assert len(got) == 1 and store.snapshot.version == 1
    assert "config subscriber" in caplog.text


def test_concurrent_sources_lose_no_update():
    store = ConfigStore()
    versions = []
    store.subscribe(lambda c: versions.append(c.new.version))

    def feed(source: str) -> None:
        for i in range(50):
            store.replace(source, ConfigSet((wl(f"{source}-{i}", f"10.{len(source)}.{i // 250}.{i % 250 + 1}"),)))

    threads = [threading.Thread(target=feed, args=(f"src{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    snap = store.snapshot
    assert snap.version == 200 and versions == list(range(1, 201))
    assert {w.name for w in snap.workloads.values()} == {f"src{n}-49" for n in range(4)}

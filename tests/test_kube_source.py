"""The Kubernetes config source (agent.kube.source) against the API server double, over real HTTP.

What a user of the agent would notice: the mesh state appears whole (never pods without their policies),
label changes enrol or release pods live, a burst of changes is one rebuild, and after every trouble a
watch meets (dropped connections, 410 Gone, an API server restart that lost its state) the agent holds
exactly what an agent started afresh against the same server holds: equal config dumps.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.kube import load_configuration
from agent.kube.source import Debouncer, KubeSource
from mesh.config import ConfigStore
from mesh.config.model import HealthStatus, Protocol
from mesh.kube.apiserver import RESOURCE_TYPES, ApiServer, Registry, Store
from mesh.kube.apiserver import kinds as k
from mesh.kube.apiserver.controllers import install_controllers
from mesh.kube.kubeconfig import write_kubeconfig

NODE = "node-a"
MERGE = "application/merge-patch+json"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def add_pod(store, name, ip, node=NODE, labels=None, ns="default", sa="default"):
    store.create(k.CORE_PODS, ns, {"metadata": {"name": name, "labels": labels or {"app": name}},
                                   "spec": {"nodeName": node, "serviceAccountName": sa,
                                            "containers": [{"name": "app", "image": "img",
                                                            "ports": [{"name": "http", "containerPort": 8080}]}]}})
    obj = store.get(k.CORE_PODS, ns, name)
    obj["status"] = {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    store.update(k.CORE_PODS, ns, name, obj, subresource="status")


def seed(store, variant="one"):
    store.patch(k.CORE_NAMESPACES, None, "default", MERGE, {"metadata": {"labels": {**AMBIENT,
                                                                                      "istio.io/use-waypoint": "wp"}}})
    add_pod(store, "p1", "10.244.1.11")
    add_pod(store, "p2", "10.244.1.12", labels={"app": "web"} if variant == "one" else {"app": "web", "v": "2"})
    add_pod(store, "remote", "10.244.2.11", node="node-b", labels={"app": "web"}, sa="web")
    if variant == "two":
        store.delete(k.CORE_PODS, "default", "p1")
        add_pod(store, "p4", "10.244.1.14")
    store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "10.96.0.30", "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    store.create(k.AUTHORIZATION_POLICIES, "default", {"metadata": {"name": "allow"}, "spec": {
        "action": "ALLOW" if variant == "one" else "DENY", "selector": {"matchLabels": {"app": "web"}},
        "rules": [{}]}})
    store.create(k.GATEWAYS, "default", {"metadata": {"name": "wp", "labels": {"istio.io/waypoint-for": "service"}},
                                         "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                                             {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})


async def eventually(predicate, timeout=20.0, what="condition"):
    """Wait for `predicate()`; the timeout only guards against a hang, it is not what is tested."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Cluster:
    """A server that tests may restart on the same port; always stopped at the end."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.server: ApiServer | None = None
        self.port = 0
        self.sources: list[KubeSource] = []

    async def start(self, store=None):
        self.server = ApiServer(port=self.port, store=store, bookmark_interval=3600, too_large_wait=0.2)
        await self.server.start()
        self.port = self.server.port
        return self.server

    async def stop(self):
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def source(self, store=None, **kwargs) -> KubeSource:
        kubeconfig = write_kubeconfig(self.tmp_path / "kubeconfig", self.server.url)
        options = {"backoff": (0.05, 0.4), "quiet": 0.05, "max_delay": 0.5, **kwargs}
        src = KubeSource(store or ConfigStore(), await load_configuration(kubeconfig), NODE, **options)
        self.sources.append(src)
        src.start()
        await src.wait_published(timeout=20)
        return src


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path)
    server = await c.start()
    seed(server.store)
    try:
        yield c
    finally:
        for src in c.sources:
            await src.stop()
        await c.stop()


def by_name(snapshot):
    return {w.name: w for w in snapshot.workloads.values()}


async def converges_with_a_fresh_agent(cluster, source):
    """The running source ends up with the dump a source started now against the same server gets."""
    fresh = await cluster.source()
    await eventually(lambda: source.config_dump() == fresh.config_dump(), what="equal config dumps")
    return fresh.config_dump()


def test_debouncer_one_rebuild_per_burst_but_never_starved():
    d = Debouncer(quiet=0.1, max_delay=1.0)
    assert d.due() is None and not d.take(0.0)
    for i in range(100):  # a burst of 100 events within 10 ms
        d.poke(5.0 + i * 0.0001)
    assert not d.take(5.05), "still inside the quiet time"
    assert d.take(5.2) and not d.take(5.3), "one rebuild for the whole burst"
    for i in range(50):  # a steady stream, one event every 50 ms, never quiet for 100 ms
        d.poke(10.0 + i * 0.05)
        if d.take(10.0 + i * 0.05):
            break
    else:
        pytest.fail("a steady stream must still cause a rebuild")
    assert i * 0.05 >= 1.0 - 1e-9, "the first rebuild comes at max_delay, not before"
    with pytest.raises(ValueError):
        Debouncer(quiet=1.0, max_delay=0.5)


async def test_the_first_state_is_whole_and_includes_remote_pods(cluster, tmp_path):
    store = ConfigStore()
    changes = []
    store.subscribe(changes.append)
    source = await cluster.source(store)
    first = changes[0].new
    assert sorted(by_name(first)) == ["p1", "p2", "remote"], "pods of every node"
    assert "default/allow" in first.policies, "policies arrive with the pods, never after them"
    assert len(changes) == 1, "the initial list is one snapshot, not one per object"
    w = by_name(store.snapshot)
    assert w["remote"].node == "node-b" and w["remote"].identity == "spiffe://cluster.local/ns/default/sa/web"
    assert all(wl.protocol is Protocol.HBONE for wl in w.values())
    web = store.snapshot.service("default/web.default.svc.cluster.local")
    assert web is not None and str(web.vips[0].address) == "10.96.0.30"
    assert web.waypoint is not None and web.waypoint.destination.hostname == "wp.default.svc.cluster.local"
    assert {wl.name for wl, ep in store.snapshot.ready_endpoints(web.key)} == {"p2", "remote"}
    assert dict(w["p2"].services[web.key]) == {80: 8080}, "the named target port, resolved on the pod"
    assert sorted(wl.name for wl in source.local_workloads()) == ["p1", "p2"]
    assert sorted(wl.name for wl in source.captured_workloads()) == ["p1", "p2"]
    dump = source.config_dump()
    assert [d["name"] for d in dump["workloads"]] == ["p1", "p2", "remote"]
    assert dump["waypoints"]["default/wp"]["for"] == "service"
    pod_list = [r for r in cluster.server.requests if r.verb == "list" and r.path.endswith("/pods")]
    assert pod_list and "fieldSelector" not in pod_list[0].query, "one cluster-wide pod watch"


async def test_label_changes_enrol_and_release_pods_live(cluster):
    source = await cluster.source()
    store, api = source.store, cluster.server.store

    def protocol(name):
        wl = by_name(store.snapshot).get(name)
        return wl.protocol if wl else None

    api.patch(k.CORE_PODS, "default", "p1", MERGE, {"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}})
    await eventually(lambda: protocol("p1") is Protocol.TCP, what="p1 opted out")
    assert [w.name for w in source.captured_workloads()] == ["p2"]
    api.patch(k.CORE_NAMESPACES, None, "default", MERGE, {"metadata": {"labels": {"istio.io/dataplane-mode": None}}})
    await eventually(lambda: protocol("p2") is Protocol.TCP and protocol("remote") is Protocol.TCP,
                     what="the namespace released")
    api.patch(k.CORE_PODS, "default", "p2", MERGE, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    await eventually(lambda: protocol("p2") is Protocol.HBONE, what="p2 enrolled by its own label")
    assert protocol("p1") is Protocol.TCP
    obj = api.get(k.CORE_PODS, "default", "p2")
    obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    api.update(k.CORE_PODS, "default", "p2", obj, subresource="status")
    await eventually(lambda: by_name(store.snapshot)["p2"].status is HealthStatus.UNHEALTHY, what="p2 unready")
    api.delete(k.CORE_PODS, "default", "p2")
    add_pod(api, "p2", "10.244.2.12", node="node-b", labels={"app": "web", **AMBIENT})
    await eventually(lambda: by_name(store.snapshot).get("p2") is not None
                     and by_name(store.snapshot)["p2"].node == "node-b", what="p2 moved")
    assert [w.name for w in source.local_workloads()] == ["p1"], "a pod that moved away is no longer local"


async def test_a_burst_of_events_causes_few_rebuilds(cluster):
    source = await cluster.source(quiet=0.3, max_delay=3.0)
    before_rebuilds, before_events = source.rebuilds, source.events
    version = source.store.snapshot.version
    for i in range(30):
        add_pod(cluster.server.store, f"burst-{i}", f"10.244.1.{100 + i}", labels={"app": "web"})
    await eventually(lambda: len(source.store.snapshot.workloads) == 33, what="all 30 pods")
    events = source.events - before_events
    rebuilds = source.rebuilds - before_rebuilds
    assert events >= 60, "each pod is created, then gets its status; the slice changes too"
    assert rebuilds <= 3, f"{events} events caused {rebuilds} rebuilds"
    assert source.store.snapshot.version - version == rebuilds


async def test_a_dropped_watch_converges(cluster):
    source = await cluster.source()
    server = cluster.server
    for round_ in range(2):
        assert server.drop_watches(abort=True) >= 6
        add_pod(server.store, f"new-{round_}", f"10.244.1.{50 + round_}")
        server.store.patch(k.CORE_PODS, "default", "p1", MERGE, {"metadata": {"labels": {"gen": str(round_)}}})
        await eventually(lambda r=round_: f"new-{r}" in by_name(source.store.snapshot), what="events after the drop")
    dump = await converges_with_a_fresh_agent(cluster, source)
    assert {"new-0", "new-1"} <= {w["name"] for w in dump["workloads"]}
    assert all(i.lists == 1 for i in source.watch.informers.values()), "resumed, never re-listed"


async def test_410_gone_converges(cluster):
    source = await cluster.source()
    server, store = cluster.server, cluster.server.store
    server.refuse_watches = True
    server.drop_watches(abort=False)
    store.delete(k.CORE_PODS, "default", "p1")
    add_pod(store, "p3", "10.244.1.13")
    store.patch(k.AUTHORIZATION_POLICIES, "default", "allow", MERGE, {"spec": {"action": "DENY"}})
    store.patch(k.CORE_NAMESPACES, None, "default", MERGE, {"metadata": {"labels": {"istio.io/use-waypoint": None}}})
    store.compact()
    await eventually(lambda: "503" in (source.watch.informers["Pod"].last_error or ""), what="a refused watch")
    server.refuse_watches = False
    dump = await converges_with_a_fresh_agent(cluster, source)
    assert sorted(w["name"] for w in dump["workloads"]) == ["p2", "p3", "remote"]
    assert [p["action"] for p in dump["policies"]] == ["Deny"]
    assert all("waypoint" not in s for s in dump["services"])
    assert source.watch.informers["Pod"].lists == 2, "410 Gone: listed again"


@pytest.mark.parametrize("versions", ["fresh", "reset"])
async def test_an_api_server_restart_that_lost_its_state_converges(cluster, versions):
    source = await cluster.source()
    before = source.config_dump()
    await cluster.stop()
    await eventually(lambda: source.watch.informers["Pod"].last_error is not None, what="the watch noticing")
    assert source.config_dump() == before, "while the server is away the last state stays in force"
    store = Store(start_rv=1 if versions == "reset" else None)
    install_controllers(store)
    seed(store, variant="two")
    await cluster.start(store=store)
    dump = await converges_with_a_fresh_agent(cluster, source)
    assert all(i.lists >= 2 for i in source.watch.informers.values()), "every kind listed again"
    assert sorted(w["name"] for w in dump["workloads"]) == ["p2", "p4", "remote"]
    assert [p["action"] for p in dump["policies"]] == ["Deny"]
    add_pod(cluster.server.store, "p5", "10.244.1.15")
    await eventually(lambda: "p5" in by_name(source.store.snapshot), what="live events after the restart")


async def test_a_malformed_object_is_logged_and_skipped_never_fatal(cluster, caplog):
    caplog.set_level(logging.WARNING, logger="agent.kube")
    source = await cluster.source()
    store = cluster.server.store
    store.create(k.GATEWAYS, "default", {"metadata": {"name": "odd", "labels": {"istio.io/waypoint-for": "everyone"}},
                                         "spec": {"gatewayClassName": "istio-waypoint", "listeners": []}})
    store.create(k.AUTHORIZATION_POLICIES, "default", {"metadata": {"name": "typo"}, "spec": {"action": "ALOW"}})
    store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "named"}, "spec": {
        "selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": "Bad_Name"}]}})
    add_pod(store, "after", "10.244.1.40")
    await eventually(lambda: "after" in by_name(source.store.snapshot), what="later events")
    skipped = source.status()["skipped"]
    assert any("Gateway default/odd" in s and "istio.io/waypoint-for" in s for s in skipped)
    assert any("AuthorizationPolicy default/typo: spec.action" in s for s in skipped)
    assert any("Service default/named: spec.ports[0].targetPort" in s for s in skipped)
    assert "AuthorizationPolicy default/typo: spec.action" in caplog.text
    assert caplog.text.count("default/typo") == 1, "logged once, not on every rebuild"
    assert "default/allow" in source.store.snapshot.policies, "the rest of the state is untouched"


async def test_a_kind_the_server_does_not_serve_does_not_hold_up_the_agent(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="agent.kube")
    registry = Registry(tuple(t for t in RESOURCE_TYPES if t.group != k.GATEWAY_API))
    server = ApiServer(store=Store(registry=registry), bookmark_interval=3600)
    await server.start()
    source = None
    try:
        add_pod(server.store, "p1", "10.244.1.11")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        source = KubeSource(ConfigStore(), await load_configuration(kubeconfig), NODE, backoff=(0.05, 0.2))
        source.start()
        await source.wait_published(timeout=20)
        assert "p1" in by_name(source.store.snapshot)
        assert "does not serve Gateway" in caplog.text
        assert source.status()["synced"]["Gateway"] is False
    finally:
        if source is not None:
            await source.stop()
        await server.stop()

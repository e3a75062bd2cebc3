"""The agent's watch layer against the API server double, over real HTTP with kubernetes-asyncio.

Every trouble a watch meets in a cluster is caused for real: watches cut server-side, history compacted
(410 Gone), the server restarted on the same port with its state lost (with fresh or with reset
resourceVersions), malformed objects and lines, bad credentials. The watch must converge each time: its
dump equals what the server holds.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.kube import MESH_KINDS, KubeWatch, dump_object, in_cluster_configuration, load_configuration
from mesh.kube.apiserver import ApiServer, Store, UserInfo
from mesh.kube.apiserver import kinds as k
from mesh.kube.apiserver.controllers import install_controllers
from mesh.kube.kubeconfig import write_kubeconfig

NODE = "node-a"
MERGE = "application/merge-patch+json"


def pod(name, node=NODE, labels=None, ip=None):
    return {"metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "img"}]}}


def add_pod(store, name, ip, node=NODE, labels=None, ns="default"):
    store.create(k.CORE_PODS, ns, pod(name, node, labels))
    obj = store.get(k.CORE_PODS, ns, name)
    obj["status"] = {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    store.update(k.CORE_PODS, ns, name, obj, subresource="status")


def seed(store, variant="one"):
    store.patch(k.CORE_NAMESPACES, None, "default", MERGE,
                {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    add_pod(store, "p1", "10.244.1.11")
    add_pod(store, "p2", "10.244.1.12", labels={"app": "web"} if variant == "one" else {"app": "web", "v": "2"})
    add_pod(store, "remote", "10.244.2.11", node="node-b", labels={"app": "web"})
    if variant == "two":
        store.delete(k.CORE_PODS, "default", "p1")
        add_pod(store, "p4", "10.244.1.14")
    store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "10.96.0.30", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}})
    store.create(k.AUTHORIZATION_POLICIES, "default", {"metadata": {"name": "allow"}, "spec": {
        "action": "ALLOW" if variant == "one" else "DENY", "selector": {"matchLabels": {"app": "web"}}}})
    store.create(k.GATEWAYS, "default", {"metadata": {"name": "waypoint", "labels": {
        "istio.io/waypoint-for": "service"}}, "spec": {"gatewayClassName": "istio-waypoint",
                                                       "listeners": [{"name": "mesh", "port": 15008,
                                                                      "protocol": "HBONE"}]}})


def expected_dump(store, node=NODE):
    """What a correct watch holds: the store's well-formed objects, this node's pods only."""
    out = {}
    for kind in MESH_KINDS:
        rtype = store.registry.lookup(kind.group, kind.version, kind.plural)
        objs = {}
        for _, obj in store.items(rtype):
            if kind.problem(obj) or (kind.node_scoped and obj["spec"].get("nodeName") != node):
                continue
            objs[kind.key(obj)] = dump_object(obj)
        out[kind.name] = dict(sorted(objs.items()))
    return dict(sorted(out.items()))


async def eventually(predicate, timeout=20.0, what="condition"):
    """Wait for `predicate()`; the timeout only guards against a hang, it is not what is tested."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind, key=None):
        return [e.type.value for e in self.events if e.kind == kind and (key is None or e.key == key)]

    def clear(self):
        self.events.clear()


class Cluster:
    """A server that tests may restart on the same port; always stopped at the end."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.server: ApiServer | None = None
        self.port = 0

    async def start(self, store=None, **kwargs):
        self.server = ApiServer(port=self.port, store=store, bookmark_interval=3600, too_large_wait=0.2, **kwargs)
        await self.server.start()
        self.port = self.server.port
        return self.server

    async def stop(self):
        if self.server is not None:
            await self.server.stop()
            self.server = None


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path)
    server = await c.start()
    seed(server.store)
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def watch(cluster, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.server.url)
    recorder = Recorder()
    w = KubeWatch(await load_configuration(kubeconfig), NODE, default_handler=recorder, backoff=(0.05, 0.4))
    w.recorder = recorder
    w.start()
    try:
        await w.wait_synced(timeout=20)
        await eventually(lambda: cluster.server.open_watches == len(MESH_KINDS), what="watches open")
        yield w
    finally:
        await w.stop()


def requests_for(server, verb, plural="pods"):
    return [r for r in server.requests if r.verb == verb and r.path.endswith(f"/{plural}")]


async def test_initial_list_then_live_events_for_this_node_only(cluster, watch):
    server = cluster.server
    rec = watch.recorder
    assert watch.dump() == expected_dump(server.store)
    assert sorted(watch.objects("Pod")) == ["default/p1", "default/p2"], "only this node's pods"
    assert rec.of("Gateway") == ["ADDED"] and rec.of("AuthorizationPolicy") == ["ADDED"]
    (pod_list,) = requests_for(server, "list")
    assert pod_list.query["fieldSelector"] == f"spec.nodeName={NODE}"
    rec.clear()

    store = server.store
    add_pod(store, "p3", "10.244.1.13")
    add_pod(store, "elsewhere", "10.244.2.13", node="node-b")
    store.patch(k.CORE_NAMESPACES, None, "default", MERGE, {"metadata": {"labels": {"istio.io/dataplane-mode": None}}})
    store.patch(k.AUTHORIZATION_POLICIES, "default", "allow", MERGE, {"spec": {"action": "DENY"}})
    store.delete(k.CORE_SERVICES, "default", "web")
    await eventually(lambda: watch.dump() == expected_dump(store), what="convergence")
    assert rec.of("Pod", "default/p3") == ["ADDED", "MODIFIED"], "created Pending, then Running with an IP"
    assert rec.of("Pod", "default/elsewhere") == []
    (ns_event,) = [e for e in rec.events if e.kind == "Namespace"]
    assert ns_event.old["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    assert "istio.io/dataplane-mode" not in ns_event.obj["metadata"]["labels"]
    assert rec.of("AuthorizationPolicy") == ["MODIFIED"]
    assert rec.of("Service") == ["DELETED"] and rec.of("EndpointSlice")[-1] == "DELETED"
    assert watch.informers["Pod"].lists == 1


async def test_bookmarks_move_the_resume_point(cluster, watch):
    server = cluster.server
    informer = watch.informers["Pod"]
    server.store.create(k.CORE_SERVICEACCOUNTS, "default", {"metadata": {"name": "unrelated"}})
    target = str(server.store.rv)
    assert informer.resource_version != target
    await eventually(lambda: server.open_watches == len(MESH_KINDS), what="watches open")
    server.send_bookmarks()
    await eventually(lambda: informer.resource_version == target, what="the bookmark")
    server.drop_watches(abort=True)
    await eventually(lambda: any(r.query.get("resourceVersion") == target for r in requests_for(server, "watch")),
                     what="a watch resumed from the bookmark")
    assert informer.lists == 1, "resuming from a bookmark needs no list"


async def test_a_dropped_watch_resumes_without_loss_or_duplicates(cluster, watch):
    server = cluster.server
    rec = watch.recorder
    rec.clear()
    for _ in range(2):
        assert server.drop_watches(abort=True) == len(MESH_KINDS)
        add_pod(server.store, "p9", "10.244.1.19")
        server.store.delete(k.CORE_PODS, "default", "p9")
        server.store.patch(k.CORE_PODS, "default", "p1", MERGE, {"metadata": {"labels": {"gen": str(_)}}})
        await eventually(lambda: watch.dump() == expected_dump(server.store), what="convergence")
        await eventually(lambda: server.open_watches == len(MESH_KINDS), what="all watches back")
    assert rec.of("Pod", "default/p9") == ["ADDED", "MODIFIED", "DELETED"] * 2
    assert rec.of("Pod", "default/p1") == ["MODIFIED", "MODIFIED"]
    assert all(i.lists == 1 for i in watch.informers.values()), "a resumable watch is never re-listed"


async def test_410_gone_relists_and_emits_the_difference(cluster, watch):
    server = cluster.server
    store = server.store
    rec = watch.recorder
    rec.clear()
    server.refuse_watches = True
    server.drop_watches(abort=False)
    store.delete(k.CORE_PODS, "default", "p1")
    store.patch(k.CORE_PODS, "default", "p2", MERGE, {"metadata": {"labels": {"v": "2"}}})
    add_pod(store, "p3", "10.244.1.13")
    store.patch(k.GATEWAYS, "default", "waypoint", MERGE, {"metadata": {"labels": {"istio.io/waypoint-for": "all"}}})
    store.compact()
    await eventually(lambda: "503" in (watch.informers["Pod"].last_error or ""), what="a refused watch")
    server.refuse_watches = False
    await eventually(lambda: watch.dump() == expected_dump(store), what="convergence")
    assert rec.of("Pod", "default/p1") == ["DELETED"]
    assert rec.of("Pod", "default/p2") == ["MODIFIED"]
    assert rec.of("Pod", "default/p3") == ["ADDED"], "the re-list shows the pod as it is now, not its history"
    assert rec.of("Gateway") == ["MODIFIED"]
    assert watch.informers["Pod"].lists == 2 and watch.informers["Gateway"].lists == 2
    assert rec.of("Service") == [], "unchanged objects make no event on a re-list"


@pytest.mark.parametrize("versions", ["fresh", "reset"])
async def test_server_restart_with_lost_state_converges(cluster, watch, versions):
    rec = watch.recorder
    await cluster.stop()
    await eventually(lambda: watch.informers["Pod"].last_error is not None, what="the watch noticing")
    rec.clear()
    store = Store(start_rv=1 if versions == "reset" else None)
    install_controllers(store)  # the server would install them too; seeding needs them first
    seed(store, variant="two")
    server = await cluster.start(store=store)
    if versions == "reset":
        assert server.store.rv < int(watch.informers["Pod"].resource_version)
    await eventually(lambda: all(i.lists == 2 for i in watch.informers.values()), what="every kind listed again")
    await eventually(lambda: watch.dump() == expected_dump(server.store), what="convergence after the restart")
    assert rec.of("Pod", "default/p1") == ["DELETED"] and rec.of("Pod", "default/p4") == ["ADDED"]
    assert rec.of("Pod", "default/p2") == ["MODIFIED"]
    assert rec.of("AuthorizationPolicy") == ["MODIFIED"]
    add_pod(server.store, "p5", "10.244.1.15")
    await eventually(lambda: "default/p5" in watch.objects("Pod"), what="live events after the restart")


async def test_malformed_objects_and_lines_are_logged_and_skipped(cluster, tmp_path, caplog):
    server = cluster.server
    store = server.store
    bad_ip = pod("bad-ip")
    bad_ip["metadata"].update(namespace="default", resourceVersion="1")
    bad_ip["status"] = {"podIP": "not-an-ip"}
    store.inject_raw(k.CORE_PODS, "default", "bad-ip", bad_ip)
    store.inject_raw(k.CORE_NAMESPACES, "", "junk", "just a string")
    caplog.set_level(logging.WARNING, logger="agent.kube")
    recorder = Recorder()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    async with KubeWatch(await load_configuration(kubeconfig), NODE, default_handler=recorder,
                         backoff=(0.05, 0.4)) as w:
        await w.wait_synced(timeout=20)
        assert "default/bad-ip" not in w.objects("Pod") and "default/p1" in w.objects("Pod")
        assert "status.podIP: 'not-an-ip' is not an IP address" in caplog.text
        assert "expected an object, got str" in caplog.text

        await eventually(lambda: server.open_watches == len(MESH_KINDS), what="watches open")
        server.inject_watch_line(b"{this is not json\n")
        server.inject_watch_line(b'{"kind": "no type"}\n')
        server.inject_watch_line(b'{"type": "WHATEVER", "object": {}}\n')
        no_name = {"metadata": {"namespace": "default"}, "spec": {"nodeName": NODE}}
        store.inject_raw(k.CORE_PODS, "default", "noname", no_name)
        add_pod(store, "after", "10.244.1.30")
        await eventually(lambda: "default/after" in w.objects("Pod"), what="events after the garbage")
        assert "not JSON" in caplog.text and "not a watch event" in caplog.text
        assert "unknown event type 'WHATEVER'" in caplog.text
        assert "metadata.name: missing or not a string" in caplog.text
        assert w.informers["Pod"].lists == 1, "garbage is skipped, not a reason to start over"
        assert "default/bad-ip" not in [e.key for e in recorder.events]


async def test_a_failing_handler_does_not_stop_the_watch(cluster, tmp_path, caplog):
    server = cluster.server
    seen = []

    def flaky(event):
        if event.key == "default/p1":
            raise RuntimeError("handler bug")
        seen.append(event.key)

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    async with KubeWatch(await load_configuration(kubeconfig), NODE, handlers={"Pod": flaky}) as w:
        await w.wait_synced(timeout=20)
        add_pod(server.store, "p7", "10.244.1.17")
        await eventually(lambda: "default/p7" in seen, what="later events")
    assert "handler bug" in caplog.text and "default/p2" in seen


def _tls_material(tmp_path):
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: tmp_path / name for name in ("ca.crt", "tls.crt", "tls.key")}
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["tls.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["tls.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    paths["tls.key"].chmod(0o600)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(paths["tls.crt"], paths["tls.key"])
    return ctx, paths


async def test_in_cluster_config_over_https_with_a_service_account_token(tmp_path):
    ctx, paths = _tls_material(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("agent-token")
    token_file.chmod(0o600)
    server = ApiServer(ssl_context=ctx, require_auth=True, bookmark_interval=3600,
                       tokens={"other-token": UserInfo("someone")})
    await server.start()
    seed(server.store)
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    try:
        cfg = in_cluster_configuration(env, token_file=str(token_file), ca_file=str(paths["ca.crt"]))
        assert cfg.host == f"https://127.0.0.1:{server.port}"
        async with KubeWatch(cfg, NODE, backoff=(0.05, 0.4)) as w:
            await eventually(lambda: "401" in (w.informers["Pod"].last_error or ""), what="the refusal")
            assert not w.synced, "an unknown token gets nothing"
            server.add_token("agent-token", UserInfo("system:serviceaccount:istio-system:ztunnel"))
            await w.wait_synced(timeout=20)
            assert w.dump() == expected_dump(server.store)
    finally:
        await server.stop()

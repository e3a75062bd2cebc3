"""Enrolment pieces of the Kubernetes mode: finding a pod's namespace from /proc by its IP, the
`ambient.istio.io/redirection` annotation, and the rules deciding who is captured.

The namespace finder runs against real network namespaces made here: a "node" with veths to its pods,
and a second, unrelated namespace holding the same pod IP, as another lab or runtime on the same machine
would; the finder must pick this node's pod and refuse to guess between two. The annotator writes to the
API server double over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import subprocess
import time

import pytest
from pyroute2 import NetNS, netns

from agent.kube.annotate import REDIRECTION_ANNOTATION, PodApi, RedirectionAnnotator, redirection_patch
from agent.kube.enrol import as_running, not_enrolled_reason
from agent.kube.podnetns import NetnsFinder, NetnsNotFound, parse_fib_trie, parse_if_inet6
from mesh.kube.apiserver import ApiServer
from mesh.kube.apiserver import kinds as k
from mesh.netns import NetnsWorker

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.1
           /32 link UNICAST
        |-- 10.244.1.7
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.7
        /32 host LOCAL
     |-- 192.168.9.4
        /24 link UNICAST
        /32 host LOCAL
"""
IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000007 02 80 00 80     eth0
fe800000000000000000000000000001 02 40 20 80     eth0
"""


def test_local_addresses_are_read_from_proc_net_text():
    assert parse_fib_trie(FIB_TRIE) == {ipaddress.ip_address("10.244.1.7"), ipaddress.ip_address("192.168.9.4")}
    assert parse_if_inet6(IF_INET6) == {ipaddress.ip_address("fd00::7")}
    assert parse_fib_trie("garbage\n|-- not-an-ip\n  /32 host LOCAL\n") == set()


@pytest.fixture
def nets(require_root):
    """node (two pods with veths, one pause process each) + a stranger namespace holding pod-a's IP."""
    tag = secrets.token_hex(3)
    names = {r: f"nm-e{tag}-{r}" for r in ("node", "pa", "pb", "stranger", "twin")}
    procs: list[subprocess.Popen] = []

    def pause(ns: str) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
        procs.append(p)
        return p

    try:
        for ns in names.values():
            netns.create(ns)
        with NetNS(names["node"]) as n:
            for i, (pod, ip) in enumerate((("pa", "10.77.0.2"), ("pb", "10.77.0.3"))):
                n.link("add", ifname=f"v{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": names[pod]})
                with NetNS(names[pod]) as p:
                    eth = p.link_lookup(ifname="eth0")[0]
                    p.addr("add", index=eth, address=ip, prefixlen=32)
                    p.link("set", index=eth, state="up")
        with NetNS(names["stranger"]) as s:
            s.link("add", ifname="x0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": names["twin"]})
        with NetNS(names["twin"]) as t:  # same address as pa, but paired with the stranger, not the node
            eth = t.link_lookup(ifname="eth0")[0]
            t.addr("add", index=eth, address="10.77.0.2", prefixlen=32)
            t.link("set", index=eth, state="up")
        sandboxes = {role: pause(names[role]) for role in ("pa", "twin")}
        time.sleep(0.2)
        yield names, pause, sandboxes
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in names.values():
            with contextlib.suppress(OSError):
                netns.remove(ns)


def find_from(node_ns: str, ip: str, finder: NetnsFinder | None = None):
    """Run the finder the way the agent does: from a thread in the node's namespace."""
    finder = finder or NetnsFinder()
    with NetnsWorker(f"/run/netns/{node_ns}") as w:
        try:
            return w.run(finder.find, ip)
        except NetnsNotFound as e:
            return e


def test_finds_this_nodes_pod_by_ip_and_not_a_stranger_with_the_same_ip(nets):
    names, _, _ = nets
    found = find_from(names["node"], "10.77.0.2")
    assert not isinstance(found, Exception), found
    assert found.inode == os.stat(f"/run/netns/{names['pa']}").st_ino
    assert found.path == f"/proc/{found.pid}/ns/net"
    # From the stranger's side, the same address is its own pod, not the node's.
    other = find_from(names["stranger"], "10.77.0.2")
    assert other.inode == os.stat(f"/run/netns/{names['twin']}").st_ino


def test_a_pod_without_a_running_sandbox_is_not_found_until_it_runs(nets):
    names, pause, _ = nets
    missing = find_from(names["node"], "10.77.0.3")
    assert isinstance(missing, NetnsNotFound) and "sandbox is not running" in str(missing)
    pause(names["pb"])
    time.sleep(0.1)
    found = find_from(names["node"], "10.77.0.3")
    assert found.inode == os.stat(f"/run/netns/{names['pb']}").st_ino


def test_an_address_of_another_node_only_is_refused(nets):
    names, _, _ = nets
    res = find_from(names["node"], "10.77.0.9")
    assert isinstance(res, NetnsNotFound) and "no process" in str(res)
    # From a namespace with no links to judge by, two namespaces holding the address are ambiguous.
    lone = f"nm-e{secrets.token_hex(3)}-lone"
    netns.create(lone)
    try:
        res = find_from(lone, "10.77.0.2")
        assert isinstance(res, NetnsNotFound) and "refusing to guess" in str(res)
    finally:
        netns.remove(lone)


def test_cached_namespace_is_rechecked_and_a_recreated_pod_found_again(nets):
    names, pause, sandboxes = nets
    finder = NetnsFinder()
    first = find_from(names["node"], "10.77.0.2", finder)
    scans = finder.scans
    assert find_from(names["node"], "10.77.0.2", finder) == first and finder.scans == scans  # from the cache
    # The pod's sandbox process is replaced (a restarted pause): the cached pid is gone, a new scan finds it.
    sandboxes["pa"].kill()
    sandboxes["pa"].wait()
    pause(names["pa"])
    time.sleep(0.1)
    again = find_from(names["node"], "10.77.0.2", finder)
    assert again.inode == first.inode and again.pid != first.pid and finder.scans == scans + 1


# --- who is captured ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("labels", "annotations", "ns_labels", "spec", "reason"), [
    ({}, {}, {"istio.io/dataplane-mode": "ambient"}, {}, ""),
    ({"istio.io/dataplane-mode": "ambient"}, {}, {}, {}, ""),
    ({"istio.io/dataplane-mode": "none"}, {}, {"istio.io/dataplane-mode": "ambient"}, {}, "opted out"),
    ({}, {"sidecar.istio.io/status": "{}"}, {"istio.io/dataplane-mode": "ambient"}, {}, "sidecar"),
    ({}, {}, {"istio.io/dataplane-mode": "ambient"}, {"hostNetwork": True}, "host network"),
    ({"networking.istio.io/tunnel": "http"}, {}, {"istio.io/dataplane-mode": "ambient"}, {}, "HBONE itself"),
    ({}, {}, {}, {}, "neither the pod nor its namespace"),
])
def test_enrolment_reasons_are_istios_rules(labels, annotations, ns_labels, spec, reason):
    pod = {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}
    got = not_enrolled_reason(pod, ns_labels)
    assert (got == "") if not reason else (reason in got)


def test_a_pod_announced_by_cni_is_seen_as_it_will_run():
    pending = {"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}
    running = as_running(pending, ["10.244.1.9"])
    assert running["status"]["phase"] == "Running" and running["status"]["podIPs"] == [{"ip": "10.244.1.9"}]
    assert pending["status"] == {"phase": "Pending"}  # the watch cache's object is not touched


# --- the annotation ---------------------------------------------------------------------------------------------


async def test_annotation_follows_capture_and_survives_a_vanished_pod(tmp_path):
    from agent.kube import load_configuration
    from mesh.kube.kubeconfig import write_kubeconfig

    async with ApiServer("127.0.0.1", 0) as server:
        store = server.store
        store.create(k.CORE_PODS, "default", {"metadata": {"name": "web", "annotations": {"keep": "me"}},
                                              "spec": {"containers": [{"name": "a", "image": "i"}]}})
        cfg = await load_configuration(write_kubeconfig(tmp_path / "kc", server.url))
        api = PodApi(cfg)
        annotator = RedirectionAnnotator(api, lambda ns, name: store.peek(k.CORE_PODS, ns, name))
        annotator.start()
        try:
            def annotations():
                return store.get(k.CORE_PODS, "default", "web")["metadata"].get("annotations") or {}

            async def until(pred):
                for _ in range(200):
                    if pred():
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("annotation never reached the wanted state")

            annotator.want("default", "web", True)
            await until(lambda: annotations().get(REDIRECTION_ANNOTATION) == "enabled")
            assert annotations()["keep"] == "me"
            patches = annotator.patches
            annotator.want("default", "web", True)  # already so: no write
            await asyncio.sleep(0.1)
            assert annotator.patches == patches
            annotator.want("default", "web", False)
            await until(lambda: REDIRECTION_ANNOTATION not in annotations())
            annotator.want("default", "gone", True)  # 404: dropped quietly, the task carries on
            annotator.want("default", "web", True)
            await until(lambda: annotations().get(REDIRECTION_ANNOTATION) == "enabled")
            assert not annotator.pending()
        finally:
            await annotator.stop()
            await api.close()


def test_patch_sets_or_removes_only_the_annotation():
    assert redirection_patch(True) == {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}
    assert redirection_patch(False) == {"metadata": {"annotations": {REDIRECTION_ANNOTATION: None}}}


# --- a pod announced by the CNI plugin, decided against the API server double --------------------------------


@pytest.fixture
async def enrolment(tmp_path):
    from agent.kube import load_configuration
    from agent.kube.enrol import KubeEnrolment
    from agent.kube.source import KubeSource
    from mesh.config import ConfigStore
    from mesh.kube.kubeconfig import write_kubeconfig

    async with ApiServer("127.0.0.1", 0) as server:
        store = server.store
        store.create(k.CORE_NAMESPACES, None, {"metadata": {"name": "shop"}})
        cfg = await load_configuration(write_kubeconfig(tmp_path / "kc", server.url))
        source = KubeSource(ConfigStore(), cfg, "node-a", backoff=(0.05, 0.2), quiet=0.02, max_delay=0.2)
        source.start()
        api = PodApi(cfg)
        try:
            await source.wait_published(timeout=20)
            yield server, source, KubeEnrolment(source, NetnsFinder(), api, "node-a")
        finally:
            await source.stop()
            await api.close()


def _pending_pod(store, name, ns="shop", node="node-a", labels=None):
    return store.create(k.CORE_PODS, ns, {"metadata": {"name": name, "labels": labels or {"app": name}},
                                          "spec": {"nodeName": node, "serviceAccountName": "buyer",
                                                   "containers": [{"name": "a", "image": "i"}]}})


async def test_a_label_set_just_before_the_pod_counts_even_if_the_watch_lags(enrolment):
    server, _, enrol = enrolment
    server.refuse_watches = True
    server.drop_watches()  # from now on the agent's watch delivers nothing
    server.store.patch(k.CORE_NAMESPACES, None, "shop", "application/merge-patch+json",
                       {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    pod = _pending_pod(server.store, "cart")
    assert enrol.raw_pod("shop", "cart") is None and "istio.io/dataplane-mode" not in enrol.namespace_labels("shop")
    fresh_pod, fresh_ns = await enrol.fetch("shop", "cart", pod["metadata"]["uid"], time.monotonic() + 5)
    workload, reason = enrol.decide(fresh_pod, ["10.244.1.30"], fresh_ns)
    assert reason == "" and workload is not None
    assert workload.uid == "Kubernetes//Pod/shop/cart" and workload.identity.endswith("/ns/shop/sa/buyer")
    assert [str(ip) for ip in workload.workload_ips] == ["10.244.1.30"]
    with pytest.raises(Exception, match="cannot be read"):  # another pod of the same name: refused
        await enrol.fetch("shop", "cart", "some-other-uid", time.monotonic() + 0.3)


async def test_a_pod_scheduled_elsewhere_or_opted_out_is_not_captured(enrolment):
    from agent.kube.enrol import EnrolmentError

    server, _, enrol = enrolment
    server.store.patch(k.CORE_NAMESPACES, None, "shop", "application/merge-patch+json",
                       {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    away = _pending_pod(server.store, "away", node="node-b")
    pod, ns = await enrol.fetch("shop", "away", away["metadata"]["uid"], time.monotonic() + 5)
    with pytest.raises(EnrolmentError, match="scheduled on node-b"):
        enrol.decide(pod, ["10.244.2.5"], ns)
    _pending_pod(server.store, "legacy", labels={"istio.io/dataplane-mode": "none"})
    pod, ns = await enrol.fetch("shop", "legacy", "", time.monotonic() + 5)
    assert enrol.decide(pod, ["10.244.1.31"], ns) == (None, "opted out (istio.io/dataplane-mode=none on the pod)")


async def test_a_pending_pod_is_kept_until_the_model_has_it_and_dropped_when_deleted(enrolment):
    server, source, enrol = enrolment
    store = server.store
    store.patch(k.CORE_NAMESPACES, None, "shop", "application/merge-patch+json",
                {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    for name in ("cart", "gone"):
        created = _pending_pod(store, name)
        pod, ns = await enrol.fetch("shop", name, created["metadata"]["uid"], time.monotonic() + 5)
        workload, _ = enrol.decide(pod, ["10.244.1.40" if name == "cart" else "10.244.1.41"], ns)
        enrol.add_pending(pod, workload, f"/run/netns/{name}", f"c-{name}")
    for _ in range(100):
        if enrol.raw_pod("shop", "cart") and enrol.raw_pod("shop", "gone"):
            break
        await asyncio.sleep(0.02)
    want = enrol.plan(source.config.workloads, set())
    assert {w.workload.name: w.netns for w in want.values()} == {"cart": "/run/netns/cart", "gone": "/run/netns/gone"}

    store.delete(k.CORE_PODS, "shop", "gone")  # deleted before it ever ran
    obj = store.get(k.CORE_PODS, "shop", "cart")  # kubelet reports the other one running
    obj["status"] = {"phase": "Running", "podIP": "10.244.1.40"}
    store.update(k.CORE_PODS, "shop", "cart", obj, subresource="status")
    for _ in range(200):
        if any(w.name == "cart" for w in source.config.workloads) and enrol.raw_pod("shop", "gone") is None:
            break
        await asyncio.sleep(0.02)
    want = enrol.plan(source.config.workloads, set())
    assert set(want) == {"Kubernetes//Pod/shop/cart"} and want["Kubernetes//Pod/shop/cart"].netns == "/run/netns/cart"
    want = enrol.plan(source.config.workloads, {"Kubernetes//Pod/shop/cart"})  # captured: the model rules now
    assert set(want) == {"Kubernetes//Pod/shop/cart"} and not enrol.pending

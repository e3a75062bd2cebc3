"""The watch layer's sans-IO parts: backoff, the informer cache's diffs, object checks, config errors."""

from __future__ import annotations

import random

import pytest

from agent.kube import (
    PODS,
    SERVICES,
    Backoff,
    EventType,
    KubeConfigError,
    ObjectCache,
    in_cluster_configuration,
    kubeconfig_configuration,
    load_configuration,
)
from agent.kube.kinds import ENDPOINTSLICES, GATEWAYS, NAMESPACES


def pod(name, rv="1", labels=None, ip="10.244.1.2"):
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": rv, "labels": labels or {}},
            "spec": {"nodeName": "node-a"}, "status": {"podIP": ip}}


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    b = Backoff(initial=1.0, cap=8.0, rng=random.Random(7))
    delays = [b.next() for _ in range(8)]
    steps = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step
    assert len(set(delays)) == len(delays), "jittered: no two waits alike"
    b.reset()
    assert b.next() <= 1.0
    with pytest.raises(ValueError):
        Backoff(initial=2, cap=1)


def test_two_agents_do_not_retry_in_lockstep():
    a, b = Backoff(rng=random.Random(1)), Backoff(rng=random.Random(2))
    assert [round(a.next(), 6) for _ in range(5)] != [round(b.next(), 6) for _ in range(5)]


def test_replace_emits_the_difference():
    cache = ObjectCache(PODS)
    events, rejected = cache.replace([pod("a"), pod("b"), pod("c")])
    assert [(e.type, e.key) for e in events] == [(EventType.ADDED, "default/a"), (EventType.ADDED, "default/b"),
                                                 (EventType.ADDED, "default/c")] and not rejected
    events, _ = cache.replace([pod("a", rv="9"), pod("b", rv="9", labels={"x": "1"}), pod("d")])
    got = [(e.type, e.key) for e in events]
    assert got == [(EventType.DELETED, "default/c"), (EventType.MODIFIED, "default/b"), (EventType.ADDED, "default/d")]
    modified = events[1]
    assert modified.old["metadata"]["labels"] == {} and modified.obj["metadata"]["labels"] == {"x": "1"}
    assert set(cache.objects) == {"default/a", "default/b", "default/d"}


def test_replace_skips_malformed_items_with_a_reason():
    cache = ObjectCache(PODS)
    events, rejected = cache.replace([pod("a"), pod("bad", ip="nope"), "junk", {"metadata": {"namespace": "x"}}])
    assert [e.key for e in events] == ["default/a"]
    reasons = [r.reason for r in rejected]
    assert reasons[0] == "status.podIP: 'nope' is not an IP address"
    assert reasons[1] == "expected an object, got str" and reasons[2] == "metadata.name: missing or not a string"


def test_apply_follows_watch_events():
    cache = ObjectCache(PODS)
    added, _ = cache.apply("ADDED", pod("a"))
    assert added.type is EventType.ADDED
    same, _ = cache.apply("MODIFIED", pod("a", rv="2"))
    assert same is None, "a new resourceVersion alone changes nothing the agent uses"
    changed, _ = cache.apply("MODIFIED", pod("a", rv="3", labels={"v": "2"}))
    assert changed.type is EventType.MODIFIED and changed.old["metadata"]["labels"] == {}
    unknown_delete, _ = cache.apply("DELETED", pod("zz"))
    assert unknown_delete is None
    gone, _ = cache.apply("DELETED", pod("a", rv="4"))
    assert gone.type is EventType.DELETED and not cache.objects
    late, _ = cache.apply("MODIFIED", pod("b"))
    assert late.type is EventType.ADDED, "a MODIFIED for an unknown object adds it"
    skipped, why = cache.apply("MODIFIED", pod("b", ip="999.1.1.1"))
    assert skipped is None and "status.podIP" in why.reason
    assert cache.objects["default/b"]["status"]["podIP"] == "10.244.1.2", "the last good state is kept"


@pytest.mark.parametrize(("kind", "obj", "reason"), [
    (SERVICES, {"metadata": {"name": "s", "namespace": "d"}, "spec": {"ports": [{"port": "80"}]}},
     "spec.ports[0].port: missing or not an integer"),
    (SERVICES, {"metadata": {"name": "s", "namespace": "d"}, "spec": {"clusterIP": "x"}}, "spec.clusterIP"),
    (ENDPOINTSLICES, {"metadata": {"name": "e", "namespace": "d"}, "addressType": "IPv4",
                      "endpoints": [{"addresses": "10.0.0.1"}]}, "endpoints[0].addresses"),
    (GATEWAYS, {"metadata": {"name": "g", "namespace": "d"}, "spec": {}}, "spec.gatewayClassName"),
    (NAMESPACES, {"metadata": {"name": "n", "labels": {"a": 1}}}, "metadata.labels: not a map of strings"),
    (PODS, {"metadata": {"name": "p"}}, "metadata.namespace"),
])
def test_kind_checks_name_the_field(kind, obj, reason):
    assert reason in kind.problem(obj)


async def test_config_errors_name_the_source(tmp_path):
    with pytest.raises(KubeConfigError, match="no Kubernetes configuration"):
        await load_configuration(environ={"HOME": str(tmp_path)})
    with pytest.raises(KubeConfigError, match="no such file"):
        await kubeconfig_configuration(tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nope\ncontexts: []\n")
    with pytest.raises(KubeConfigError, match="kubeconfig"):
        await kubeconfig_configuration(broken)
    with pytest.raises(KubeConfigError, match="token"):
        in_cluster_configuration({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"},
                                 token_file=str(tmp_path / "token"), ca_file=str(tmp_path / "ca.crt"))


async def test_kubeconfig_env_is_used_when_no_path_is_given(tmp_path):
    from mesh.kube.kubeconfig import write_kubeconfig

    path = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:1", token="t0ken")
    cfg = await load_configuration(environ={"KUBECONFIG": str(path), "HOME": str(tmp_path)})
    assert cfg.host == "http://127.0.0.1:1"
    assert "t0ken" in cfg.api_key.get("BearerToken", "") or "t0ken" in cfg.api_key.get("authorization", "")

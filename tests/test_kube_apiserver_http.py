"""The API server test double over real HTTP: discovery, list/watch semantics, errors, patches, auth.

These speak the wire protocol directly (aiohttp), to pin down what real clients rely on; kubectl and the
agent's client library are exercised in test_kube_apiserver_kubectl.py and test_kube_watch.py.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from mesh.kube.apiserver import ApiServer, UserInfo

PODS = "/api/v1/namespaces/default/pods"


def pod(name, labels=None, node="node-a"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "img"}]}}


@pytest.fixture
async def server():
    srv = ApiServer(bookmark_interval=3600, too_large_wait=0.2)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(base_url=server.url, timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def read_events(resp, count, timeout=10.0):
    events = []
    async def go():
        while len(events) < count:
            line = await resp.content.readline()
            if not line:
                break
            events.append(json.loads(line))
    await asyncio.wait_for(go(), timeout)
    return events


async def test_discovery_describes_every_kind(http):
    api = await (await http.get("/api")).json()
    assert api["versions"] == ["v1"]
    core = await (await http.get("/api/v1")).json()
    pods = next(r for r in core["resources"] if r["name"] == "pods")
    assert pods["kind"] == "Pod" and pods["namespaced"] and "watch" in pods["verbs"] and pods["shortNames"] == ["po"]
    assert any(r["name"] == "pods/status" for r in core["resources"])
    groups = {g["name"] for g in (await (await http.get("/apis")).json())["groups"]}
    assert {"discovery.k8s.io", "security.istio.io", "gateway.networking.k8s.io", "networking.istio.io",
            "authentication.k8s.io"} <= groups
    istio = await (await http.get("/apis/security.istio.io/v1")).json()
    assert {r["kind"] for r in istio["resources"]} >= {"AuthorizationPolicy"}
    version = await (await http.get("/version")).json()
    assert version["major"] == "1"
    assert (await http.get("/apis/nope.example.com/v1")).status == 404


async def test_create_get_list_with_resource_versions(http):
    resp = await http.post(PODS, json=pod("a", {"app": "web"}))
    assert resp.status == 201
    created = await resp.json()
    assert created["metadata"]["namespace"] == "default" and created["metadata"]["uid"]
    await http.post(PODS, json=pod("b", {"app": "db"}, node="node-b"))
    lst = await (await http.get(PODS)).json()
    assert lst["kind"] == "PodList" and [p["metadata"]["name"] for p in lst["items"]] == ["a", "b"]
    assert int(lst["metadata"]["resourceVersion"]) >= int(created["metadata"]["resourceVersion"])
    selected = await (await http.get("/api/v1/pods", params={"labelSelector": "app in (web)"})).json()
    assert [p["metadata"]["name"] for p in selected["items"]] == ["a"]
    on_b = await (await http.get("/api/v1/pods", params={"fieldSelector": "spec.nodeName=node-b"})).json()
    assert [p["metadata"]["name"] for p in on_b["items"]] == ["b"]
    got = await (await http.get(f"{PODS}/a")).json()
    assert got["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_errors_are_status_objects(http):
    resp = await http.get(f"{PODS}/missing")
    body = await resp.json()
    assert resp.status == 404
    assert body["kind"] == "Status" and body["reason"] == "NotFound" and body["details"]["name"] == "missing"
    await http.post(PODS, json=pod("a"))
    again = await http.post(PODS, json=pod("a"))
    assert again.status == 409 and (await again.json())["reason"] == "AlreadyExists"
    current = await (await http.get(f"{PODS}/a")).json()
    current["metadata"]["resourceVersion"] = "1"
    stale = await http.put(f"{PODS}/a", json=current)
    assert stale.status == 409 and (await stale.json())["reason"] == "Conflict"
    bad = await http.get(PODS, params={"labelSelector": "a in ()"})
    assert bad.status == 400 and "unable to parse requirement" in (await bad.json())["message"]
    field = await http.get(PODS, params={"fieldSelector": "spec.image=x"})
    assert field.status == 400 and "spec.image" in (await field.json())["message"]
    garbage = await http.post(PODS, data=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status == 400 and (await garbage.json())["kind"] == "Status"
    wrong_kind = await http.post(PODS, json={**pod("c"), "kind": "Service"})
    assert wrong_kind.status == 400 and "kind" in (await wrong_kind.json())["message"]
    assert (await http.delete("/api/v1/namespaces/default/tokenreviews/x")).status == 404


async def test_patch_types(http):
    await http.post(PODS, json=pod("a", {"app": "web"}))
    json_patch = await http.patch(f"{PODS}/a", data=json.dumps([{"op": "add", "path": "/metadata/labels/x",
                                                                  "value": "1"}]),
                                  headers={"Content-Type": "application/json-patch+json"})
    assert (await json_patch.json())["metadata"]["labels"] == {"app": "web", "x": "1"}
    merge = await http.patch(f"{PODS}/a", data=json.dumps({"metadata": {"labels": {"app": None}}}),
                             headers={"Content-Type": "application/merge-patch+json"})
    assert (await merge.json())["metadata"]["labels"] == {"x": "1"}
    smp = await http.patch(f"{PODS}/a", data=json.dumps({"spec": {"containers": [{"name": "app", "image": "img:2"}]}}),
                           headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert [c["image"] for c in (await smp.json())["spec"]["containers"]] == ["img:2"]
    ap = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"},
          "spec": {"action": "ALLOW"}}
    await http.post("/apis/security.istio.io/v1/namespaces/default/authorizationpolicies", json=ap)
    custom = await http.patch("/apis/security.istio.io/v1/namespaces/default/authorizationpolicies/p",
                              data=json.dumps({"spec": {"action": "DENY"}}),
                              headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert custom.status == 415, "custom resources take no strategic merge patch, as on a real server"


async def test_pagination_is_a_consistent_snapshot(http, server):
    for i in range(5):
        await http.post(PODS, json=pod(f"p{i}"))
    first = await (await http.get(PODS, params={"limit": "2"})).json()
    assert [p["metadata"]["name"] for p in first["items"]] == ["p0", "p1"]
    assert first["metadata"]["remainingItemCount"] == 3
    await http.delete(f"{PODS}/p3")
    names = []
    token = first["metadata"]["continue"]
    while token:
        page = await (await http.get(PODS, params={"limit": "2", "continue": token})).json()
        names += [p["metadata"]["name"] for p in page["items"]]
        token = page["metadata"].get("continue")
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert names == ["p2", "p3", "p4"], "pages continue the snapshot of the first page"
    server.compact()
    expired = await http.get(PODS, params={"limit": "2", "continue": first["metadata"]["continue"]})
    assert expired.status == 410 and (await expired.json())["reason"] == "Expired"


async def test_list_resource_version_match(http, server):
    await http.post(PODS, json=pod("a"))
    rv = (await (await http.get(PODS)).json())["metadata"]["resourceVersion"]
    await http.post(PODS, json=pod("b"))
    exact = await (await http.get(PODS, params={"resourceVersion": rv, "resourceVersionMatch": "Exact"})).json()
    assert [p["metadata"]["name"] for p in exact["items"]] == ["a"] and exact["metadata"]["resourceVersion"] == rv
    newer = await (await http.get(PODS, params={"resourceVersion": rv, "resourceVersionMatch": "NotOlderThan"})).json()
    assert [p["metadata"]["name"] for p in newer["items"]] == ["a", "b"]
    future = await http.get(PODS, params={"resourceVersion": str(server.store.rv + 1000)})
    body = await future.json()
    assert future.status == 504 and body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
    alone = await http.get(PODS, params={"resourceVersionMatch": "Exact"})
    assert alone.status == 400


async def test_watch_from_a_resource_version_with_selectors(http):
    await http.post(PODS, json=pod("a", {"app": "web"}))
    rv = (await (await http.get(PODS)).json())["metadata"]["resourceVersion"]
    async with http.get(PODS, params={"watch": "true", "resourceVersion": rv, "labelSelector": "app=web"}) as resp:
        assert resp.status == 200
        await http.post(PODS, json=pod("b", {"app": "web"}))
        await http.post(PODS, json=pod("c", {"app": "db"}))
        await http.patch(f"{PODS}/a", data=json.dumps({"metadata": {"labels": {"app": "db"}}}),
                         headers={"Content-Type": "application/merge-patch+json"})
        await http.patch(f"{PODS}/c", data=json.dumps({"metadata": {"labels": {"app": "web"}}}),
                         headers={"Content-Type": "application/merge-patch+json"})
        await http.delete(f"{PODS}/b")
        events = await read_events(resp, 4)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"), ("DELETED", "a"), ("ADDED", "c"), ("DELETED", "b")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)


async def test_watch_without_resource_version_starts_with_the_current_state(http):
    await http.post(PODS, json=pod("a"))
    async with http.get(PODS, params={"watch": "1"}) as resp:
        (event,) = await read_events(resp, 1)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "a")


async def test_watch_bookmarks(http, server):
    await http.post(PODS, json=pod("a"))
    rv = (await (await http.get(PODS)).json())["metadata"]["resourceVersion"]
    async with http.get(PODS, params={"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true"}) as resp:
        await http.post("/api/v1/namespaces", json={"metadata": {"name": "other"}})  # not a pod: no pod event
        while server.open_watches == 0:
            await asyncio.sleep(0.01)
        server.send_bookmarks()
        (event,) = await read_events(resp, 1)
    assert event["type"] == "BOOKMARK" and event["object"]["kind"] == "Pod"
    assert int(event["object"]["metadata"]["resourceVersion"]) > int(rv)


async def test_periodic_bookmarks_and_watch_timeout():
    async with ApiServer(bookmark_interval=0.1) as srv, aiohttp.ClientSession(base_url=srv.url) as http:
        params = {"watch": "true", "resourceVersion": str(srv.store.rv), "allowWatchBookmarks": "true",
                  "timeoutSeconds": "1"}
        async with http.get(PODS, params=params) as resp:
            body = await asyncio.wait_for(resp.read(), 10)
    lines = [json.loads(x) for x in body.splitlines()]
    assert lines and all(e["type"] == "BOOKMARK" for e in lines), "the stream ends by itself after timeoutSeconds"


async def test_watch_from_a_compacted_version_gets_410_in_band(http, server):
    await http.post(PODS, json=pod("a"))
    rv = (await (await http.get(PODS)).json())["metadata"]["resourceVersion"]
    await http.post(PODS, json=pod("b"))
    server.compact()
    async with http.get(PODS, params={"watch": "true", "resourceVersion": rv}) as resp:
        assert resp.status == 200
        body = await asyncio.wait_for(resp.read(), 10)
    (event,) = [json.loads(x) for x in body.splitlines()]
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")


async def test_watch_from_a_future_version_is_refused(http, server):
    resp = await http.get(PODS, params={"watch": "true", "resourceVersion": str(server.store.rv + 10)})
    assert resp.status == 504
    assert (await resp.json())["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


async def test_dropped_watches_end_and_refused_watches_get_503(http, server):
    async with http.get(PODS, params={"watch": "true", "resourceVersion": str(server.store.rv)}) as resp:
        while server.open_watches == 0:
            await asyncio.sleep(0.01)
        assert server.drop_watches(abort=True) == 1
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(resp.read(), 10)
    server.refuse_watches = True
    refused = await http.get(PODS, params={"watch": "true"})
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"


async def test_tables_for_kubectl(http):
    await http.post(PODS, json=pod("a"))
    table = await (await http.get(PODS, headers={
        "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"})).json()
    assert table["kind"] == "Table"
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:5] == ["Name", "Ready", "Status", "Restarts", "Age"] and "Node" in names
    (row,) = table["rows"]
    assert row["cells"][0] == "a" and row["cells"][names.index("Node")] == "node-a"


async def test_token_review_and_required_auth():
    tokens = {"good-token": UserInfo("system:serviceaccount:istio-system:ztunnel", "u-1",
                                     ("system:serviceaccounts",))}
    async with ApiServer(tokens=tokens, require_auth=True) as srv, aiohttp.ClientSession(base_url=srv.url) as http:
        anonymous = await http.get(PODS)
        assert anonymous.status == 401 and (await anonymous.json())["reason"] == "Unauthorized"
        auth = {"Authorization": "Bearer good-token"}
        assert (await http.get(PODS, headers=auth)).status == 200
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "good-token"}}
        ok = await (await http.post("/apis/authentication.k8s.io/v1/tokenreviews", json=review, headers=auth)).json()
        assert ok["status"]["authenticated"] is True
        assert ok["status"]["user"] == {"username": "system:serviceaccount:istio-system:ztunnel", "uid": "u-1",
                                        "groups": ["system:serviceaccounts"]}
        assert "token" not in ok["spec"], "the token is not echoed back"
        review["spec"]["token"] = "forged"
        bad = await (await http.post("/apis/authentication.k8s.io/v1/tokenreviews", json=review, headers=auth)).json()
        assert bad["status"]["authenticated"] is False


async def test_internal_errors_do_not_leak_or_crash(http, server, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(server.store, "get", boom)
    resp = await http.get(f"{PODS}/a")
    body = await resp.json()
    assert resp.status == 500 and "secret" not in json.dumps(body)
    monkeypatch.undo()
    assert (await http.get(PODS)).status == 200, "the server keeps serving"


async def test_restart_on_the_same_port_loses_state_and_never_reuses_versions():
    first = await ApiServer().start()
    port = first.port
    async with aiohttp.ClientSession(base_url=first.url) as http:
        await http.post(PODS, json=pod("a"))
        old_rv = int((await (await http.get(PODS)).json())["metadata"]["resourceVersion"])
    await first.stop()
    second = await ApiServer(port=port).start()
    try:
        async with aiohttp.ClientSession(base_url=second.url) as http:
            lst = await (await http.get(PODS)).json()
            assert lst["items"] == []
            assert int(lst["metadata"]["resourceVersion"]) > old_rv
            async with http.get(PODS, params={"watch": "true", "resourceVersion": str(old_rv)}) as resp:
                (event,) = await read_events(resp, 1)
            assert event["type"] == "ERROR" and event["object"]["code"] == 410
    finally:
        await second.stop()


async def test_send_initial_events_ends_with_the_marker_bookmark(http):
    await http.post(PODS, json=pod("a"))
    params = {"watch": "true", "sendInitialEvents": "true", "allowWatchBookmarks": "true",
              "resourceVersionMatch": "NotOlderThan"}
    async with http.get(PODS, params=params) as resp:
        added, marker = await read_events(resp, 2)
    assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "a")
    assert marker["type"] == "BOOKMARK"
    assert marker["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_generate_name_and_delete_collection(http):
    for _ in range(3):
        body = pod("")
        body["metadata"] = {"generateName": "job-", "labels": {"batch": "1"}}
        created = await (await http.post(PODS, json=body)).json()
        assert created["metadata"]["name"].startswith("job-") and len(created["metadata"]["name"]) == 9
    await http.post(PODS, json=pod("keep"))
    deleted = await (await http.delete(PODS, params={"labelSelector": "batch=1"})).json()
    assert len(deleted["items"]) == 3
    left = await (await http.get(PODS)).json()
    assert [p["metadata"]["name"] for p in left["items"]] == ["keep"]

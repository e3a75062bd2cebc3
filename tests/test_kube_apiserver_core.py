"""The API server test double's sans-IO core: selectors, patches, storage semantics and controllers."""

from __future__ import annotations

import pytest

from mesh.kube.apiserver import ApiError, Store, sync_lab
from mesh.kube.apiserver import kinds as k
from mesh.kube.apiserver.controllers import MANAGED_BY_LABEL, SERVICE_NAME_LABEL, install_controllers
from mesh.kube.apiserver.lab import LAB_ANNOTATION, LabStateError
from mesh.kube.apiserver.patch import StrategicMerge, json_patch, merge_patch
from mesh.kube.apiserver.selectors import parse_field_selector, parse_label_selector


def pod(name, labels=None, node="node-a", ns="default"):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "img:1"}]}}


def ready(store, name, ip, ns="default"):
    obj = store.get(k.CORE_PODS, ns, name)
    obj["status"] = {"phase": "Running", "podIP": ip,
                     "conditions": [{"type": "Ready", "status": "True"}]}
    return store.update(k.CORE_PODS, ns, name, obj, subresource="status")


@pytest.fixture
def store():
    s = Store(start_rv=100)
    install_controllers(s)
    return s


# --- selectors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("app=web", {"app": "web"}, True),
    ("app==web", {"app": "other"}, False),
    ("app!=web", {}, True),
    ("app in (a, web),tier", {"app": "web", "tier": "x"}, True),
    ("app notin (web)", {"app": "web"}, False),
    ("!canary", {"canary": "1"}, False),
    ("app, !canary", {"app": "x"}, True),
    ("rank>3", {"rank": "4"}, True),
    ("rank<3", {"rank": "x"}, False),
    ("istio.io/dataplane-mode=ambient", {"istio.io/dataplane-mode": "ambient"}, True),
])
def test_label_selector_semantics(selector, labels, expected):
    assert parse_label_selector(selector).matches(labels) is expected


@pytest.mark.parametrize("bad", ["app=", "app in ()", "=x", "a b", "rank>x", "Bad_/x=y"])
def test_label_selector_errors_name_the_requirement(bad):
    if bad == "app=":  # an empty value is legal: it selects objects whose label is empty
        assert parse_label_selector(bad).matches({"app": ""})
        return
    with pytest.raises(ApiError) as err:
        parse_label_selector(bad)
    assert err.value.code == 400 and "unable to parse requirement" in err.value.message


def test_field_selector_parsing_and_matching():
    sel = parse_field_selector(r"spec.nodeName=node-a,status.phase!=Failed,metadata.name=a\,b")
    assert sel.matches({"metadata": {"name": "a,b"}, "spec": {"nodeName": "node-a"}, "status": {"phase": "Running"}})
    assert not sel.matches({"metadata": {"name": "a,b"}, "spec": {"nodeName": "node-b"}})
    with pytest.raises(ApiError, match=r"field label not supported: spec\.image"):
        parse_field_selector("spec.image=x", {"spec.nodeName"}.__contains__)


# --- patches -----------------------------------------------------------------------------------------


def test_json_patch_operations_and_failures():
    obj = {"metadata": {"labels": {"a": "1"}}, "spec": {"list": [1, 2]}}
    out = json_patch(obj, [{"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                           {"op": "remove", "path": "/metadata/labels/a"},
                           {"op": "add", "path": "/spec/list/-", "value": 3},
                           {"op": "replace", "path": "/spec/list/0", "value": 0},
                           {"op": "test", "path": "/spec/list/2", "value": 3}])
    assert out == {"metadata": {"labels": {"b/c": "2"}}, "spec": {"list": [0, 2, 3]}}
    assert obj["metadata"]["labels"] == {"a": "1"}, "the input must not change"
    with pytest.raises(ApiError) as err:
        json_patch(obj, [{"op": "test", "path": "/spec/list/0", "value": 9}])
    assert err.value.code == 422
    with pytest.raises(ApiError) as err:
        json_patch(obj, {"op": "add"})
    assert err.value.code == 400


def test_merge_patch_deletes_with_null_and_replaces_lists():
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1, 2]}, {"a": {"b": None}, "l": [3]}) == {"a": {"c": 2}, "l": [3]}


def test_strategic_merge_merges_containers_by_name_and_honours_directives():
    smp = StrategicMerge(k.CORE_PODS.merge_keys, k.CORE_PODS.merge_sets)
    obj = {"metadata": {"finalizers": ["a"]},
           "spec": {"containers": [{"name": "app", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
                                   {"name": "side", "image": "s:1"}]}}
    out = smp.apply(obj, {"metadata": {"finalizers": ["b"]},
                          "spec": {"$setElementOrder/containers": [{"name": "side"}, {"name": "app"}],
                                   "containers": [{"name": "app", "env": [{"name": "Y", "value": "2"}]}]}})
    assert [c["name"] for c in out["spec"]["containers"]] == ["side", "app"]
    app = out["spec"]["containers"][1]
    assert app["image"] == "a:1" and [e["name"] for e in app["env"]] == ["X", "Y"]
    assert out["metadata"]["finalizers"] == ["a", "b"]
    out = smp.apply(out, {"spec": {"containers": [{"name": "side", "$patch": "delete"}]},
                          "$deleteFromPrimitiveList/metadata": None,
                          "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}})
    assert [c["name"] for c in out["spec"]["containers"]] == ["app"]
    assert out["metadata"]["finalizers"] == ["b"]


# --- storage semantics -------------------------------------------------------------------------------


def test_resource_versions_are_monotonic_and_objects_get_server_metadata(store):
    a = store.create(k.CORE_PODS, "default", pod("a"))
    b = store.create(k.CORE_PODS, "default", pod("b"))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"]) > 100
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert a["metadata"]["creationTimestamp"].endswith("Z") and a["metadata"]["generation"] == 1
    assert a["status"]["phase"] == "Pending", "a pod starts Pending until its kubelet reports"


def test_default_namespaces_and_service_accounts_exist():
    s = Store()
    install_controllers(s)
    names = [key[1] for key, _ in s.items(k.CORE_NAMESPACES)]
    assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]
    assert s.peek(k.CORE_SERVICEACCOUNTS, "kube-system", "default") is not None


def test_errors_are_the_real_status_reasons(store):
    store.create(k.CORE_PODS, "default", pod("a"))
    with pytest.raises(ApiError) as err:
        store.create(k.CORE_PODS, "default", pod("a"))
    assert (err.value.code, err.value.reason) == (409, "AlreadyExists")
    with pytest.raises(ApiError) as err:
        store.get(k.CORE_PODS, "default", "nope")
    assert (err.value.code, err.value.reason, err.value.message) == (404, "NotFound", 'pods "nope" not found')
    with pytest.raises(ApiError) as err:
        store.create(k.CORE_PODS, "missing-ns", pod("a", ns="missing-ns"))
    assert err.value.code == 404 and "namespaces" in err.value.message
    stale = store.get(k.CORE_PODS, "default", "a")
    fresh = store.get(k.CORE_PODS, "default", "a")
    fresh["metadata"]["labels"] = {"x": "1"}
    store.update(k.CORE_PODS, "default", "a", fresh)
    stale["metadata"]["labels"] = {"x": "2"}
    with pytest.raises(ApiError) as err:
        store.update(k.CORE_PODS, "default", "a", stale)
    assert (err.value.code, err.value.reason) == (409, "Conflict")
    assert "the object has been modified" in err.value.message


def test_invalid_objects_get_422_naming_the_field(store):
    bad = pod("Bad_Name")
    with pytest.raises(ApiError) as err:
        store.create(k.CORE_PODS, "default", bad)
    assert err.value.code == 422 and "metadata.name" in err.value.message
    svc = {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 70000}], "selector": {"a": "b"}}}
    with pytest.raises(ApiError) as err:
        store.create(k.CORE_SERVICES, "default", svc)
    assert err.value.code == 422 and "spec.ports[0].port" in err.value.message
    labelled = pod("ok", labels={"bad key!": "v"})
    with pytest.raises(ApiError) as err:
        store.create(k.CORE_PODS, "default", labelled)
    assert "metadata.labels" in err.value.message


def test_pod_node_and_spec_are_immutable_but_labels_are_not(store):
    store.create(k.CORE_PODS, "default", pod("a"))
    moved = store.get(k.CORE_PODS, "default", "a")
    moved["spec"]["nodeName"] = "node-b"
    with pytest.raises(ApiError, match=r"spec\.nodeName"):
        store.update(k.CORE_PODS, "default", "a", moved)
    relabelled = store.patch(k.CORE_PODS, "default", "a", "application/merge-patch+json",
                             {"metadata": {"labels": {"app": "x"}}})
    assert relabelled["metadata"]["labels"] == {"app": "x"} and relabelled["metadata"]["generation"] == 1


def test_status_is_written_only_through_the_status_subresource(store):
    store.create(k.CORE_PODS, "default", pod("a"))
    ready(store, "a", "10.244.1.5")
    obj = store.get(k.CORE_PODS, "default", "a")
    obj["status"]["podIP"] = "10.9.9.9"
    obj["metadata"]["labels"] = {"x": "y"}
    after = store.update(k.CORE_PODS, "default", "a", obj)
    assert after["status"]["podIP"] == "10.244.1.5" and after["metadata"]["labels"] == {"x": "y"}


def test_history_snapshot_and_compaction_give_410(store):
    store.create(k.CORE_PODS, "default", pod("a"))
    rv_one = store.rv
    store.create(k.CORE_PODS, "default", pod("b"))
    store.delete(k.CORE_PODS, "default", "a")
    assert [p["metadata"]["name"] for p in store.list(k.CORE_PODS, at_rv=rv_one)] == ["a"]
    assert [p["metadata"]["name"] for p in store.list(k.CORE_PODS)] == ["b"]
    assert [c.type for c in store.changes_since(rv_one) if c.rtype is k.CORE_PODS] == ["ADDED", "DELETED"]
    store.compact()
    with pytest.raises(ApiError) as err:
        store.changes_since(rv_one)
    assert (err.value.code, err.value.reason) == (410, "Expired")


def test_bounded_history_compacts_itself():
    s = Store(start_rv=1, max_events=5, default_namespaces=False)
    s.create(k.CORE_NAMESPACES, None, {"metadata": {"name": "n"}})
    first = s.rv
    for i in range(10):
        s.create(k.CORE_SERVICEACCOUNTS, "n", {"metadata": {"name": f"sa{i}"}})
    with pytest.raises(ApiError):
        s.changes_since(first)
    assert len(s.changes_since(s.rv - 3)) == 3


def test_noop_update_keeps_the_resource_version(store):
    created = store.create(k.CORE_PODS, "default", pod("a"))
    again = store.update(k.CORE_PODS, "default", "a", store.get(k.CORE_PODS, "default", "a"))
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_finalizers_hold_deletion_until_removed(store):
    obj = pod("a")
    obj["metadata"]["finalizers"] = ["example.com/hold"]
    store.create(k.CORE_PODS, "default", obj)
    held = store.delete(k.CORE_PODS, "default", "a")
    assert held["metadata"]["deletionTimestamp"]
    assert store.peek(k.CORE_PODS, "default", "a") is not None
    store.patch(k.CORE_PODS, "default", "a", "application/merge-patch+json", {"metadata": {"finalizers": None}})
    assert store.peek(k.CORE_PODS, "default", "a") is None


def test_namespace_deletion_removes_its_contents(store):
    store.create(k.CORE_NAMESPACES, None, {"metadata": {"name": "team"}})
    store.create(k.CORE_PODS, "team", pod("a", ns="team"))
    store.create(k.AUTHORIZATION_POLICIES, "team", {"metadata": {"name": "p"}, "spec": {}})
    store.delete(k.CORE_NAMESPACES, None, "team")
    assert store.peek(k.CORE_NAMESPACES, None, "team") is None
    assert store.peek(k.CORE_PODS, "team", "a") is None and store.peek(k.AUTHORIZATION_POLICIES, "team", "p") is None


def test_cluster_ips_are_allocated_and_never_shared(store):
    a = store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}})
    assert a["spec"]["clusterIP"].startswith("10.") and a["spec"]["clusterIPs"] == [a["spec"]["clusterIP"]]
    assert a["spec"]["ports"][0] == {"port": 80, "protocol": "TCP", "targetPort": 80}
    with pytest.raises(ApiError, match="already allocated"):
        taken = {"clusterIP": a["spec"]["clusterIP"], "ports": [{"port": 1}]}
        store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "b"}, "spec": taken})


# --- the endpointslice controller --------------------------------------------------------------------


def slices(store, svc="web"):
    return [s for _, s in store.items(k.ENDPOINTSLICES, "default")
            if s["metadata"]["labels"].get(SERVICE_NAME_LABEL) == svc]


def test_endpointslices_follow_services_and_pods(store):
    store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "web", "labels": {"team": "a"}},
                                              "spec": {"selector": {"app": "web"},
                                                       "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    (empty,) = slices(store)
    assert empty["endpoints"] == [] and empty["metadata"]["labels"][MANAGED_BY_LABEL]
    assert empty["metadata"]["ownerReferences"][0]["kind"] == "Service"
    store.create(k.CORE_PODS, "default", pod("w1", {"app": "web"}))
    store.create(k.CORE_PODS, "default", pod("w2", {"app": "web"}, node="node-b"))
    store.create(k.CORE_PODS, "default", pod("other", {"app": "db"}))
    ready(store, "w1", "10.244.1.10")
    ready(store, "w2", "10.244.2.10")
    ready(store, "other", "10.244.1.11")
    (sl,) = slices(store)
    assert sl["metadata"]["labels"]["team"] == "a"
    assert sl["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [(e["addresses"], e["nodeName"], e["conditions"]["ready"], e["targetRef"]["name"])
            for e in sl["endpoints"]] == [(["10.244.1.10"], "node-a", True, "w1"),
                                          (["10.244.2.10"], "node-b", True, "w2")]
    store.patch(k.CORE_PODS, "default", "w2", "application/merge-patch+json", {"metadata": {"labels": {"app": "x"}}})
    assert [e["targetRef"]["name"] for e in slices(store)[0]["endpoints"]] == ["w1"]
    store.delete(k.CORE_PODS, "default", "w1")
    assert slices(store)[0]["endpoints"] == []
    store.delete(k.CORE_SERVICES, "default", "web")
    assert slices(store) == []


def test_a_deleted_managed_slice_comes_back(store):
    store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "web"},
                                              "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
    (first,) = slices(store)
    store.delete(k.ENDPOINTSLICES, "default", first["metadata"]["name"])
    (second,) = slices(store)
    assert second["metadata"]["uid"] != first["metadata"]["uid"]


def test_named_target_ports_resolve_per_pod(store):
    store.create(k.CORE_SERVICES, "default", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    p = pod("w1", {"app": "web"})
    p["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 9090}]
    store.create(k.CORE_PODS, "default", p)
    ready(store, "w1", "10.244.1.10")
    assert slices(store)[0]["ports"] == [{"name": "http", "port": 9090, "protocol": "TCP"}]


# --- populating from a lab ---------------------------------------------------------------------------

LAB_STATE = {
    "name": "t1", "trustDomain": "cluster.local", "fabricNetns": "nm-t1-fabric",
    "nodes": [{"name": "node-a", "netns": "nm-t1-node-a", "fabricIp": "172.30.0.2", "podCidr": "10.244.1.0/24",
               "gateway": "10.244.1.1"}],
    "pods": [{"name": "client", "namespace": "apps", "serviceAccount": "sleep", "labels": {"app": "client"},
              "annotations": {"a": "b"}, "node": "node-a", "ip": "10.244.1.2", "netns": "nm-t1-client",
              "hostIfname": "vclient", "gateway": "10.244.1.1"}],
    "services": [{"name": "client", "namespace": "apps", "vip": "10.96.0.50",
                  "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "client"}}],
    "namespaces": {"apps": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
}


def test_sync_lab_creates_running_ready_pods_services_and_slices(store):
    counts = sync_lab(store, LAB_STATE)
    assert counts == {"namespaces": 1, "nodes": 1, "pods": 1, "services": 1}
    ns = store.get(k.CORE_NAMESPACES, None, "apps")
    assert ns["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    p = store.get(k.CORE_PODS, "apps", "client")
    assert p["spec"]["nodeName"] == "node-a" and p["spec"]["serviceAccountName"] == "sleep"
    assert p["status"]["phase"] == "Running" and p["status"]["podIP"] == "10.244.1.2"
    assert p["status"]["hostIP"] == "172.30.0.2"
    assert {"type": "Ready", "status": "True"}.items() <= next(
        c for c in p["status"]["conditions"] if c["type"] == "Ready").items()
    assert p["metadata"]["annotations"] == {"a": "b", LAB_ANNOTATION: "t1"}
    assert store.peek(k.CORE_SERVICEACCOUNTS, "apps", "sleep") is not None
    svc = store.get(k.CORE_SERVICES, "apps", "client")
    assert svc["spec"]["clusterIP"] == "10.96.0.50"
    (sl,) = [s for _, s in store.items(k.ENDPOINTSLICES, "apps")]
    assert sl["endpoints"][0]["addresses"] == ["10.244.1.2"] and sl["ports"][0]["port"] == 8080
    node = store.get(k.CORE_NODES, None, "node-a")
    assert node["spec"]["podCIDR"] == "10.244.1.0/24"


def test_sync_lab_again_changes_nothing_then_prunes_only_lab_objects(store):
    sync_lab(store, LAB_STATE)
    rv = store.rv
    sync_lab(store, LAB_STATE)
    assert store.rv == rv, "re-syncing an unchanged lab must not write"
    store.create(k.CORE_PODS, "apps", pod("mine", ns="apps"))
    sync_lab(store, {**LAB_STATE, "pods": [], "services": []})
    assert store.peek(k.CORE_PODS, "apps", "client") is None and store.peek(k.CORE_SERVICES, "apps", "client") is None
    assert store.peek(k.CORE_PODS, "apps", "mine") is not None, "user objects are left alone"


def test_sync_lab_rejects_malformed_state_naming_the_field(store):
    with pytest.raises(LabStateError, match=r"pods\[client\]\.ip"):
        sync_lab(store, {**LAB_STATE, "pods": [{k_: v for k_, v in LAB_STATE["pods"][0].items() if k_ != "ip"}]})
    with pytest.raises(LabStateError, match="name"):
        sync_lab(store, {"pods": []})


def test_system_namespaces_cannot_be_deleted(store):
    with pytest.raises(ApiError) as err:
        store.delete(k.CORE_NAMESPACES, None, "default")
    assert err.value.code == 403 and "may not be deleted" in err.value.message

"""The real kubectl (get, apply -f, label, delete, get -w) and the runner, against the API server double."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from mesh.kube.apiserver import BackgroundApiServer, sync_lab
from mesh.kube.apiserver import kinds as k
from mesh.kube.kubeconfig import write_kubeconfig

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

LAB_STATE = {
    "name": "kc", "trustDomain": "cluster.local", "fabricNetns": "nm-kc-fabric",
    "nodes": [{"name": "node-a", "netns": "nm-kc-node-a", "fabricIp": "172.30.0.2", "podCidr": "10.244.1.0/24",
               "gateway": "10.244.1.1"},
              {"name": "node-b", "netns": "nm-kc-node-b", "fabricIp": "172.30.0.3", "podCidr": "10.244.2.0/24",
               "gateway": "10.244.2.1"}],
    "pods": [{"name": "client", "namespace": "default", "serviceAccount": "sleep", "labels": {"app": "client"},
              "annotations": {}, "node": "node-a", "ip": "10.244.1.2", "netns": "nm-kc-client", "hostIfname": "v1",
              "gateway": "10.244.1.1"},
             {"name": "server", "namespace": "default", "serviceAccount": "httpbin", "labels": {"app": "server"},
              "annotations": {}, "node": "node-b", "ip": "10.244.2.2", "netns": "nm-kc-server", "hostIfname": "v2",
              "gateway": "10.244.2.1"}],
    "services": [{"name": "server", "namespace": "default", "vip": "10.96.0.20",
                  "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "server"}}],
    "namespaces": {"default": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
}

MANIFEST = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
  labels: {app: server, tier: front}
spec:
  nodeName: node-a
  containers:
  - {name: app, image: "nginx:1", ports: [{containerPort: 80, name: http}]}
  - {name: side, image: "busybox:1"}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]}]
"""


@pytest.fixture
def cluster(tmp_path):
    bg = BackgroundApiServer(bookmark_interval=3600).start()
    try:
        bg.call(lambda srv: sync_lab(srv.store, LAB_STATE))
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", bg.url)
        yield bg, kubeconfig
    finally:
        bg.stop()


def kubectl(kubeconfig, *args, input=None, check=True):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=60, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_kubectl_get_shows_the_lab(cluster):
    _, kc = cluster
    out = kubectl(kc, "get", "pods", "-o", "wide").stdout.splitlines()
    assert out[0].split()[:6] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows["client"][1:3] == ["1/1", "Running"] and rows["client"][5:7] == ["10.244.1.2", "node-a"]
    assert rows["server"][5:7] == ["10.244.2.2", "node-b"]
    svc = kubectl(kc, "get", "svc", "server", "-o", "json").stdout
    assert json.loads(svc)["spec"]["clusterIP"] == "10.96.0.20"
    slices = json.loads(kubectl(kc, "get", "endpointslices", "-l", "kubernetes.io/service-name=server",
                                "-o", "json").stdout)["items"]
    assert [e["addresses"] for e in slices[0]["endpoints"]] == [["10.244.2.2"]]
    ns = kubectl(kc, "get", "ns", "default", "--show-labels").stdout
    assert "istio.io/dataplane-mode=ambient" in ns
    on_a = kubectl(kc, "get", "pods", "-A", "--field-selector", "spec.nodeName=node-a", "-o", "name").stdout
    assert on_a.split() == ["pod/client"]
    assert kubectl(kc, "get", "po", "-l", "app notin (client)", "-o", "name").stdout.split() == ["pod/server"]
    missing = kubectl(kc, "get", "pod", "nope", check=False)
    assert missing.returncode != 0 and 'pods "nope" not found' in missing.stderr


def test_kubectl_apply_label_delete(cluster):
    bg, kc = cluster
    first = kubectl(kc, "apply", "-f", "-", input=MANIFEST).stdout
    assert "pod/web created" in first and "authorizationpolicy.security.istio.io/allow-client created" in first
    assert "unchanged" in kubectl(kc, "apply", "-f", "-", input=MANIFEST).stdout
    changed = MANIFEST.replace("busybox:1", "busybox:2").replace("action: ALLOW", "action: DENY")
    assert kubectl(kc, "apply", "-f", "-", input=changed).stdout.count("configured") == 2
    web = json.loads(kubectl(kc, "get", "pod", "web", "-o", "json").stdout)
    assert [c["image"] for c in web["spec"]["containers"]] == ["nginx:1", "busybox:2"], "merged by container name"
    assert web["spec"]["containers"][0]["ports"] == [{"containerPort": 80, "name": "http"}]
    policy = json.loads(kubectl(kc, "get", "authorizationpolicy", "allow-client", "-o", "json").stdout)
    assert policy["spec"]["action"] == "DENY" and policy["metadata"]["generation"] == 2

    kubectl(kc, "label", "pod", "web", "tier=back", "--overwrite")
    kubectl(kc, "label", "ns", "default", "team=mesh")
    kubectl(kc, "label", "pod", "web", "app-")
    labels = json.loads(kubectl(kc, "get", "pod", "web", "-o", "json").stdout)["metadata"]["labels"]
    assert labels == {"tier": "back"}
    refused = kubectl(kc, "label", "pod", "web", "tier=again", check=False)
    assert refused.returncode != 0 and "already has a value" in refused.stderr
    assert bg.call(lambda s: s.store.get(k.CORE_NAMESPACES, None, "default"))["metadata"]["labels"]["team"] == "mesh"

    deleted = kubectl(kc, "delete", "-f", "-", input=changed).stdout
    assert 'pod "web" deleted' in deleted and 'authorizationpolicy.security.istio.io "allow-client" deleted' in deleted
    assert kubectl(kc, "get", "pods", "-o", "name").stdout.split() == ["pod/client", "pod/server"]
    bad = kubectl(kc, "apply", "-f", "-", input=MANIFEST.replace("name: web", "name: Web_Bad"), check=False)
    assert bad.returncode != 0 and "metadata.name" in bad.stderr


def test_kubectl_get_watch_sees_changes(cluster):
    bg, kc = cluster
    env = {**os.environ, "KUBECONFIG": str(kc), "HOME": str(kc.parent)}
    proc = subprocess.Popen(["kubectl", "get", "pods", "--watch", "--output-watch-events", "--request-timeout=30s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()

    def wait_for(needle, timeout=20.0):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(line)
            if all(n in line for n in needle):
                return line
        raise AssertionError(f"no line with {needle} in {seen}")

    try:
        wait_for(("ADDED", "client"))
        bg.call(lambda s: s.store.patch(k.CORE_PODS, "default", "client", "application/merge-patch+json",
                                        {"metadata": {"labels": {"v": "2"}}}))
        wait_for(("MODIFIED", "client"))
        bg.call(lambda s: s.store.delete(k.CORE_PODS, "default", "server"))
        wait_for(("DELETED", "server"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_runner_serves_the_lab_state_and_stops_on_sigterm(tmp_path):
    state = tmp_path / "lab.json"
    state.write_text(json.dumps(LAB_STATE))
    kc = tmp_path / "kubeconfig"
    proc = subprocess.Popen([sys.executable, "-m", "mesh.kube.apiserver", "--listen", "127.0.0.1:0",
                             "--state", str(state), "--kubeconfig", str(kc)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["url"].startswith("http://127.0.0.1:") and ready["kubeconfig"] == str(kc)
        assert (kc.stat().st_mode & 0o777) == 0o600
        out = kubectl(kc, "get", "pods", "-o", "wide").stdout
        assert "10.244.1.2" in out and "node-b" in out
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_runner_rejects_a_bad_state_file_clearly(tmp_path):
    state = tmp_path / "lab.json"
    state.write_text(json.dumps({**LAB_STATE, "pods": [{"name": "x"}]}))
    proc = subprocess.run([sys.executable, "-m", "mesh.kube.apiserver", "--listen", "127.0.0.1:0",
                           "--state", str(state)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "pods[x].namespace: missing" in proc.stderr
    assert "Traceback" not in proc.stderr

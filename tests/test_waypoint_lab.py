"""The waypoint in the lab, through real agents: client pod -> its agent -> HBONE -> waypoint pod ->
HBONE -> the destination pod's agent -> app. L7 routing and policy must hold on that path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from agent.labmesh import MeshLab, http_get_in_netns
from mesh.lab import Lab, load_topology
from mesh.lab.build import _list_netns
from mesh.lab.state import lab_prefix

from .conftest import unique_lab_name

PY = sys.executable

TOPOLOGY = {
    "namespaces": {"default": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
    "nodes": [
        {"name": "node-a", "pods": [
            {"name": "client", "serviceAccount": "sleep", "labels": {"app": "client"}},
            {"name": "waypoint", "serviceAccount": "waypoint",
             "labels": {"app": "waypoint", "istio.io/dataplane-mode": "none",
                        "gateway.networking.k8s.io/gateway-name": "waypoint"}},
        ]},
        {"name": "node-b", "pods": [
            {"name": "server-v1", "serviceAccount": "httpbin", "labels": {"app": "server", "version": "v1"}},
            {"name": "server-v2", "serviceAccount": "httpbin", "labels": {"app": "server", "version": "v2"}},
        ]},
    ],
    "services": [
        {"name": "server", "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "server"},
         "labels": {"istio.io/use-waypoint": "waypoint"}},
        {"name": "server-v1", "ports": [{"port": 80, "targetPort": 8080}], "selector": {"version": "v1"}},
        {"name": "server-v2", "ports": [{"port": 80, "targetPort": 8080}], "selector": {"version": "v2"}},
        {"name": "waypoint", "ports": [{"port": 15008}], "selector": {"app": "waypoint"}},
    ],
}

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
    - backendRefs:
        - {name: server-v1, port: 80, weight: 80}
        - {name: server-v2, port: 80, weight: 20}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: server}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""

APP = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
NAME = sys.argv[1]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"{NAME} {self.client_address[0]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

CLIENT = r"""
import http.client, json, sys
host, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(host, 80, timeout=20)
out = []
for _ in range(n):
    c.request("GET", path)
    r = c.getresponse()
    out.append([r.status, r.read().decode(errors="replace"), r.getheader("x-envoy-upstream-service-time")])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def waypoint_mesh(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the mesh tests build network namespaces and must run as root")
    lab = Lab.up(load_topology(TOPOLOGY), name=unique_lab_name())
    cfg = tmp_path_factory.mktemp("waypoint-config")
    (cfg / "routes.yaml").write_text(ROUTES)
    mesh = MeshLab(lab)
    procs: list[subprocess.Popen] = []
    try:
        for pod in ("server-v1", "server-v2"):
            procs.append(lab.popen(pod, [PY, "-c", APP, pod], stdout=subprocess.DEVNULL))
        mesh.start()
        log = open(mesh.workdir / "waypoint.log", "ab")  # noqa: SIM115
        mesh.logs["waypoint"] = mesh.workdir / "waypoint.log"
        wp = lab.popen("waypoint", [PY, "-m", "mesh.cli", "waypoint", "--name", "default/waypoint",
                                    "--mesh-config", f"lab:{lab.name}", "--config-dir", str(cfg),
                                    "--ca", str(mesh.workdir / "ca")],
                       stdout=log, stderr=subprocess.STDOUT)
        procs.append(wp)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if wp.poll() is not None:
                pytest.fail(f"waypoint exited: {mesh.log_tail('waypoint')}")
            try:
                if http_get_in_netns(lab.pod("waypoint").netns_path, "127.0.0.1", 15020, "/healthz/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"waypoint not ready: {mesh.log_tail('waypoint')}")
        yield mesh
    finally:
        for p in procs:
            p.kill()
            p.wait()
        mesh.stop()
        lab.down()
        assert not [n for n in _list_netns() if n.startswith(lab_prefix(lab.name))]


def requests(mesh: MeshLab, n: int, path: str = "/") -> list[list]:
    vip = next(s.vip for s in mesh.lab.state.services if s.name == "server")
    res = mesh.lab.exec("client", [PY, "-c", CLIENT, vip, str(n), path], capture_output=True, text=True,
                        timeout=300)
    assert res.returncode == 0, res.stderr[-2000:] + mesh.log_tail("waypoint") + mesh.log_tail("agent-node-a")
    return json.loads(res.stdout)


def test_weighted_split_through_agents_and_waypoint(waypoint_mesh):
    out = requests(waypoint_mesh, 1000)
    assert {status for status, _, _ in out} == {200}
    who = Counter(body.split()[0] for _, body, _ in out)
    assert set(who) == {"server-v1", "server-v2"}
    # 80/20 over 1000: sd = sqrt(1000 * .8 * .2) ~ 12.6; allow 5 sd.
    assert abs(who["server-v1"] - 800) <= 64, who
    # The app is reached by the waypoint over HBONE; the destination agent keeps the caller's address.
    callers = {body.split()[1] for _, body, _ in out}
    assert callers == {waypoint_mesh.lab.pod("waypoint").ip}


def test_l7_deny_gives_403_and_the_rest_still_flows(waypoint_mesh):
    denied = requests(waypoint_mesh, 3, "/admin/users")
    assert [s for s, _, _ in denied] == [403, 403, 403]
    assert denied[0][1] == "RBAC: access denied"
    assert requests(waypoint_mesh, 1, "/ok")[0][0] == 200


def test_waypoint_reports_istio_request_metrics(waypoint_mesh):
    requests(waypoint_mesh, 5)
    _, text = http_get_in_netns(waypoint_mesh.lab.pod("waypoint").netns_path, "127.0.0.1", 15020,
                                "/stats/prometheus")
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert any('reporter="waypoint"' in ln and 'response_code="200"' in ln
               and 'source_principal="spiffe://cluster.local/ns/default/sa/sleep"' in ln for ln in lines), lines
    assert any('response_code="403"' in ln for ln in lines)

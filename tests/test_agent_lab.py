"""The mesh end to end in a lab: a real CA, one real agent process per node, unmodified pods.

Traffic between pods must arrive byte-exact, carried in mutual TLS with each side's identity, policy must
be enforced at the destination (also on live connections), and a dead destination agent must give a
prompt refusal.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from agent.labmesh import MeshLab
from mesh.lab import Lab, load_topology
from mesh.lab.build import _list_netns
from mesh.lab.state import lab_prefix

from .conftest import unique_lab_name

PY = sys.executable
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/default/sa/httpbin"

TOPOLOGY = {
    "namespaces": {
        "default": {"labels": {"istio.io/dataplane-mode": "ambient"}},
        "other": {"labels": {"istio.io/dataplane-mode": "ambient"}},
    },
    "nodes": [
        {"name": "node-a", "pods": [
            {"name": "client", "namespace": "default", "serviceAccount": "sleep", "labels": {"app": "client"}},
            {"name": "stranger", "namespace": "other", "serviceAccount": "stranger", "labels": {"app": "stranger"}},
            {"name": "server-a", "namespace": "default", "serviceAccount": "httpbin", "labels": {"app": "server"}},
        ]},
        {"name": "node-b", "pods": [
            {"name": "server", "namespace": "default", "serviceAccount": "httpbin", "labels": {"app": "server"}},
            {"name": "server-b2", "namespace": "default", "serviceAccount": "httpbin", "labels": {"app": "server"}},
            # In the Service but nothing listens: connections to it are refused, the mesh must skip it.
            {"name": "dead", "namespace": "default", "serviceAccount": "httpbin", "labels": {"app": "server"}},
        ]},
    ],
    "services": [{"name": "server", "namespace": "default", "ports": [{"port": 80, "targetPort": 8080}],
                  "selector": {"app": "server"}}],
}


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def mesh(request, tmp_path_factory):
    import os

    if os.geteuid() != 0:
        pytest.fail("the mesh tests build network namespaces and must run as root")
    lab = Lab.up(load_topology(TOPOLOGY), name=unique_lab_name())
    policy_file = tmp_path_factory.mktemp("policies") / "policies.yaml"
    policy_file.write_text("")
    m = MeshLab(lab, redirect=request.param, extra_agent_args=["--config", f"policies:{policy_file}"])
    servers = []
    try:
        for pod in ("server", "server-a", "server-b2"):
            servers.append(lab.popen(pod, [PY, "-m", "mesh.lab.echo", "serve", "8080"], stdout=subprocess.DEVNULL))
        m.start()
        m.policy_file = policy_file  # type: ignore[attr-defined]
        yield m
    finally:
        for s in servers:
            s.kill()
            s.wait()
        m.stop()
        lab.down()
        assert not [n for n in _list_netns() if n.startswith(lab_prefix(lab.name))]


def send(m: MeshLab, src: str, host: str, port: int = 8080, size: int = 65536, parallel: int = 1) -> list[dict]:
    res = m.lab.exec(src, [PY, "-m", "mesh.lab.echo", "send", host, str(port), str(size), str(parallel)],
                     capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def set_policies(m: MeshLab, docs: list[dict]) -> None:
    """Write the policy file and wait until every agent's live config holds exactly these policies."""
    m.policy_file.write_text(yaml.safe_dump_all(docs))  # type: ignore[attr-defined]
    want = sorted(f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in docs)
    deadline = time.monotonic() + 30  # a hang guard, not a timing assertion: agents poll every 0.5 s
    while time.monotonic() < deadline:
        if all(m.config_dump(n)["policies"] == want for n in m.agents):
            time.sleep(0.2)  # the re-check of live connections runs right after the swap
            return
        time.sleep(0.1)
    raise AssertionError(f"agents did not load policies {want}")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_cross_node_and_same_node_traffic_is_exact_and_carries_identities(mesh):
    client = mesh.lab.pod("client").ip
    for target in ("server", "server-a"):
        (r,) = send(mesh, "client", mesh.lab.pod(target).ip, size=1 << 20)
        assert r["match"] and r["bytes"] == 1 << 20, r
        # The app sees the client pod's own address, not the agent's.
        assert r["server_saw"].split(":")[0] == client
    results = send(mesh, "client", mesh.lab.pod("server").ip, size=200_000, parallel=20)
    assert len(results) == 20 and all(r.get("match") for r in results), results
    time.sleep(0.3)
    dst = mesh.metrics("node-b")
    assert metric(dst, "istio_tcp_connections_opened_total", reporter="destination", source_principal=SLEEP,
                  destination_principal=HTTPBIN, connection_security_policy="mutual_tls",
                  destination_workload="server") >= 21
    assert metric(dst, "istio_tcp_received_bytes_total", reporter="destination", source_principal=SLEEP) >= (
        (1 << 20) + 20 * 200_000)
    src = mesh.metrics("node-a")
    assert metric(src, "istio_tcp_connections_opened_total", reporter="source", source_principal=SLEEP,
                  destination_principal=HTTPBIN) >= 22
    log_b = mesh.log_text("agent-node-b")
    assert re.search(rf'src.identity="{SLEEP}".*dst.identity="{HTTPBIN}".*direction="inbound"', log_b)


def test_service_vip_spreads_over_endpoints_and_skips_a_refusing_one(mesh):
    (svc,) = mesh.lab.state.services
    results = send(mesh, "client", svc.vip, port=80, size=1000, parallel=30)
    assert all(r.get("match") for r in results), results
    servers = Counter(r["server"].split(":")[0] for r in results)
    ips = {mesh.lab.pod(p).ip for p in ("server", "server-a", "server-b2")}
    assert set(servers) <= ips and len(servers) >= 2, servers
    assert mesh.lab.pod("dead").ip not in servers


def test_fabric_carries_only_tls(mesh):
    """Capture node-a's port on the fabric while a marker crosses: only TLS to 15008 may be seen."""
    marker = b"PLAINTEXT-MARKER-" * 64
    dump = mesh.lab.popen("fabric", ["tcpdump", "-Z", "root", "-nn", "-A", "-l", "-i", "n0", "tcp"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
    try:
        time.sleep(1.0)
        code = (
            "import socket,sys;s=socket.create_connection((sys.argv[1],8080));s.recv(64);"
            "s.sendall(bytes.fromhex(sys.argv[2]));s.shutdown(1);"
            "d=b''\nwhile (c:=s.recv(65536)): d+=c\nprint(len(d))"
        )
        res = mesh.lab.exec("client", [PY, "-c", code, mesh.lab.pod("server").ip, marker.hex()],
                            capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() == str(len(marker)), res.stderr
        time.sleep(0.5)
    finally:
        dump.terminate()
        text, _ = dump.communicate(timeout=10)
    assert "PLAINTEXT-MARKER" not in text, "application bytes crossed the fabric in clear"
    assert ".15008: Flags" in text or ".15008 > " in text, "no HBONE traffic seen on the fabric"
    assert ".8080: Flags" not in text, "the app port was reached directly across the fabric"


def test_policies_allow_by_principal_and_namespace_deny_by_port(mesh):
    server = mesh.lab.pod("server").ip
    allow_sleep = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "allow-sleep", "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]}}
    try:
        set_policies(mesh, [allow_sleep])
        assert send(mesh, "client", server)[0].get("match")
        assert "error" in send(mesh, "stranger", server)[0] or not send(mesh, "stranger", server)[0].get("match")

        allow_other = {**allow_sleep, "metadata": {"name": "allow-other", "namespace": "default"},
                       "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                                "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}}
        set_policies(mesh, [allow_other])
        assert send(mesh, "stranger", server)[0].get("match")
        assert not send(mesh, "client", server)[0].get("match")

        before = metric(mesh.metrics("node-b"), "istio_tcp_connections_opened_total", reporter="destination",
                        response_flags="DENY")
        deny_port = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "deny-8080", "namespace": "default"},
                     "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}}
        set_policies(mesh, [deny_port])
        for src in ("client", "stranger"):
            assert not send(mesh, src, server)[0].get("match")
        after = metric(mesh.metrics("node-b"), "istio_tcp_connections_opened_total", reporter="destination",
                       response_flags="DENY")
        assert after >= before + 2
        assert "policy rejection" in mesh.log_text("agent-node-b")
    finally:
        set_policies(mesh, [])
    assert send(mesh, "client", server)[0].get("match")


def test_a_policy_added_while_connected_closes_the_denied_connection(mesh):
    server = mesh.lab.pod("server").ip
    code = (
        "import socket,sys,time\n"
        "s=socket.create_connection((sys.argv[1],8080));s.settimeout(20);s.recv(64)\n"
        "s.sendall(b'ping');print(s.recv(4).decode(),flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "  s.sendall(b'again');d=s.recv(5)\n"
        "  print('closed' if not d else 'open:'+d.decode(),flush=True)\n"
        "except OSError as e:\n"
        "  print('closed',type(e).__name__,flush=True)\n"
    )
    proc = mesh.lab.popen("client", [PY, "-c", code, server], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
    try:
        assert proc.stdout.readline().strip() == "ping"
        set_policies(mesh, [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                             "metadata": {"name": "deny-sleep", "namespace": "default"},
                             "spec": {"action": "DENY",
                                      "rules": [{"from": [{"source": {"principals": [
                                          "cluster.local/ns/default/sa/sleep"]}}]}]}}])
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("closed")
    finally:
        proc.kill()
        proc.wait()
        set_policies(mesh, [])


def test_dead_destination_agent_gives_a_prompt_refusal_then_recovers(mesh):
    server = mesh.lab.pod("server").ip
    mesh.stop_agent("node-b")
    try:
        code = (
            "import socket,sys\n"
            "try:\n"
            "  s=socket.create_connection((sys.argv[1],8080),timeout=8);d=s.recv(64)\n"
            "  print('eof' if not d else 'data')\n"
            "except TimeoutError: print('timeout')\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        res = mesh.lab.exec("client", [PY, "-c", code, server], capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() in ("ConnectionResetError", "ConnectionRefusedError", "eof"), res.stdout
    finally:
        mesh.start_agent("node-b")
        mesh.wait_ready("node-b")
    (r,) = send(mesh, "client", server)
    assert r.get("match"), r
    assert "(adopted)" in mesh.log_text("agent-node-b")


def test_agents_config_dump_and_readiness(mesh):
    dump = mesh.config_dump("node-a")
    pods = {p["name"]: p for p in dump["pods"].values()}
    assert set(pods) == {"client", "stranger", "server-a"}
    assert pods["client"]["identity"] == SLEEP
    assert dump["redirection"] == mesh.redirect
    assert not dump["installErrors"]


def test_plaintext_to_a_mesh_pod_from_outside_the_mesh_is_served_with_the_real_source(mesh):
    # The node itself (a kubelet probe) reaches the app uncaptured; the agent's config is not involved.
    node_b = mesh.lab.node("node-b")
    code = "import socket,sys;s=socket.create_connection((sys.argv[1],8080),timeout=5);print(s.recv(64).decode())"
    res = mesh.lab.exec("node-b", [PY, "-c", code, mesh.lab.pod("server").ip], capture_output=True, text=True)
    assert res.stdout.split(":")[0] == node_b.gateway, res.stdout + res.stderr
    assert socket  # keep the import for the helper code above


async def test_a_forged_forwarded_header_does_not_change_the_source_policy_sees(mesh):
    """ipBlocks policy sees the tunnel's real source, not what the caller writes in `forwarded`."""
    import socket as _socket
    from datetime import timedelta

    from mesh.ca import CertificateAuthority
    from mesh.hbone import HbonePool, TunnelRefused, TunnelRequest
    from mesh.identity import SpiffeId
    from mesh.netns import socket_in_netns

    server, client, stranger = mesh.lab.pod("server"), mesh.lab.pod("client"), mesh.lab.pod("stranger")
    set_policies(mesh, [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                         "metadata": {"name": "only-client-ip", "namespace": "default"},
                         "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                                  "rules": [{"from": [{"source": {"ipBlocks": [f"{client.ip}/32"]}}]}]}}])
    ca = CertificateAuthority.load(mesh.workdir / "ca")
    cert = ca.issue_workload(SpiffeId.parse("spiffe://cluster.local/ns/other/sa/stranger"), ttl=timedelta(minutes=5))

    async def factory() -> _socket.socket:
        s = socket_in_netns(stranger.netns_path)
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_MARK, 0x539)  # the agent's mark: not captured
        return s

    pool = HbonePool(bundle=cert.roots, socket_factory=factory)
    try:
        with pytest.raises(TunnelRefused) as refused:
            await pool.connect(cert, (server.ip, 15008), [HTTPBIN],
                               TunnelRequest(authority=f"{server.ip}:8080", src_addr=(client.ip, 40000)))
        assert refused.value.status == 401
    finally:
        await pool.close()
        set_policies(mesh, [])


def test_shutdown_drains_live_connections_then_the_next_agent_takes_over(mesh):
    """SIGTERM: no new connections, live ones keep working through the drain period, then are cut."""
    server = mesh.lab.pod("server").ip
    mesh.stop_agent("node-b")
    mesh.start_agent("node-b", ["--drain", "8"])
    mesh.wait_ready("node-b")
    code = (
        "import socket,sys\n"
        "s=socket.create_connection((sys.argv[1],8080));s.settimeout(20);s.recv(64)\n"
        "for line in sys.stdin:\n"
        "  try:\n"
        "    s.sendall(b'ping');d=s.recv(4);print(d.decode() or 'eof',flush=True)\n"
        "  except OSError as e:\n"
        "    print(type(e).__name__,flush=True)\n"
    )
    proc = mesh.lab.popen("client", [PY, "-c", code, server], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)

    def exchange() -> str:
        proc.stdin.write("\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    agent = mesh.agents["node-b"]
    try:
        assert exchange() == "ping"
        agent.send_signal(15)
        time.sleep(0.5)
        assert exchange() == "ping", "a live connection must survive the start of the drain"
        # New connections are not taken while draining: refused at once, not left hanging.
        assert "error" in send(mesh, "client", server)[0]
        assert agent.wait(30) == 0
        assert exchange() != "ping", "after the drain period the connection is cut"
    finally:
        proc.kill()
        proc.wait()
        mesh.agents.pop("node-b", None)
        mesh.start_agent("node-b")
        mesh.wait_ready("node-b")
    assert send(mesh, "client", server)[0].get("match")


def test_an_agent_started_before_its_ca_waits_for_it_instead_of_exiting(mesh):
    server = mesh.lab.pod("server").ip
    mesh.stop_agent("node-b")
    mesh.stop_ca()
    try:
        agent = mesh.start_agent("node-b")
        time.sleep(2.0)
        assert agent.poll() is None, mesh.log_tail("agent-node-b")
        assert "not reachable" in mesh.log_text("agent-node-b")
    finally:
        mesh.start_ca()
    mesh.wait_ready("node-b")
    assert send(mesh, "client", server)[0].get("match")

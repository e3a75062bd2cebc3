"""The lab for real: namespaces, veths, routes; traffic across nodes; clean teardown; the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mesh.lab import Lab, destroy_prefix
from mesh.lab.build import _list_netns
from mesh.lab.state import lab_prefix, state_path

from .conftest import unique_lab_name

PY = sys.executable
NODEMESH = [PY, "-m", "mesh.cli"]


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def start_echo(lab: Lab, pod: str, port: int = 8080) -> subprocess.Popen:
    proc = lab.popen(pod, [PY, "-m", "mesh.lab.echo", "serve", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("listening")
    return proc


def echo(lab: Lab, src: str, ip: str, port: int = 8080, size: int = 262144) -> dict:
    res = lab.exec(src, [PY, "-m", "mesh.lab.echo", "send", ip, str(port), str(size)],
                   capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_pods_reach_each_other_across_and_within_nodes(make_lab):
    lab = make_lab({
        "nodes": [
            {"name": "node-a", "pods": [{"name": "client"}, {"name": "neighbour"}]},
            {"name": "node-b", "pods": [{"name": "server"}]},
        ]
    })
    client, neighbour, server = lab.pod("client"), lab.pod("neighbour"), lab.pod("server")
    assert lab.exec("client", ["ping", "-c1", "-W2", server.ip], capture_output=True).returncode == 0
    assert lab.exec("client", ["ping", "-c1", "-W2", neighbour.ip], capture_output=True).returncode == 0
    procs = [start_echo(lab, "server"), start_echo(lab, "neighbour")]
    try:
        across = echo(lab, "client", server.ip)
        same = echo(lab, "client", neighbour.ip)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for r in (across, same):
        assert r["match"] and r["bytes"] == 262144
        # Routed, no NAT: the server sees the client's own pod address.
        assert r["server_saw"].split(":")[0] == client.ip


def test_pod_interfaces_and_routes_look_like_a_routed_cni(lab):
    client = lab.pod("client")
    addrs = lab.exec("client", ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], capture_output=True, text=True)
    assert f"inet {client.ip}/32" in addrs.stdout
    routes = lab.exec("client", ["ip", "route"], capture_output=True, text=True).stdout
    assert f"default via {client.gateway} dev eth0" in routes
    fwd = lab.exec("node-a", ["sysctl", "-n", "net.ipv4.ip_forward"], capture_output=True, text=True).stdout
    assert fwd.strip() == "1"


def test_down_leaves_no_netns_veth_or_bridge(require_root):
    before_links = root_links()
    name = unique_lab_name()
    from mesh.lab import load_topology

    from .conftest import TWO_NODES

    lab = Lab.up(load_topology(TWO_NODES), name=name)
    # A process left running in a pod would keep its netns and veth alive: down must handle it.
    sleeper = lab.popen("client", ["sleep", "60"])
    try:
        assert sum(n.startswith(lab_prefix(name)) for n in _list_netns()) == 5
        assert root_links() == before_links, "lab links must never appear in the root namespace"
        lab.down()
    finally:
        sleeper.kill()
        sleeper.wait()
        destroy_prefix(lab_prefix(name))
    assert not [n for n in _list_netns() if n.startswith(lab_prefix(name))]
    assert not state_path(name).exists()
    assert root_links() == before_links


def test_two_labs_with_the_same_addresses_coexist(make_lab):
    one, two = make_lab(), make_lab()
    assert one.pod("server").ip == two.pod("server").ip
    proc = start_echo(one, "server")
    try:
        assert echo(one, "client", one.pod("server").ip)["match"]
        # The second lab's identical address is a different pod: nothing listens there.
        res = two.exec("client", [PY, "-m", "mesh.lab.echo", "send", two.pod("server").ip, "8080", "16"],
                       capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and "refused" in res.stdout.lower()
    finally:
        proc.kill()
        proc.wait()


def test_cli_up_status_exec_down_from_other_processes(tmp_path, require_root):
    name = unique_lab_name()
    topo = tmp_path / "topo.yaml"
    topo.write_text(
        "nodes:\n"
        "  - name: node-a\n    pods: [{name: client, serviceAccount: sleep}]\n"
        "  - name: node-b\n    pods: [{name: server, serviceAccount: httpbin}]\n"
    )
    try:
        up = subprocess.run([*NODEMESH, "lab", "up", str(topo), "--name", name], capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        assert "pod default/client" in up.stdout and "node node-b" in up.stdout
        st = subprocess.run([*NODEMESH, "lab", "status", "--name", name, "--json"], capture_output=True, text=True)
        data = json.loads(st.stdout)
        server_ip = next(p["ip"] for p in data["pods"] if p["name"] == "server")
        assert {n["name"] for n in data["nodes"]} == {"node-a", "node-b"}
        ex = subprocess.run([*NODEMESH, "lab", "exec", "--name", name, "client", "--", "ping", "-c1", "-W2", server_ip],
                            capture_output=True, text=True)
        assert ex.returncode == 0, ex.stdout + ex.stderr
        bad = subprocess.run([*NODEMESH, "lab", "exec", "--name", name, "nosuchpod", "--", "true"],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "no pod or node 'nosuchpod'" in bad.stderr
    finally:
        down = subprocess.run([*NODEMESH, "lab", "down", "--name", name], capture_output=True, text=True)
    assert down.returncode == 0 and "removed 5 network namespaces" in down.stdout
    assert not [n for n in _list_netns() if n.startswith(lab_prefix(name))]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("nodes:\n  - name: a\n    pods: [{name: p}]\n  - name: b\n    pods: [{name: p}]\n", "duplicate pod name 'p'"),
        ("nodes:\n  - name: a\n    pods: [{name: p, colour: red}]\n", "nodes[0].pods[0].colour: unknown field"),
        ("nodes:\n  - name: a\n    podCidr: 10.0.0.0/33\n", "nodes[0].podCidr"),
    ],
)
def test_cli_up_of_an_invalid_file_fails_clearly_and_creates_nothing(tmp_path, require_root, body, needle):
    name = unique_lab_name()
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    res = subprocess.run([*NODEMESH, "lab", "up", str(f), "--name", name], capture_output=True, text=True)
    assert res.returncode == 2
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, "one clear line, not a traceback"
    assert not [n for n in _list_netns() if n.startswith(lab_prefix(name))]
    assert not state_path(name).exists()


def test_down_all_selects_only_the_tools_own_prefix(require_root):
    """`down --all` removes nm-* namespaces only; a foreign netns with a similar name survives."""
    foreign = f"xnm-{unique_lab_name()}"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    name = unique_lab_name()
    own = f"{lab_prefix(name)}stray"
    subprocess.run(["ip", "netns", "add", own], check=True)
    try:
        # The same sweep `down --all` does, limited to this test's own lab prefix so that labs other tests
        # or a demo are using at the same time are left alone.
        removed = destroy_prefix(lab_prefix(name))
        assert removed == [own]
        assert foreign in _list_netns()
        with pytest.raises(Exception, match="outside the lab prefix"):
            destroy_prefix("x")
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=False)
        subprocess.run(["ip", "netns", "del", own], check=False, capture_output=True)


def test_twenty_pods_come_up_quickly_and_all_answer(make_lab, capsys):
    nodes = [
        {"name": f"node-{c}", "pods": [{"name": f"p{c}{i}"} for i in range(10)]} for c in "ab"
    ]
    t0 = time.monotonic()
    lab = make_lab({"nodes": nodes})
    elapsed = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n[lab] 2 nodes x 10 pods up in {elapsed:.2f}s")
    ips = " ".join(p.ip for p in lab.state.pods)
    # fping is not assumed: one shell loop of single pings, bounded by -W.
    res = lab.exec("pa0", ["sh", "-c", f"for ip in {ips}; do ping -c1 -W2 $ip >/dev/null || echo FAIL $ip; done"],
                   capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == ""
    assert os.path.exists(lab.state.pods[0].netns_path)

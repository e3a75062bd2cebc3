"""Redirection for real, in lab namespaces, for both backends: capture with the original
addresses, no loops, exclusions and node probes, exact removal, 100 add/remove cycles,
and in-process re-configuration. (Restart, crash and failure cases: test_redirect_process.py.)

Root only. Every test uses its own lab, bpffs root and state directory, and removes them
also when it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import pytest

from agent.redirect import RedirectController, RedirectError
from agent.redirect.cleanup import cleanup_stale
from agent.redirect.exclusions import EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_PORTS
from agent.redirect.model import PodNetInfo
from mesh.netns import netns_cookie, socket_in_netns

from .test_redirect_support import Relay, echo_from, exchange, pod_info, read_line, start_echo

pytestmark = pytest.mark.root

BACKENDS = ["ebpf", "nftables"]

FOUR_PODS = {
    "nodes": [
        {"name": "node-a", "pods": [{"name": "client"}, {"name": "c2"}]},
        {"name": "node-b", "pods": [{"name": "server"}, {"name": "other"}]},
    ]
}


@pytest.fixture
def paths(tmp_path) -> Iterator[tuple[str, str]]:
    """A private bpffs root and state directory; whatever a failed test left there is removed."""
    root = f"/sys/fs/bpf/nodemesh-test-{secrets.token_hex(4)}"
    state = str(tmp_path / "state")
    yield root, state
    cleanup_stale(root, state)
    if os.path.isdir(root):
        from agent.redirect.ebpf import detach_pinned, pinned_links

        for path in pinned_links(root).values():
            detach_pinned(path)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def controllers(paths) -> Iterator[Callable[[str], RedirectController]]:
    made: list[RedirectController] = []

    def make(backend: str) -> RedirectController:
        ctl = RedirectController(backend=backend, bpffs_root=paths[0], state_dir=paths[1])
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        try:
            ctl.remove_all()
        finally:
            ctl.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    running: list[subprocess.Popen] = []
    yield running
    for p in running:
        p.kill()
        p.wait(10)


def in_netns(lab, where: str, argv: list[str]) -> subprocess.CompletedProcess:
    return lab.exec(where, argv, capture_output=True, text=True, timeout=30)


def kernel_leftovers(lab, pod_names: list[str]) -> list[str]:
    """What `bpftool`, `ip rule`, `ip route`, `nft` and `ss` show of redirection in these pods."""
    found: list[str] = []
    inodes = {os.stat(lab.pod(n).netns_path).st_ino: n for n in pod_names}
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True).stdout or "[]")
    found += [f"link {lk['id']} in {inodes[lk['netns_ino']]}" for lk in links if lk.get("netns_ino") in inodes]
    for n in pod_names:
        rules = json.loads(in_netns(lab, n, ["ip", "-j", "rule", "show"]).stdout)
        found += [f"{n}: rule {r}" for r in rules if r.get("priority") not in (0, 32766, 32767)]
        table = in_netns(lab, n, ["ip", "route", "show", "table", "15001"]).stdout.strip()
        if table:
            found.append(f"{n}: routes {table}")
        ruleset = in_netns(lab, n, ["nft", "list", "ruleset"]).stdout.strip()
        if ruleset:
            found.append(f"{n}: nft {ruleset[:60]}")
        ours = "( sport = :15001 or sport = :15006 or sport = :15008 )"
        listening = in_netns(lab, n, ["ss", "-Htln", ours]).stdout.strip()
        if listening:
            found.append(f"{n}: listening {listening}")
        accept_local = in_netns(lab, n, ["sysctl", "-n", "net.ipv4.conf.eth0.accept_local"]).stdout.strip()
        if accept_local != "0":
            found.append(f"{n}: accept_local={accept_local}")
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_connections_keep_their_addresses_and_never_loop(make_lab, controllers, procs, backend):
    lab = make_lab()
    client, server = lab.pod("client"), lab.pod("server")
    ctl = controllers(backend)
    assert ctl.backend == backend
    red_c = ctl.install(pod_info(client))
    red_s = ctl.install(pod_info(server))
    procs.append(start_echo(lab, "server", 8080))

    with Relay([red_c, red_s]) as relay:
        res = echo_from(lab, "client", server.ip, 8080, size=200_000)
        assert res.get("match") is True and res["bytes"] == 200_000, res
        seen = relay.seen()

    # The unmodified client's connection landed on client's 15001 with its original
    # destination and its own address as the peer; the agent's (marked) onward connection
    # landed on server's 15006 with the same destination and the client pod's real IP.
    client_local = res["local"].rsplit(":", 1)
    assert [(a.pod, a.listener) for a in seen] == [("client", "outbound"), ("server", "inbound")], seen
    assert seen[0].original_dst == (server.ip, 8080)
    assert seen[0].peer == (client_local[0], int(client_local[1]))
    assert seen[1].original_dst == (server.ip, 8080)
    assert seen[1].peer[0] == client.ip
    # Exactly two captures: the agent's own connections (to the server pod, and from the
    # server's agent to the app on the pod IP) were never captured again.
    if backend == "ebpf":
        assert ctl.counters(client.uid)["outbound_steered"] == 1
        assert ctl.counters(server.uid)["inbound_steered"] == 1

    # 15008 is not captured: a marked connection from the client pod reaches the server's
    # HBONE listener directly, with the real addresses.
    s = red_c.socket()
    s.settimeout(10)
    s.connect((server.ip, 15008))
    red_s.listeners.hbone.settimeout(10)
    conn, peer = red_s.listeners.hbone.accept()
    assert conn.getsockname() == (server.ip, 15008) and peer[0] == client.ip
    conn.close()
    s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusions_and_node_probes_pass_uncaptured(make_lab, controllers, procs, backend):
    lab = make_lab(FOUR_PODS)
    client, server, other = lab.pod("client"), lab.pod("server"), lab.pod("other")
    ctl = controllers(backend)
    red = ctl.install(pod_info(client))
    # Annotations arrive later (or change): installing again reconfigures in place.
    annotations = {
        EXCLUDE_INBOUND_PORTS: "9090",
        EXCLUDE_OUTBOUND_PORTS: "7070",
        EXCLUDE_OUTBOUND_IP_RANGES: f"{other.ip}/32",
    }
    assert ctl.install(pod_info(client, annotations)) is red
    for where, port in (("server", 7070), ("server", 8080), ("other", 8080), ("client", 9090), ("client", 8080)):
        procs.append(start_echo(lab, where, port))

    def direct(res: dict) -> bool:
        assert res.get("match") is True, res
        return res["server_saw"] == res["local"]

    with Relay([red]) as relay:
        assert direct(echo_from(lab, "client", server.ip, 7070)), "excluded outbound port was captured"
        assert direct(echo_from(lab, "client", other.ip, 8080)), "excluded outbound range was captured"
        assert direct(echo_from(lab, "server", client.ip, 9090)), "excluded inbound port was captured"
        probe = echo_from(lab, "node-a", client.ip, 8080)
        assert direct(probe), "node-originated probe was captured"
        assert probe["local"].startswith(client.gateway + ":")
        # Everything else still is captured.
        assert not direct(echo_from(lab, "client", server.ip, 8080))
        assert not direct(echo_from(lab, "server", client.ip, 8080))
        seen = relay.seen()
    assert [(a.listener, a.original_dst) for a in seen] == [
        ("outbound", (server.ip, 8080)),
        ("inbound", (client.ip, 8080)),
    ]
    assert seen[1].peer[0] == server.ip


@pytest.mark.parametrize("backend", BACKENDS)
def test_removal_is_exact_and_100_cycles_leak_nothing(make_lab, controllers, paths, backend):
    lab = make_lab(FOUR_PODS)
    names = ["client", "c2", "server", "other"]
    pods = [pod_info(lab.pod(n)) for n in names]
    ctl = controllers(backend)
    ctl.prepare()

    # Once, with everything installed: the tools see it.
    for p in pods:
        ctl.install(p)
    assert len(kernel_leftovers(lab, names)) >= 4
    for p in pods:
        assert ctl.remove(p.uid) is True
    assert kernel_leftovers(lab, names) == []

    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    for _ in range(25):
        for p in pods:
            ctl.install(p)
        for p in pods:
            ctl.remove(p.uid)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before
    assert kernel_leftovers(lab, names) == []
    for n in names:
        assert ctl.status(lab.pod(n).netns_path).installed() == []
    assert os.listdir(paths[1]) == []
    assert not os.path.isdir(paths[0]) or os.listdir(paths[0]) == []
    assert ctl.remove(pods[0].uid) is False

    if backend == "ebpf":
        prog = ctl._program
        assert prog is not None
        for p in pods:
            assert set(prog.pod_entries(IPv4Address(p.ip)).values()) == {0}
        prog_id = prog.prog_id
        ctl.close()
        progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout)
        assert prog_id not in {p["id"] for p in progs}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_fails_cleanly_and_leaves_nothing(make_lab, controllers, paths, backend):
    lab = make_lab()
    client, server = lab.pod("client"), lab.pod("server")
    ctl = controllers(backend)
    with pytest.raises(RedirectError, match="nm-nope"):
        ctl.install(PodNetInfo(uid="default/ghost", netns="/run/netns/nm-nope", ip="10.9.9.9"))
    with pytest.raises(RedirectError, match="interface 'eth9' not found"):
        ctl.install(PodNetInfo(uid=client.uid, netns=client.netns_path, ip=client.ip, eth0="eth9"))
    ctl.install(pod_info(client))
    with pytest.raises(RedirectError, match=f"IP {client.ip} is already used"):
        ctl.install(PodNetInfo(uid="default/twin", netns=server.netns_path, ip=client.ip))
    ctl.remove(client.uid)
    assert kernel_leftovers(lab, ["client", "server"]) == []
    assert os.listdir(paths[1]) == []


def test_sockets_made_in_a_pod_namespace_live_there(make_lab):
    lab = make_lab()
    client, server = lab.pod("client"), lab.pod("server")
    assert netns_cookie(client.netns_path) != netns_cookie(server.netns_path) != netns_cookie("/proc/self/ns/net")
    s = socket_in_netns(client.netns_path)
    s.bind((client.ip, 0))  # the pod's address exists only inside its namespace
    s.close()
    procs = [start_echo(lab, "server", 8080)]
    try:
        c = socket_in_netns(client.netns_path)
        c.settimeout(10)
        c.connect((server.ip, 8080))
        assert read_line(c).decode().startswith(client.ip + ":")
        assert exchange(c, b"ping") == b"ping"
        c.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pod_handed_over_as_an_fd(make_lab, controllers, paths, backend):
    """The CNI hands the agent a namespace fd, not a path; the controller keeps its own."""
    lab = make_lab()
    client = lab.pod("client")
    ctl = controllers(backend)
    fd = os.open(client.netns_path, os.O_RDONLY)
    try:
        info = pod_info(client)
        red = ctl.install(PodNetInfo(uid=info.uid, netns=fd, ip=info.ip, node_addresses=info.node_addresses))
    finally:
        os.close(fd)  # the caller's fd may go; the controller holds a duplicate
    assert red.netns_fd >= 0
    assert ctl.status(client.netns_path).records == [client.uid]
    # A restarted agent cannot re-open an fd: such pods wait for the caller to install again.
    later = RedirectController(backend=backend, bpffs_root=paths[0], state_dir=paths[1])
    try:
        assert later.adopt_existing() == []
    finally:
        later.close()
    assert ctl.remove(client.uid)
    assert kernel_leftovers(lab, ["client"]) == []

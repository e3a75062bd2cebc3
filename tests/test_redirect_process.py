"""Redirection across agent processes: restart and re-adoption, crash leftovers and the
operator CLI, and the one-line errors (with fallback) when eBPF cannot work.

The "agent" here is ``python -m tests.test_redirect_support agent ...``: it installs or
re-adopts redirection through the real controller and relays captured connections.
Root only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.redirect import RedirectController
from agent.redirect.cleanup import cleanup_stale
from agent.redirect.exclusions import EXCLUDE_OUTBOUND_PORTS
from mesh.netns import socket_in_netns

from .test_redirect_lab import kernel_leftovers
from .test_redirect_support import PY, REPO, echo_from, exchange, read_line, start_echo

pytestmark = pytest.mark.root

BACKENDS = ["ebpf", "nftables"]
CLI = [PY, "-m", "mesh.cli"]


@pytest.fixture
def paths(tmp_path) -> Iterator[tuple[str, str]]:
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
def procs() -> Iterator[list[subprocess.Popen]]:
    running: list[subprocess.Popen] = []
    yield running
    for p in running:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def pod_arg(pod: Any, annotations: dict[str, str] | None = None, netns: str | None = None) -> dict[str, Any]:
    return {
        "uid": pod.uid,
        "netns": netns or pod.netns_path,
        "ip": pod.ip,
        "name": pod.name,
        "namespace": pod.namespace,
        "gateway": pod.gateway,
        "annotations": annotations or {},
    }


def agent_argv(mode: str, backend: str, paths: tuple[str, str], pods: list[dict] | None = None) -> list[str]:
    argv = [PY, "-m", "tests.test_redirect_support", "agent", mode, "--backend", backend]
    argv += ["--bpffs-root", paths[0], "--state-dir", paths[1]]
    if pods is not None:
        argv += ["--pods", json.dumps(pods)]
    return argv


def start_agent(procs: list, argv: list[str], **kw: Any) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    procs.append(p)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait(10)
        raise AssertionError(f"agent exited: {p.stderr.read() if p.stderr else ''}")
    return p, json.loads(line)


def attempt(netns: str, ip: str, port: int) -> str:
    """Connect from an (unmarked) socket in ``netns``: "connected", "refused" or "no answer"."""
    s = socket_in_netns(netns)
    s.settimeout(2)
    try:
        s.connect((ip, port))
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "no answer"
    finally:
        s.close()


def crash(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_readopts_pods_and_leaves_live_connections_alone(make_lab, paths, procs, backend):
    lab = make_lab()
    client, server = lab.pod("client"), lab.pod("server")
    for where, port in (("client", 8080), ("server", 7070)):
        procs.append(start_echo(lab, where, port))
    pods = [pod_arg(client, {EXCLUDE_OUTBOUND_PORTS: "7070"})]
    first, info = start_agent(procs, agent_argv("install", backend, paths, pods))
    assert info["backend"] == backend and info["pods"] == [{"uid": client.uid, "adopted": False}]
    assert echo_from(lab, "server", client.ip, 8080).get("match") is True  # captured and relayed

    # Two long-lived connections through the pod that do not use the agent: a node probe
    # into the app and the app's own connection to an excluded port.
    probe = socket_in_netns(lab.node("node-a").netns_path)
    probe.settimeout(10)
    probe.connect((client.ip, 8080))
    assert read_line(probe).startswith(client.gateway.encode() + b":")
    app = socket_in_netns(client.netns_path)
    app.settimeout(10)
    app.connect((server.ip, 7070))
    assert read_line(app).startswith(client.ip.encode() + b":")
    assert exchange(probe, b"before") == b"before" and exchange(app, b"before") == b"before"
    rules_before = RedirectController(bpffs_root=paths[0], state_dir=paths[1]).status(client.netns_path).rules

    crash(first)
    # While no agent runs, steering stays and fails closed: never around the mesh. nftables
    # redirects to a port nobody listens on (refused at once); sk_lookup drops the SYN, so
    # the client retransmits it, and a connection begun in the gap completes once the next
    # agent has taken over.
    waiting = None
    if backend == "nftables":
        gap = echo_from(lab, "server", client.ip, 8080)
        assert "refused" in gap.get("error", "").lower(), gap
    else:
        # A plain client with a generous connect timeout: SYN retries come at 1, 3, 7, 15 s.
        dial = (
            "import json, socket, sys\n"
            f"s = socket.create_connection(({client.ip!r}, 8080), timeout=40)\n"
            "saw = s.makefile().readline().strip()\n"
            "print(json.dumps({'server_saw': saw, 'local': '%s:%d' % s.getsockname()}))\n"
        )
        waiting = lab.popen("server", [PY, "-c", dial], stdout=subprocess.PIPE, text=True)
        procs.append(waiting)
        viewer = RedirectController(bpffs_root=paths[0], state_dir=paths[1])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the SYN has been dropped at least once
            links = viewer.status(client.netns_path).links
            if links and links[0].counters.get(client.ip, {}).get("refused_no_listener", 0) >= 1:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the connection attempt during the gap never reached the pod")

    _second, info = start_agent(procs, agent_argv("adopt", backend, paths))
    assert info["pods"] == [{"uid": client.uid, "adopted": True}]
    if waiting is not None:
        out, _ = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, "a connection begun while the agent was down failed"
        late = json.loads(out)
        assert late["server_saw"] and late["server_saw"] != late["local"]  # relayed, not direct
    again = echo_from(lab, "server", client.ip, 8080)
    assert again.get("match") is True and again["server_saw"] != again["local"], again
    assert exchange(probe, b"after restart") == b"after restart"
    assert exchange(app, b"after restart") == b"after restart"
    status = RedirectController(bpffs_root=paths[0], state_dir=paths[1]).status(client.netns_path)
    assert status.rules == rules_before
    if backend == "ebpf":
        assert [lk.prog_name for lk in status.links] == ["nm_sk_lookup"]
        assert status.links[0].pinned_at is not None
    probe.close()
    app.close()

    crash(_second)
    assert RedirectController(bpffs_root=paths[0], state_dir=paths[1]).remove(client.uid) is True
    assert kernel_leftovers(lab, ["client"]) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_shows_and_cleans_up_after_a_crashed_agent(make_lab, paths, procs, backend):
    lab = make_lab(
        {"nodes": [{"name": "node-a", "pods": [{"name": "client"}, {"name": "c2"}]},
                   {"name": "node-b", "pods": [{"name": "server"}]}]}
    )
    client, c2 = lab.pod("client"), lab.pod("c2")
    procs.append(start_echo(lab, "client", 8080))
    agent, _ = start_agent(procs, agent_argv("install", backend, paths, [pod_arg(client), pod_arg(c2)]))
    crash(agent)
    common = ["--bpffs-root", paths[0], "--state-dir", paths[1]]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "redirect", *args, *common], capture_output=True, text=True, cwd=REPO, timeout=60)

    shown = cli("show", client.netns, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["records"] == [client.uid]
    assert status["listeners"] == []  # they died with the agent
    if backend == "ebpf":
        assert [lk["prog_name"] for lk in status["links"]] == ["nm_sk_lookup"]
        assert status["links"][0]["map_entries"][client.ip]["pods"] == 1
        assert "9002: ipproto tcp lookup 15001" in status["rules"]
    else:
        assert status["nft_table"] and "redirect to :15006" in status["nft_table"]
    assert "listeners: none" in cli("show", client.netns).stdout
    # With the agent dead the pod is unreachable (fail closed) ...
    assert attempt(lab.pod("server").netns_path, client.ip, 8080) in ("refused", "no answer")

    listed = cli("list")
    assert client.ip in listed.stdout and c2.ip in listed.stdout and "alive" in listed.stdout

    cleaned = cli("cleanup", client.netns)
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed state record {client.uid}" in cleaned.stdout
    assert kernel_leftovers(lab, ["client"]) == []
    # ... and after the cleanup it is reached directly again.
    direct = echo_from(lab, "server", client.ip, 8080)
    assert direct.get("match") is True and direct["server_saw"] == direct["local"]

    # c2's namespace disappears while its agent is dead: --stale finds what is left of it.
    lab.down()
    stale = cli("cleanup", "--stale")
    assert stale.returncode == 0, stale.stderr
    assert f"state record {c2.uid}" in stale.stdout
    if backend == "ebpf":
        assert "namespace gone" in stale.stdout
    assert os.listdir(paths[1]) == []
    assert not os.path.isdir(paths[0]) or os.listdir(paths[0]) == []

    bad = cli("show", "nm-no-such-ns")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nm-no-such-ns" in bad.stderr


DROP_BPF = ["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--inh-caps=-bpf,-sys_admin,-perfmon", "--"]


def test_without_cap_bpf_auto_falls_back_to_nftables_with_one_line(make_lab, paths, procs):
    lab = make_lab()
    client = lab.pod("client")
    procs.append(start_echo(lab, "client", 8080))
    # The agent starts inside the pod's namespace with CAP_BPF and CAP_SYS_ADMIN dropped
    # (without CAP_SYS_ADMIN it cannot setns; the namespace it is in needs no entering).
    pods = [pod_arg(client)]
    argv = ["ip", "netns", "exec", client.netns, *DROP_BPF, *agent_argv("install", "auto", paths, pods)]
    agent, info = start_agent(procs, argv)
    assert info["backend"] == "nftables"
    assert "not permitted to load eBPF programs" in info["fallback"]
    relayed = echo_from(lab, "server", client.ip, 8080)
    assert relayed.get("match") is True and relayed["server_saw"] != relayed["local"]  # captured by nftables
    crash(agent)
    stderr = agent.stderr.read() if agent.stderr else ""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "eBPF redirection unavailable: not permitted" in lines[0] and "nftables" in lines[0]
    assert RedirectController(backend="nftables", bpffs_root=paths[0], state_dir=paths[1]).remove(client.uid)
    assert kernel_leftovers(lab, ["client"]) == []

    explicit = subprocess.run(
        ["ip", "netns", "exec", client.netns, *DROP_BPF, *agent_argv("install", "ebpf", paths, pods), "--exit"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert explicit.returncode == 3
    err = [ln for ln in explicit.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "ebpf redirection unavailable: not permitted to load eBPF programs" in err[0]
    assert kernel_leftovers(lab, ["client"]) == []


def test_missing_kernel_headers_fall_back_with_one_line(make_lab, paths):
    lab = make_lab()
    client = lab.pod("client")
    env = {**os.environ, "BCC_KERNEL_SOURCE": f"/nonexistent-{secrets.token_hex(3)}"}
    for backend, code in (("auto", 0), ("ebpf", 3)):
        res = subprocess.run(
            [*agent_argv("solo", backend, paths, [pod_arg(client)]), "--exit"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == code, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, res.stderr
        assert "kernel headers" in lines[0] and "missing" in lines[0]
        if backend == "auto":
            assert "falling back to the nftables backend" in lines[0]
            assert json.loads(res.stdout)["backend"] == "nftables"
    assert kernel_leftovers(lab, ["client"]) == []


def test_cli_is_registered_as_a_nodemesh_command():
    res = subprocess.run([*CLI, "redirect", "--help"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "show" in res.stdout and "cleanup" in res.stdout
    assert sys.executable  # the same interpreter runs the CLI as the tests

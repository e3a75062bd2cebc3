"""Runs the mesh in a netns lab: a CA, and one agent per node, each a real process in its node's namespace.

The CA listens on the first node's fabric address (every node reaches it over the fabric, as agents reach
a CA Service in a cluster); each agent gets its own node certificate and runs with `--config lab:NAME`.
Used by the demo, the end-to-end tests and the benchmarks; everything it starts is stopped by `stop()`.

With `kube=LabKube` (the lab's API server, `mesh.lab.kube`) it runs as in a cluster instead: the CA with
`--placement kube --auth tokenreview`, agents with `--config kube`, each holding a service-account token
bound to its node (registered in the API server double, as the kubelet's projected token would be), and
each agent chaining its CNI plugin into its node's network configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.lab import Lab

CA_PORT = 15012
AGENT_ACCOUNT = ("nodemesh-system", "nodemesh-agent")
CA_ACCOUNT = ("nodemesh-system", "nodemesh-ca")
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


def http_get_in_netns(netns_path: str, host: str, port: int, path: str, timeout: float = 5.0,
                      method: str = "GET") -> tuple[int, str]:
    """A plain HTTP/1.0 request from inside a namespace (the agents' ports live in node namespaces)."""
    import socket

    from mesh.netns import socket_in_netns

    s = socket_in_netns(netns_path, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode())
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body.decode(errors="replace")


@dataclass
class MeshLab:
    lab: Lab
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nodemesh-mesh-")))
    redirect: str = "auto"
    cert_ttl: float | None = None
    extra_agent_args: list[str] = field(default_factory=list)
    kube: Any = None  # mesh.lab.kube.LabKube: run in Kubernetes mode against the lab's API server
    ca_proc: subprocess.Popen | None = None
    agents: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def ca_node(self) -> str:
        return self.lab.state.nodes[0].name

    @property
    def ca_url(self) -> str:
        return f"https://{self.lab.node(self.ca_node).fabric_ip}:{CA_PORT}"

    def _nodemesh(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mesh.cli", *args]

    def start(self, timeout: float = 60.0) -> MeshLab:
        ca_dir = self.workdir / "ca"
        subprocess.run(self._nodemesh("ca", "init", str(ca_dir), "--trust-domain", self.lab.state.trust_domain),
                       check=True, capture_output=True)
        ca_args = ["ca", "serve", "--ca-dir", str(ca_dir), "--listen",
                   f"{self.lab.node(self.ca_node).fabric_ip}:{CA_PORT}"]
        if self.kube is not None:
            ca_args += ["--placement", "kube", "--auth", "tokenreview", "--kubeconfig", str(self._kube_identities()),
                        "--trusted-agents", "/".join(AGENT_ACCOUNT)]
        else:
            for node in self.lab.state.nodes:
                subprocess.run(self._nodemesh("ca", "issue-node", node.name, "--ca-dir", str(ca_dir),
                                              "--out", str(self.workdir / f"node-{node.name}")),
                               check=True, capture_output=True)
            ca_args += ["--placement", f"lab:{self.lab.name}"]
        if self.cert_ttl:
            ca_args += ["--ttl", str(self.cert_ttl)]
        self._ca_args = ca_args
        self.start_ca(timeout)
        for node in self.lab.state.nodes:
            self.start_agent(node.name)
        for node in self.lab.state.nodes:
            self.wait_ready(node.name, timeout)
        return self

    def start_ca(self, timeout: float = 60.0) -> None:
        self.ca_proc = self._spawn(self.ca_node, "ca", self._ca_args)
        self._wait_port(self.ca_node, self.lab.node(self.ca_node).fabric_ip, CA_PORT, timeout)

    def stop_ca(self) -> None:
        if self.ca_proc is not None:
            self.ca_proc.terminate()
            try:
                self.ca_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.ca_proc.kill()
                self.ca_proc.wait()
            self.ca_proc = None

    def _kube_identities(self) -> Path:
        """Service-account tokens for the CA and for each node's agent, known to the API server as the
        kubelet's bound tokens are (agent tokens name their node); returns the CA's kubeconfig."""
        import secrets

        kube = self.kube
        groups = ("system:serviceaccounts", f"system:serviceaccounts:{AGENT_ACCOUNT[0]}", "system:authenticated")
        for node in self.lab.state.nodes:
            token = secrets.token_urlsafe(32)
            kube.add_token(token, "system:serviceaccount:" + ":".join(AGENT_ACCOUNT), uid=secrets.token_hex(8),
                           groups=groups, extra={NODE_NAME_EXTRA: [node.name]})
            path = self.agent_token(node.name)
            path.write_text(token)
            path.chmod(0o600)
            kube.write_kubeconfig(self.workdir / f"kubeconfig-{node.name}", token=token)
        token = secrets.token_urlsafe(32)
        kube.add_token(token, "system:serviceaccount:" + ":".join(CA_ACCOUNT), groups=groups)
        return kube.write_kubeconfig(self.workdir / "kubeconfig-ca", token=token)

    def agent_token(self, node: str) -> Path:
        return self.workdir / f"token-{node}"

    def agent_args(self, node: str) -> list[str]:
        n = self.lab.node(node)
        if self.kube is not None:
            kube = self.kube
            source = ["--config", "kube", "--kubeconfig", str(self.workdir / f"kubeconfig-{node}"),
                      "--ca-token", str(self.agent_token(node)),
                      "--ca-roots", str(self.workdir / "ca" / "root-cert.pem"),
                      "--trust-domain", self.lab.state.trust_domain, "--host-proc", "/proc",
                      "--cni-socket", str(kube.cni_socket(node)), "--cni-bin-dir", str(kube.cni_bin_dir),
                      "--cni-conf-dir", str(kube.cni_conf_dir(node)), "--cni-interpreter", sys.executable]
        else:
            source = ["--config", f"lab:{self.lab.name}", "--ca-creds", str(self.workdir / f"node-{node}")]
        args = ["agent", "--node", node, *source, "--ca-url", self.ca_url, "--redirect", self.redirect,
                "--bpffs-root", f"/sys/fs/bpf/nodemesh-{self.lab.name}",
                "--state-dir", str(self.workdir / f"redirect-{node}"),
                "--node-address", f"{n.gateway}/32", "--drain", "1"]
        if self.cert_ttl:
            args += ["--cert-ttl", str(self.cert_ttl)]
        return args + self.extra_agent_args

    def start_agent(self, node: str, extra: list[str] | None = None) -> subprocess.Popen:
        proc = self._spawn(node, f"agent-{node}", self.agent_args(node) + list(extra or ()))
        self.agents[node] = proc
        return proc

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        proc = self.agents.pop(node, None)
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _spawn(self, node: str, name: str, args: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        f = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return self.lab.popen(node, self._nodemesh(*args), stdout=f, stderr=subprocess.STDOUT, env=env)

    def _wait_port(self, node: str, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ca_proc is not None and self.ca_proc.poll() is not None:
                raise RuntimeError(f"CA exited: {self.log_tail('ca')}")
            res = self.lab.exec(node, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
            if res.stdout.strip():
                return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")

    def wait_ready(self, node: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        n = self.lab.node(node)
        while time.monotonic() < deadline:
            proc = self.agents.get(node)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"agent on {node} exited with {proc.returncode}: {self.log_tail('agent-' + node)}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                status, _ = http_get_in_netns(n.netns_path, "127.0.0.1", 15021, "/healthz/ready", timeout=2)
                if status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"agent on {node} not ready after {timeout}s: {self.log_tail('agent-' + node)}")

    def metrics(self, node: str) -> str:
        return http_get_in_netns(self.lab.node(node).netns_path, "127.0.0.1", 15020, "/metrics")[1]

    def config_dump(self, node: str) -> dict:
        return json.loads(http_get_in_netns(self.lab.node(node).netns_path, "127.0.0.1", 15000, "/config_dump")[1])

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop(self) -> None:
        for node in list(self.agents):
            self.stop_agent(node)
        self.stop_ca()
        self.release_pods()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def release_pods(self) -> None:
        """Remove the redirection the agents left in place (by design, for their restarts)."""
        from agent.redirect.cleanup import cleanup_netns, cleanup_stale

        bpffs = f"/sys/fs/bpf/nodemesh-{self.lab.name}"
        with contextlib.suppress(LookupError):
            self.lab.state = Lab.attach(self.lab.name).state  # pods may have been added at run time
        for pod in self.lab.state.pods:
            state_dir = str(self.workdir / f"redirect-{pod.node}")
            with contextlib.suppress(Exception):
                cleanup_netns(pod.netns_path, bpffs, state_dir)
        for node in self.lab.state.nodes:
            with contextlib.suppress(Exception):
                cleanup_stale(bpffs, str(self.workdir / f"redirect-{node.name}"))
        with contextlib.suppress(OSError):
            os.rmdir(bpffs)

    def __enter__(self) -> MeshLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

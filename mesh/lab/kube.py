"""The lab as a Kubernetes cluster: an API server, pod sandboxes, and a container runtime's CNI steps.

`LabKube.start(lab)` (what `nodemesh lab up --kube` does):

- starts one pause process per pod in the pod's namespace, as a sandbox has: a node agent finds a running
  pod's namespace from /proc, and an empty namespace has no process to be found by;
- starts the API server test double (`mesh.lab.kubeserve`) in the first node's namespace on its fabric
  address, populated from the lab state, with a relay on 127.0.0.1 in the host's namespace for kubectl;
- writes two kubeconfigs (0600): `kubeconfig` for the host (kubectl) and `kubeconfig-lab` for processes
  inside the lab (agents, the CA), and a CNI directory per node holding the network configuration the
  lab's "runtime" uses, which agents may chain their plugin into.

`add_pod()` is what kubelet and the container runtime do for a pod created later, in their order: the
pod object is created (bound to a node, Pending), the sandbox namespace is created, the CNI chain runs
(the lab's own wiring as the primary plugin, then every chained plugin executable from the bin dir with
the spec's environment and prevResult), the pause process starts, and only then does kubelet report
the pod Running with its IP. Starting the application is the caller's step after that. If the chain
fails the sandbox is torn down again and `LabError` carries the plugin's message.

Everything lives under `<lab state dir>/<lab>.kube/`; `stop()` (and `lab down`) removes it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from pyroute2 import NetNS, netns

from mesh.kube.kubeconfig import write_kubeconfig
from mesh.lab import state as st
from mesh.lab.build import SCOPE_LINK, Lab, LabError, _idx, _netns_pids

KUBE_PORT = 6443
PAUSE_ARGV = ("sleep", "infinity")
PRIMARY_PLUGIN = "nodemesh-lab-ptp"
CNI_VERSION = "1.0.0"
CONFLIST_NAME = "10-nodemesh-lab.conflist"


def kube_dir(name: str) -> Path:
    return st.STATE_DIR / f"{name}.kube"


# --- sans-IO helpers ---------------------------------------------------------------------------------------


def next_free_ip(pod_cidr: str, used: Sequence[str]) -> str:
    """The lowest address of the node's range not taken; the first host is the gateway."""
    net = ipaddress.ip_network(pod_cidr)
    taken = {ipaddress.ip_address(u) for u in used}
    hosts = net.hosts()
    next(hosts)
    for ip in hosts:
        if ip not in taken:
            return str(ip)
    raise LabError(f"pod range {pod_cidr} is full")


def next_host_ifname(pods: Sequence[st.PodState]) -> str:
    used = [int(p.host_ifname[2:]) for p in pods if p.host_ifname.startswith("vp") and p.host_ifname[2:].isdigit()]
    return f"vp{max(used, default=-1) + 1}"


def ptp_result(pod: st.PodState, host_mac: str = "", pod_mac: str = "") -> dict[str, Any]:
    """What a ptp-style primary plugin reports (CNI 1.0 result)."""
    return {
        "cniVersion": CNI_VERSION,
        "interfaces": [{"name": pod.host_ifname, "mac": host_mac},
                       {"name": "eth0", "mac": pod_mac, "sandbox": pod.netns_path}],
        "ips": [{"address": f"{pod.ip}/32", "gateway": pod.gateway, "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": pod.gateway}],
    }


def plugin_input(conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev: Mapping[str, Any] | None) -> bytes:
    """The stdin of one plugin of a chain: its entry plus the list's name and version, and prevResult."""
    conf = {"cniVersion": conflist.get("cniVersion", CNI_VERSION), "name": conflist.get("name", "lab"), **plugin}
    if prev is not None:
        conf["prevResult"] = prev
    return json.dumps(conf).encode()


def pod_status(ip: str, host_ip: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [{"type": t, "status": "True", "lastTransitionTime": started}
                  for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
    return {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}], "startTime": started, "conditions": conditions,
            "containerStatuses": [{"name": "app", "image": "lab", "imageID": "", "ready": True, "started": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": started}}}]}


class CniFailed(LabError):
    """A plugin of the chain failed; `error` is its CNI error object."""

    def __init__(self, plugin: str, error: Mapping[str, Any]) -> None:
        self.plugin = plugin
        self.error = dict(error)
        super().__init__(f"CNI plugin {plugin} failed (code {error.get('code')}): {error.get('msg')}")


# --- the handle ----------------------------------------------------------------------------------------------


@dataclass
class LabKube:
    lab: Lab
    dir: Path
    url: str  # the API server as seen from inside the lab
    host_url: str  # ... and from the host (kubectl)
    pid: int

    # --- files ---
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def lab_kubeconfig(self) -> Path:
        return self.dir / "kubeconfig-lab"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"

    @property
    def cni_bin_dir(self) -> Path:
        return self.dir / "cni" / "bin"

    def cni_conf_dir(self, node: str) -> Path:
        return self.dir / "cni" / node / "net.d"

    def cni_socket(self, node: str) -> Path:
        return self.dir / "cni" / node / "cni.sock"

    # --- life cycle ---
    @classmethod
    def start(cls, lab: Lab, *, port: int = KUBE_PORT, host_port: int = 0, timeout: float = 30.0) -> LabKube:
        directory = kube_dir(lab.name)
        if directory.exists():
            raise LabError(f"lab {lab.name!r} already runs an API server ({directory}); stop it first")
        directory.mkdir(parents=True, mode=0o700)
        try:
            for pod in lab.state.pods:
                start_pause(lab, pod.name)
            kube = cls._spawn(lab, directory, port, host_port, timeout)
            write_kubeconfig(kube.kubeconfig, kube.host_url)
            write_kubeconfig(kube.lab_kubeconfig, kube.url)
            for node in lab.state.nodes:
                conf_dir = kube.cni_conf_dir(node.name)
                conf_dir.mkdir(parents=True, exist_ok=True)
                (conf_dir / CONFLIST_NAME).write_text(json.dumps(
                    {"cniVersion": CNI_VERSION, "name": "nodemesh-lab", "plugins": [{"type": PRIMARY_PLUGIN}]},
                    indent=2) + "\n")
            kube.cni_bin_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            forget(lab.name)
            raise
        return kube

    @classmethod
    def _spawn(cls, lab: Lab, directory: Path, port: int, host_port: int, timeout: float) -> LabKube:
        node = lab.state.nodes[0]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", host_port))
            listener.listen(128)
            fd = listener.fileno()
            log = open(directory / "apiserver.log", "ab")  # noqa: SIM115 - the child owns it
            proc = lab.popen(node.name, [sys.executable, "-m", "mesh.lab.kubeserve", "--state",
                                         str(st.state_path(lab.name)), "--host", node.fabric_ip, "--port", str(port),
                                         "--host-fd", str(fd), "--control", str(directory / "control.sock")],
                             pass_fds=(fd,), stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
            log.close()
        finally:
            listener.close()
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            chunk = proc.stdout.read()
            if chunk:
                line += chunk
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        proc.stdout.close()
        try:
            info = json.loads(line)
        except ValueError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            tail = (directory / "apiserver.log").read_text(errors="replace")[-2000:]
            raise LabError(f"the lab API server did not start: {tail.strip() or 'no output'}") from None
        kube = cls(lab, directory, info["url"], info["hostUrl"], int(info["pid"]))
        (directory / "state.json").write_text(json.dumps({"url": kube.url, "hostUrl": kube.host_url,
                                                          "pid": kube.pid}))
        return kube

    @classmethod
    def attach(cls, lab: Lab) -> LabKube:
        directory = kube_dir(lab.name)
        try:
            info = json.loads((directory / "state.json").read_text())
        except FileNotFoundError:
            raise LabError(f"lab {lab.name!r} runs no API server (start it with 'lab up --kube')") from None
        return cls(lab, directory, info["url"], info["hostUrl"], int(info["pid"]))

    def stop(self) -> None:
        forget(self.lab.name)

    # --- the API, from the host ---
    def control(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request on the server's control socket (test hooks); raises LabError when refused."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(str(self.control_socket))
            s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        reply = json.loads(data or b"{}")
        if not reply.get("ok"):
            raise LabError(f"lab API server refused {op}: {reply.get('error')}")
        return reply

    def add_token(self, token: str, username: str, *, uid: str = "", groups: Sequence[str] = (),
                  extra: Mapping[str, Sequence[str]] | None = None) -> None:
        self.control("add-token", token=token, user={"username": username, "uid": uid, "groups": list(groups),
                                                     "extra": {k: list(v) for k, v in (extra or {}).items()}})

    def write_kubeconfig(self, path: str | os.PathLike[str], *, token: str | None = None,
                         in_lab: bool = True) -> Path:
        return write_kubeconfig(path, self.url if in_lab else self.host_url, token=token)

    def api(self, method: str, path: str, body: Any = None,
            content_type: str = "application/json") -> tuple[int, Any]:
        url = urlsplit(self.host_url)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=30)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {"message": raw.decode(errors="replace")}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args], capture_output=True,
                             text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
        return res

    # --- pods at run time ---
    def add_pod(self, name: str, *, namespace: str = "default", node: str | None = None,
                service_account: str = "default", labels: Mapping[str, str] | None = None,
                annotations: Mapping[str, str] | None = None, cni_timeout: float = 60.0) -> st.PodState:
        lab = self.lab
        lab.state = st.load(lab.name)  # another process may have added pods
        if any(p.name == name for p in lab.state.pods):
            raise LabError(f"lab {lab.name!r} already has a pod {name!r}")
        n = lab.node(node) if node else lab.state.nodes[0]
        ns_q, name_q = quote(namespace, safe=""), quote(name, safe="")
        # 1. The pod object, bound to its node (what the scheduler does), Pending.
        code, doc = self.api("GET", f"/api/v1/namespaces/{ns_q}/serviceaccounts/{quote(service_account, safe='')}")
        if code == 404:
            self.api("POST", f"/api/v1/namespaces/{ns_q}/serviceaccounts", {"metadata": {"name": service_account}})
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                             "annotations": dict(annotations or {})},
                "spec": {"nodeName": n.name, "serviceAccountName": service_account,
                         "containers": [{"name": "app", "image": "lab"}]}}
        code, doc = self.api("POST", f"/api/v1/namespaces/{ns_q}/pods", body)
        if code != 201:
            raise LabError(f"creating pod {namespace}/{name}: HTTP {code}: {doc.get('message')}")
        uid = doc["metadata"]["uid"]
        pod = st.PodState(
            name=name, namespace=namespace, service_account=service_account, node=n.name,
            ip=next_free_ip(n.pod_cidr, [p.ip for p in lab.state.pods if p.node == n.name] + [n.gateway]),
            netns=f"{lab.state.prefix}pod-{name}", host_ifname=next_host_ifname(lab.state.pods), gateway=n.gateway,
            labels=dict(labels or {}), annotations=dict(annotations or {}))
        # 2. The sandbox namespace; recorded at once so that 'lab down' removes it whatever happens next.
        netns.create(pod.netns)
        lab.state.pods.append(pod)
        st.save(lab.state)
        try:
            # 3. The CNI chain, run on the node as the runtime runs it.
            self.run_cni("ADD", pod, container_id=f"lab-{uid}", pod_uid=uid, timeout=cni_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.run_cni("DEL", pod, container_id=f"lab-{uid}", pod_uid=uid, timeout=30)
            self._remove_sandbox(pod)
            self.api("DELETE", f"/api/v1/namespaces/{ns_q}/pods/{name_q}")
            raise
        # 4. The sandbox process, then kubelet's status report.
        start_pause(lab, name)
        code, doc = self.api("PATCH", f"/api/v1/namespaces/{ns_q}/pods/{name_q}/status",
                             {"status": pod_status(pod.ip, n.fabric_ip)}, "application/merge-patch+json")
        if code != 200:
            raise LabError(f"reporting pod {namespace}/{name} running: HTTP {code}: {doc.get('message')}")
        return pod

    def delete_pod(self, name: str, timeout: float = 30.0) -> None:
        lab = self.lab
        lab.state = st.load(lab.name)
        pod = lab.pod(name)
        code, doc = self.api("GET", f"/api/v1/namespaces/{quote(pod.namespace, safe='')}/pods/{quote(name, safe='')}")
        uid = doc.get("metadata", {}).get("uid", "") if code == 200 else ""
        self.api("DELETE", f"/api/v1/namespaces/{quote(pod.namespace, safe='')}/pods/{quote(name, safe='')}")
        with contextlib.suppress(LabError):
            self.run_cni("DEL", pod, container_id=f"lab-{uid}", pod_uid=uid, timeout=timeout)
        self._remove_sandbox(pod)

    def _remove_sandbox(self, pod: st.PodState) -> None:
        lab = self.lab
        remove_netns(pod.netns)
        with contextlib.suppress(Exception), NetNS(lab.node(pod.node).netns) as ns:
            found = ns.link_lookup(ifname=pod.host_ifname)
            if found:
                ns.link("del", index=found[0])
        lab.state = st.load(lab.name)
        lab.state.pods = [p for p in lab.state.pods if p.name != pod.name]
        st.save(lab.state)

    # --- the runtime's CNI steps ---
    def conflist(self, node: str) -> dict[str, Any]:
        """The node's network configuration as the runtime reads it: the first file by name."""
        conf_dir = self.cni_conf_dir(node)
        files = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf", ".json"))
        if not files:
            raise LabError(f"no CNI network configuration in {conf_dir}")
        return json.loads(files[0].read_text())

    def run_cni(self, command: str, pod: st.PodState, *, container_id: str, pod_uid: str = "",
                timeout: float = 60.0) -> dict[str, Any] | None:
        conflist = self.conflist(pod.node)
        plugins = conflist.get("plugins") or []
        if not plugins or plugins[0].get("type") != PRIMARY_PLUGIN:
            raise LabError(f"the lab's network configuration must start with the {PRIMARY_PLUGIN} plugin")
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": pod.netns_path,
            "CNI_IFNAME": "eth0", "CNI_PATH": str(self.cni_bin_dir), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                        f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={pod_uid}",
        }
        if command == "ADD":
            result: dict[str, Any] | None = wire_pod(self.lab, pod)
            for plugin in plugins[1:]:
                result = self._exec_plugin(pod.node, plugin, conflist, result, env, timeout)
            return result
        if command == "DEL":
            for plugin in reversed(plugins[1:]):
                with contextlib.suppress(CniFailed):
                    self._exec_plugin(pod.node, plugin, conflist, None, env, timeout)
            return None
        raise LabError(f"CNI command {command!r}: the lab runs ADD and DEL")

    def _exec_plugin(self, node: str, plugin: Mapping[str, Any], conflist: Mapping[str, Any],
                     prev: dict[str, Any] | None, env: dict[str, str], timeout: float) -> dict[str, Any] | None:
        kind = str(plugin.get("type", ""))
        path = self.cni_bin_dir / kind
        if "/" in kind or not path.is_file():
            raise CniFailed(kind, {"code": 7, "msg": f"plugin {kind!r} not found in {self.cni_bin_dir}"})
        res = self.lab.exec(node, [str(path)], input=plugin_input(conflist, plugin, prev), env=env,
                            capture_output=True, timeout=timeout)
        out = res.stdout.decode(errors="replace").strip()
        try:
            doc = json.loads(out) if out else None
        except ValueError:
            doc = None
        if res.returncode != 0:
            error = doc if isinstance(doc, dict) else {"code": 999, "msg": res.stderr.decode(errors="replace")}
            raise CniFailed(kind, error)
        if env["CNI_COMMAND"] == "ADD":
            if not isinstance(doc, dict):
                raise CniFailed(kind, {"code": 999, "msg": f"no result on stdout: {out[:200]!r}"})
            return doc
        return None


# --- processes and wiring -------------------------------------------------------------------------------------


def start_pause(lab: Lab, pod: str) -> subprocess.Popen:
    """The sandbox's process: what makes the pod's namespace visible in /proc."""
    return lab.popen(pod, list(PAUSE_ARGV), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def wire_pod(lab: Lab, pod: st.PodState) -> dict[str, Any]:
    """The lab's primary CNI: a veth into the pod's namespace, routed /32 from the node (as `Lab.up`)."""
    node = lab.node(pod.node)
    with NetNS(node.netns) as ns:
        ns.link("add", ifname=pod.host_ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
        host = _idx(ns, pod.host_ifname)
        ns.addr("add", index=host, address=node.gateway, prefixlen=32)
        ns.link("set", index=host, state="up")
        ns.route("add", dst=f"{pod.ip}/32", oif=host, scope=SCOPE_LINK)
        host_mac = ns.get_links(host)[0].get_attr("IFLA_ADDRESS") or ""
    with NetNS(pod.netns) as ns:
        ns.link("set", index=_idx(ns, "lo"), state="up")
        eth = _idx(ns, "eth0")
        ns.addr("add", index=eth, address=pod.ip, prefixlen=32)
        ns.link("set", index=eth, state="up")
        ns.route("add", dst=f"{node.gateway}/32", oif=eth, scope=SCOPE_LINK)
        ns.route("add", dst="0.0.0.0/0", gateway=node.gateway, oif=eth)
        pod_mac = ns.get_links(eth)[0].get_attr("IFLA_ADDRESS") or ""
    return ptp_result(pod, host_mac, pod_mac)


def remove_netns(name: str) -> None:
    """Kill what runs in one namespace, then remove it (its veth goes with it)."""
    if not name.startswith(st.PREFIX):
        raise LabError(f"refusing to remove namespace {name!r} outside the lab prefix {st.PREFIX!r}")
    for pid in _netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for attempt in range(20):
        try:
            netns.remove(name)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == 19:
                raise
            time.sleep(0.05)


def _is_kubeserve(pid: int) -> bool:
    try:
        return b"mesh.lab.kubeserve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def forget(name: str, timeout: float = 10.0) -> None:
    """Stop lab `name`'s API server (if it runs) and remove its files; the namespaces are `lab down`'s."""
    directory = kube_dir(name)
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads((directory / "state.json").read_text())["pid"])
        if _is_kubeserve(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_kubeserve(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_kubeserve(pid):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(directory, ignore_errors=True)


def forget_all() -> None:
    if st.STATE_DIR.is_dir():
        for directory in st.STATE_DIR.glob("*.kube"):
            forget(directory.name[: -len(".kube")])


#!/usr/bin/env python3
"""nodemesh-cni: the chained CNI plugin that holds a new pod's start until the node agent captures it.

Why it exists: the agent's Kubernetes watch sees a new pod only after the pod has started, so without
help its first connections could leave the pod before redirection is installed. The container runtime
runs the CNI chain after the pod's network namespace is wired and before any container starts; this
plugin runs last in that chain, hands the pod's namespace to the agent over a unix socket and returns
only once the agent says the pod's traffic is captured (or that the pod is not in the mesh). A failure
or a timeout fails the ADD, so the runtime retries the sandbox: fail closed, never a pod that starts
uncaptured.

When the agent cannot be reached at all the plugin still has to decide, or every pod on the node would
be blocked while the agent restarts: with a `kubeconfig` in its config it reads the pod and its
namespace from the API server and lets through only pods that are not enrolled; without one, or if the
API server cannot say either, it fails.

This file is deliberately self-contained (standard library only, Python 3.8+): it is what gets copied
onto the host as the `nodemesh-cni` executable, where none of the project's packages are installed.

CNI specification: https://www.cni.dev/docs/spec/ (versions 0.3.0 to 1.1.0; ADD, DEL, CHECK, VERSION,
STATUS, GC). Plugin config keys of our own, next to `cniVersion`/`name`/`type`:

- `agentSocket`: the agent's unix socket (default /var/run/nodemesh/cni.sock);
- `timeoutSeconds`: how long an ADD waits for the agent (default 30);
- `excludeNamespaces`: namespaces never sent to the agent (default kube-system);
- `kubeconfig`: API server access for the decision above when the agent is down (optional).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import sys
import urllib.parse
from typing import Any

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SOCKET = "/var/run/nodemesh/cni.sock"
DEFAULT_TIMEOUT = 30.0
DEFAULT_EXCLUDED = ("kube-system",)

# Istio's labels and annotation: users keep their existing enrolment.
DATAPLANE_MODE = "istio.io/dataplane-mode"
SIDECAR_STATUS = "sidecar.istio.io/status"

# CNI error codes (spec section "Error").
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
# Ours (100 and up are plugin-specific): the agent answered that it could not capture the pod.
ERR_CAPTURE_FAILED = 100


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class AgentUnreachable(Exception):
    """Nothing answered on the agent's socket (not running, or restarting)."""


# --- parsing what the runtime gives us -----------------------------------------------------------------


def parse_cni_args(value: str) -> dict[str, str]:
    """`CNI_ARGS` is `K=V;K=V` (kubelet passes K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID...)."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key.strip()] = val.strip()
    return out


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not a version number") from None


def parse_config(raw: bytes) -> dict[str, Any]:
    try:
        conf = json.loads(raw or b"{}")
    except ValueError as err:
        raise CniError(ERR_DECODE, f"network configuration on stdin is not JSON: {err}") from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODE, "network configuration on stdin must be a JSON object")
    version = conf.get("cniVersion", "0.4.0")
    if not isinstance(version, str):
        raise CniError(ERR_INVALID_CONFIG, "cniVersion: expected a string")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    for key, kind in (("agentSocket", str), ("kubeconfig", str), ("excludeNamespaces", list),
                      ("timeoutSeconds", (int, float)), ("prevResult", dict)):
        if key in conf and conf[key] is not None and not isinstance(conf[key], kind):
            raise CniError(ERR_INVALID_CONFIG, f"{key}: expected {getattr(kind, '__name__', 'a number')}")
    timeout = conf.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not 0 < float(timeout) <= 600:
        raise CniError(ERR_INVALID_CONFIG, "timeoutSeconds: expected a number of seconds in (0, 600]")
    return conf


def prev_result_ips(prev: dict[str, Any] | None) -> list[str]:
    """The pod's addresses from the previous plugin's result (`ips[].address`, CIDR notation)."""
    if not prev:
        return []
    ips = prev.get("ips")
    if not isinstance(ips, list):
        raise CniError(ERR_INVALID_CONFIG, "prevResult.ips: expected a list")
    out = []
    for n, item in enumerate(ips):
        address = item.get("address") if isinstance(item, dict) else None
        if not isinstance(address, str) or not address:
            raise CniError(ERR_INVALID_CONFIG, f"prevResult.ips[{n}].address: missing")
        out.append(address.split("/", 1)[0])
    return out


# --- talking to the agent -----------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call_agent(path: str, method: str, url: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, Any]:
    conn = _UnixHTTPConnection(path, timeout)
    try:
        try:
            conn.connect()
        except OSError as err:
            raise AgentUnreachable(f"agent socket {path}: {err.strerror or err}") from None
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise CniError(ERR_TRY_AGAIN, f"the nodemesh agent did not answer within {timeout:g}s") from None
        except (OSError, http.client.HTTPException) as err:
            raise CniError(ERR_TRY_AGAIN, f"the nodemesh agent broke off the request: {err}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        doc = {"error": raw[:200].decode(errors="replace")}
    return resp.status, doc


# --- deciding without the agent ------------------------------------------------------------------------


def enrolled(pod: dict[str, Any], namespace: dict[str, Any]) -> bool:
    """Istio ambient's rule, the same the agent applies: the pod's `istio.io/dataplane-mode` label wins
    (`none` opts out), then the namespace's; an injected sidecar or the host network never enrols."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if (pod.get("spec") or {}).get("hostNetwork") is True or SIDECAR_STATUS in annotations:
        return False
    mode = labels.get(DATAPLANE_MODE)
    if mode == "none":
        return False
    if mode == "ambient":
        return True
    return ((namespace.get("metadata") or {}).get("labels") or {}).get(DATAPLANE_MODE) == "ambient"


def _load_kubeconfig(path: str) -> tuple[str, dict[str, str], ssl.SSLContext | None]:
    """(server URL, auth headers, TLS context) from a kubeconfig. JSON is valid YAML: the installer
    writes JSON so that this file needs no YAML parser."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
        ctx_name = doc["current-context"]
        context = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"])
        user = next((u["user"] for u in doc.get("users", []) if u["name"] == context.get("user")), {})
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as err:
        raise CniError(ERR_INVALID_CONFIG, f"kubeconfig {path}: cannot use it: {err}") from None
    headers = {}
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    server = cluster["server"]
    tls = None
    if server.startswith("https://"):
        tls = ssl.create_default_context()
        if cluster.get("certificate-authority-data"):
            import base64

            tls.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            tls.load_verify_locations(cafile=cluster["certificate-authority"])
    return server, headers, tls


def _api_get(server: str, headers: dict[str, str], tls: ssl.SSLContext | None, path: str,
             timeout: float) -> dict[str, Any]:
    url = urllib.parse.urlsplit(server)
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=timeout)
    try:
        conn.request("GET", url.path.rstrip("/") + path, headers={**headers, "Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as err:
        raise CniError(ERR_TRY_AGAIN, f"API server {server}: {err}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise CniError(ERR_TRY_AGAIN, f"API server {server}: GET {path}: HTTP {resp.status}")
    try:
        return json.loads(body)
    except ValueError:
        raise CniError(ERR_TRY_AGAIN, f"API server {server}: GET {path}: not JSON") from None


def decide_without_agent(conf: dict[str, Any], namespace: str, name: str, why: str) -> None:
    """Return (let the pod start uncaptured) only when the API server says the pod is not enrolled."""
    path = conf.get("kubeconfig")
    if not path:
        raise CniError(ERR_TRY_AGAIN, f"the nodemesh agent is not reachable ({why}); failing closed",
                       "no kubeconfig in the plugin config to tell whether the pod is in the mesh")
    server, headers, tls = _load_kubeconfig(path)
    ns_q, name_q = urllib.parse.quote(namespace, safe=""), urllib.parse.quote(name, safe="")
    pod = _api_get(server, headers, tls, f"/api/v1/namespaces/{ns_q}/pods/{name_q}", 5.0)
    ns = _api_get(server, headers, tls, f"/api/v1/namespaces/{ns_q}", 5.0)
    if enrolled(pod, ns):
        raise CniError(ERR_TRY_AGAIN, f"pod {namespace}/{name} is in the mesh but the nodemesh agent is not "
                                      f"reachable ({why}); failing closed until it is back")
    log(f"agent not reachable ({why}); pod {namespace}/{name} is not in the mesh, letting it start")


# --- the commands -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"nodemesh-cni: {message}", file=sys.stderr)


def _pod_of(env: dict[str, str]) -> tuple[str, str, str] | None:
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    ns, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    if not ns or not name:
        return None  # not a Kubernetes pod (a runtime used directly): nothing for the mesh to do
    return ns, name, args.get("K8S_POD_UID", "")


def _require_env(env: dict[str, str], *names: str) -> None:
    for name in names:
        if not env.get(name):
            raise CniError(ERR_INVALID_ENV, f"{name} is not set")


def cmd_add(conf: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    _require_env(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    prev = conf.get("prevResult")
    if not prev:
        raise CniError(ERR_INVALID_CONFIG, "no prevResult: nodemesh-cni must be chained after the network plugin "
                                           "that gives the pod its address")
    result = dict(prev)
    result["cniVersion"] = conf["cniVersion"]
    pod = _pod_of(env)
    if pod is None:
        return result
    ns, name, uid = pod
    if ns in conf.get("excludeNamespaces", DEFAULT_EXCLUDED):
        return result
    request = {"containerId": env["CNI_CONTAINERID"], "netns": env["CNI_NETNS"], "ifname": env["CNI_IFNAME"],
               "podNamespace": ns, "podName": name, "podUid": uid, "ips": prev_result_ips(prev)}
    timeout = float(conf.get("timeoutSeconds", DEFAULT_TIMEOUT))
    sock = conf.get("agentSocket") or DEFAULT_SOCKET
    try:
        status, doc = call_agent(sock, "POST", "/v1/cni/add", request, timeout)
    except AgentUnreachable as err:
        decide_without_agent(conf, ns, name, str(err))
        return result
    if status != 200:
        message = doc.get("error") if isinstance(doc, dict) else None
        code = ERR_TRY_AGAIN if status == 503 else ERR_CAPTURE_FAILED
        raise CniError(code, f"the nodemesh agent could not capture pod {ns}/{name}: {message or status}")
    if doc.get("captured"):
        log(f"pod {ns}/{name}: captured by the mesh")
    return result


def cmd_del(conf: dict[str, Any], env: dict[str, str]) -> None:
    """Tell the agent, best effort: DEL must succeed when things are already gone (spec), and the agent
    also learns of the deletion from the API server."""
    pod = _pod_of(env)
    if pod is None or pod[0] in conf.get("excludeNamespaces", DEFAULT_EXCLUDED):
        return
    request = {"containerId": env.get("CNI_CONTAINERID", ""), "netns": env.get("CNI_NETNS", ""),
               "podNamespace": pod[0], "podName": pod[1], "podUid": pod[2]}
    try:
        call_agent(conf.get("agentSocket") or DEFAULT_SOCKET, "POST", "/v1/cni/del", request, 10.0)
    except (AgentUnreachable, CniError) as err:
        log(f"DEL of {pod[0]}/{pod[1]} not delivered to the agent: {err}")


def cmd_check(conf: dict[str, Any], env: dict[str, str]) -> None:
    _require_env(env, "CNI_CONTAINERID", "CNI_NETNS")
    if not conf.get("prevResult"):
        raise CniError(ERR_INVALID_CONFIG, "CHECK needs prevResult")
    pod = _pod_of(env)
    if pod is None or pod[0] in conf.get("excludeNamespaces", DEFAULT_EXCLUDED):
        return
    query = urllib.parse.urlencode({"namespace": pod[0], "name": pod[1], "netns": env["CNI_NETNS"]})
    try:
        status, doc = call_agent(conf.get("agentSocket") or DEFAULT_SOCKET, "GET", f"/v1/cni/check?{query}", None,
                                 10.0)
    except AgentUnreachable as err:
        raise CniError(ERR_TRY_AGAIN, f"the nodemesh agent is not reachable: {err}") from None
    if status != 200 or not doc.get("ok"):
        raise CniError(ERR_CAPTURE_FAILED, f"pod {pod[0]}/{pod[1]}: {doc.get('reason') or doc.get('error')}")


def cmd_status(conf: dict[str, Any]) -> None:
    try:
        status, doc = call_agent(conf.get("agentSocket") or DEFAULT_SOCKET, "GET", "/v1/cni/status", None, 5.0)
    except AgentUnreachable as err:
        raise CniError(ERR_NOT_AVAILABLE, f"the nodemesh agent is not reachable: {err}") from None
    if status != 200:
        raise CniError(ERR_NOT_AVAILABLE, f"the nodemesh agent is not ready: {doc.get('error') or status}")


def run(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """One invocation, sans process: (exit code, JSON to print or None)."""
    command = env.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            try:
                asked = json.loads(stdin or b"{}").get("cniVersion", "1.0.0")
            except (ValueError, AttributeError):
                asked = "1.0.0"
            return 0, {"cniVersion": asked if asked in SUPPORTED_VERSIONS else "1.1.0",
                       "supportedVersions": SUPPORTED_VERSIONS}
        conf = parse_config(stdin)
        version = conf["cniVersion"]
        if command == "ADD":
            return 0, cmd_add(conf, env)
        if command == "DEL":
            cmd_del(conf, env)
            return 0, None
        if command == "CHECK":
            if _version_tuple(version) < (0, 4, 0):
                raise CniError(ERR_INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {version}")
            cmd_check(conf, env)
            return 0, None
        if command == "STATUS":
            cmd_status(conf)
            return 0, None
        if command == "GC":
            return 0, None  # the agent drops pods whose namespace is gone on its own
        raise CniError(ERR_INVALID_ENV, f"CNI_COMMAND {command!r}: expected ADD, DEL, CHECK, VERSION, STATUS or GC")
    except CniError as err:
        return 1, err.to_json(version)


def main() -> int:
    code, out = run(dict(os.environ), sys.stdin.buffer.read())
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    if code and out is not None:
        log(str(out.get("msg", "")))
    return code


if __name__ == "__main__":
    sys.exit(main())

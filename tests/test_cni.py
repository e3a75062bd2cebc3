"""The chained CNI plugin, its installer and the agent's socket, as a container runtime would drive them.

The plugin runs as a real process (the installed single file, under the system interpreter with no
site-packages: it must work on a host where nothing of the project is installed) talking HTTP over a
real unix socket to the agent's real `CniServer`. The agent's decision logic behind the socket is
replaced here by a scripted handler, because what is tested is the protocol and its failure modes; the
real agent behind it is exercised end to end in test_kube_lab.py. The API server the plugin consults
while the agent is down is the project's API server double, over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from agent.cni import install as inst
from agent.cni import plugin
from agent.cni.server import CniCaptureFailed, CniDecision, CniNotReady, CniPodEvent, CniServer
from agent.kube.enrol import not_enrolled_reason
from mesh.kube.apiserver import ApiServer
from mesh.kube.apiserver import kinds as k

SYSTEM_PYTHON = "/usr/bin/python3"
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "vp0"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.244.1.7/32", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}]}


class Handler:
    """The agent side, scripted: records what it was asked and answers as told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, CniPodEvent]] = []
        self.answer: object = CniDecision(True)
        self.release = asyncio.Event()
        self.release.set()
        self.added_at_return: list[str] = []

    async def cni_add(self, event: CniPodEvent) -> CniDecision:
        self.events.append(("add", event))
        await self.release.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        self.added_at_return.append(event.key)
        return self.answer  # type: ignore[return-value]

    async def cni_del(self, event: CniPodEvent) -> None:
        self.events.append(("del", event))

    def cni_check(self, namespace: str, name: str, netns: str) -> tuple[bool, str]:
        return (namespace, name) != ("default", "broken"), "checked"

    def cni_ready(self) -> str | None:
        return None


@pytest.fixture
def plugin_file(tmp_path: Path) -> Path:
    """The plugin as installed on a host: one executable file, run by the system interpreter."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-primary.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp"}]}))
    result = inst.install(tmp_path / "bin", conf_dir, inst.PluginSettings(), interpreter=f"{SYSTEM_PYTHON} -I")
    return result.binary


@pytest.fixture
async def agent(tmp_path: Path):
    handler = Handler()
    server = await CniServer(tmp_path / "run" / "cni.sock", handler, add_timeout=3.0).start()
    try:
        yield server, handler
    finally:
        handler.release.set()
        await server.stop()


async def invoke(binary: Path, command: str, conf: dict | bytes | None, *, pod: tuple[str, str] | None = ("default",
                 "web"), netns: str = "/run/netns/x", extra_env: dict | None = None) -> tuple[int, dict | None, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": str(binary.parent), "PATH": "/usr/bin:/bin"}
    if pod:
        env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};K8S_POD_UID=u-1"
    env.update(extra_env or {})
    data = conf if isinstance(conf, bytes) else json.dumps(conf or {}).encode()
    proc = await asyncio.create_subprocess_exec(str(binary), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(data), 60)
    text = out.decode().strip()
    return proc.returncode or 0, json.loads(text) if text else None, err.decode()


def conf_for(server: CniServer, **extra: object) -> dict:
    return {"cniVersion": "1.0.0", "name": "k8s", "type": "nodemesh-cni", "agentSocket": str(server.path),
            "timeoutSeconds": 5, "prevResult": PREV, **extra}


# --- the protocol ------------------------------------------------------------------------------------------


async def test_version_is_answered_by_the_bare_host_interpreter(plugin_file):
    code, out, _ = await invoke(plugin_file, "VERSION", {"cniVersion": "1.0.0"})
    assert code == 0 and out["cniVersion"] == "1.0.0"
    assert {"0.4.0", "1.0.0", "1.1.0"} <= set(out["supportedVersions"])
    assert plugin_file.read_text().startswith(f"#!{SYSTEM_PYTHON} -I\n")
    assert stat.S_IMODE(plugin_file.stat().st_mode) == 0o755


async def test_add_waits_for_the_agent_and_passes_the_previous_result_through(plugin_file, agent):
    server, handler = agent
    handler.release.clear()
    task = asyncio.ensure_future(invoke(plugin_file, "ADD", conf_for(server)))
    for _ in range(200):
        if handler.events:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert not task.done(), "the ADD returned before the agent confirmed the capture"
    handler.release.set()
    code, out, _ = await task
    assert code == 0
    assert out["ips"] == PREV["ips"] and out["interfaces"] == PREV["interfaces"] and out["routes"] == PREV["routes"]
    ((what, event),) = handler.events
    assert what == "add" and event.key == "default/web" and event.netns == "/run/netns/x"
    assert event.ips == ("10.244.1.7",) and event.pod_uid == "u-1" and event.container_id == "c0ffee"
    assert handler.added_at_return == ["default/web"]


async def test_a_pod_outside_the_mesh_starts_without_capture(plugin_file, agent):
    server, handler = agent
    handler.answer = CniDecision(False, "not enrolled")
    code, out, _ = await invoke(plugin_file, "ADD", conf_for(server))
    assert code == 0 and out["ips"] == PREV["ips"]


@pytest.mark.parametrize(("answer", "code_expected", "words"), [
    (CniCaptureFailed("eBPF attach failed"), plugin.ERR_CAPTURE_FAILED, "eBPF attach failed"),
    (CniNotReady("the agent has not listed the cluster yet"), plugin.ERR_TRY_AGAIN, "not listed the cluster"),
])
async def test_an_agent_that_cannot_capture_fails_the_add(plugin_file, agent, answer, code_expected, words):
    server, handler = agent
    handler.answer = answer
    code, out, _ = await invoke(plugin_file, "ADD", conf_for(server))
    assert code != 0
    assert out["code"] == code_expected and words in out["msg"] and out["cniVersion"] == "1.0.0"


async def test_an_agent_that_does_not_answer_in_time_fails_the_add(plugin_file, agent):
    server, handler = agent
    handler.release.clear()  # the agent never confirms; its own deadline (3 s here) ends the request
    code, out, _ = await invoke(plugin_file, "ADD", conf_for(server))
    assert code != 0 and out["code"] == plugin.ERR_CAPTURE_FAILED
    assert "within" in out["msg"]


async def test_excluded_namespaces_and_non_kubernetes_sandboxes_are_never_held(plugin_file, agent):
    server, handler = agent
    handler.release.clear()  # would block forever if asked
    code, out, _ = await invoke(plugin_file, "ADD", conf_for(server), pod=("kube-system", "coredns"))
    assert code == 0 and out["ips"] == PREV["ips"]
    code, out, _ = await invoke(plugin_file, "ADD", conf_for(server), pod=None)
    assert code == 0 and out["ips"] == PREV["ips"]
    assert handler.events == []


async def test_del_always_succeeds_and_tells_the_agent_when_it_is_there(plugin_file, agent, tmp_path):
    server, handler = agent
    code, out, _ = await invoke(plugin_file, "DEL", conf_for(server))
    assert (code, out) == (0, None)
    assert [w for w, _ in handler.events] == ["del"]
    code, out, err = await invoke(plugin_file, "DEL", conf_for(server, agentSocket=str(tmp_path / "none.sock")))
    assert (code, out) == (0, None) and "not delivered" in err


async def test_check_and_status_report_the_agents_view(plugin_file, agent, tmp_path):
    server, _ = agent
    assert (await invoke(plugin_file, "CHECK", conf_for(server)))[:2] == (0, None)
    code, out, _ = await invoke(plugin_file, "CHECK", conf_for(server), pod=("default", "broken"))
    assert code != 0 and out["code"] == plugin.ERR_CAPTURE_FAILED
    assert (await invoke(plugin_file, "STATUS", conf_for(server)))[:2] == (0, None)
    code, out, _ = await invoke(plugin_file, "STATUS", conf_for(server, agentSocket=str(tmp_path / "x.sock")))
    assert code != 0 and out["code"] == plugin.ERR_NOT_AVAILABLE


@pytest.mark.parametrize(("stdin", "env", "code_expected", "words"), [
    (b"{not json", {}, plugin.ERR_DECODE, "not JSON"),
    (json.dumps({"cniVersion": "0.2.0", "prevResult": PREV}).encode(), {}, plugin.ERR_INCOMPATIBLE_VERSION, "0.2.0"),
    (json.dumps({"cniVersion": "1.0.0"}).encode(), {}, plugin.ERR_INVALID_CONFIG, "prevResult"),
    (json.dumps({"cniVersion": "1.0.0", "prevResult": PREV, "timeoutSeconds": "soon"}).encode(), {},
     plugin.ERR_INVALID_CONFIG, "timeoutSeconds"),
    (json.dumps({"cniVersion": "1.0.0", "prevResult": {"ips": [{"gateway": "x"}]}}).encode(), {},
     plugin.ERR_INVALID_CONFIG, "prevResult.ips[0].address"),
    (json.dumps({"cniVersion": "1.0.0", "prevResult": PREV}).encode(), {"CNI_ARGS": "K8S_POD_NAME"},
     plugin.ERR_INVALID_ENV, "CNI_ARGS"),
    (json.dumps({"cniVersion": "1.0.0", "prevResult": PREV}).encode(), {"CNI_NETNS": ""}, plugin.ERR_INVALID_ENV,
     "CNI_NETNS"),
])
async def test_bad_input_is_a_cni_error_naming_the_cause(plugin_file, stdin, env, code_expected, words):
    code, out, _ = await invoke(plugin_file, "ADD", stdin, extra_env=env)
    assert code != 0 and out["code"] == code_expected and words in out["msg"] + out.get("details", "")


async def test_unknown_command_is_refused(plugin_file):
    code, out, _ = await invoke(plugin_file, "REBOOT", {"cniVersion": "1.0.0"})
    assert code != 0 and out["code"] == plugin.ERR_INVALID_ENV


# --- while the agent is down: fail closed for mesh pods only ---------------------------------------------------


@pytest.fixture
async def apiserver(tmp_path: Path):
    async with ApiServer("127.0.0.1", 0) as server:
        store = server.store
        store.create(k.CORE_NAMESPACES, None, {"metadata": {"name": "mesh",
                                                            "labels": {"istio.io/dataplane-mode": "ambient"}}})
        store.create(k.CORE_NAMESPACES, None, {"metadata": {"name": "plain"}})
        for ns, name, labels in (("mesh", "web", {}), ("mesh", "optout", {"istio.io/dataplane-mode": "none"}),
                                 ("plain", "web", {}), ("plain", "optin", {"istio.io/dataplane-mode": "ambient"})):
            store.create(k.CORE_PODS, ns, {"metadata": {"name": name, "labels": labels},
                                           "spec": {"nodeName": "n1", "containers": [{"name": "a", "image": "i"}]}})
        kubeconfig = tmp_path / "plugin.kubeconfig"
        kubeconfig.write_text(json.dumps(inst.plugin_kubeconfig(server.url, token="t0k3n")))
        yield kubeconfig


@pytest.mark.parametrize(("pod", "starts"), [(("plain", "web"), True), (("mesh", "optout"), True),
                                             (("mesh", "web"), False), (("plain", "optin"), False)])
async def test_without_the_agent_only_pods_outside_the_mesh_start(plugin_file, apiserver, tmp_path, pod, starts):
    conf = {"cniVersion": "1.0.0", "name": "k8s", "agentSocket": str(tmp_path / "gone.sock"), "prevResult": PREV,
            "kubeconfig": str(apiserver)}
    code, out, err = await invoke(plugin_file, "ADD", conf, pod=pod)
    if starts:
        assert code == 0 and out["ips"] == PREV["ips"], err
    else:
        assert code != 0 and out["code"] == plugin.ERR_TRY_AGAIN and "failing closed" in out["msg"]


async def test_without_the_agent_or_the_api_server_every_pod_waits(plugin_file, tmp_path):
    conf = {"cniVersion": "1.0.0", "name": "k8s", "agentSocket": str(tmp_path / "gone.sock"), "prevResult": PREV}
    code, out, _ = await invoke(plugin_file, "ADD", conf, pod=("plain", "web"))
    assert code != 0 and out["code"] == plugin.ERR_TRY_AGAIN and "failing closed" in out["msg"]
    kubeconfig = tmp_path / "k.json"
    kubeconfig.write_text(json.dumps(inst.plugin_kubeconfig("http://127.0.0.1:9")))  # nothing listens
    code, out, _ = await invoke(plugin_file, "ADD", {**conf, "kubeconfig": str(kubeconfig)}, pod=("plain", "web"))
    assert code != 0 and out["code"] == plugin.ERR_TRY_AGAIN


@pytest.mark.parametrize(("pod_labels", "annotations", "ns_labels", "host_network"), [
    ({}, {}, {}, False), ({}, {}, {"istio.io/dataplane-mode": "ambient"}, False),
    ({"istio.io/dataplane-mode": "none"}, {}, {"istio.io/dataplane-mode": "ambient"}, False),
    ({"istio.io/dataplane-mode": "ambient"}, {}, {}, False),
    ({"istio.io/dataplane-mode": "ambient"}, {"sidecar.istio.io/status": "{}"}, {}, False),
    ({}, {}, {"istio.io/dataplane-mode": "ambient"}, True),
])
def test_the_plugin_and_the_agent_agree_on_who_is_enrolled(pod_labels, annotations, ns_labels, host_network):
    pod = {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": {"hostNetwork": host_network}}
    assert plugin.enrolled(pod, {"metadata": {"labels": ns_labels}}) == (not_enrolled_reason(pod, ns_labels) == "")


# --- the agent's socket ------------------------------------------------------------------------------------------


async def test_socket_is_private_and_refuses_malformed_requests(agent):
    server, handler = agent
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    for body, field in (({"netns": "/x", "containerId": "c", "podNamespace": "d"}, "podName"),
                        ({"netns": "rel/path", "containerId": "c", "podNamespace": "d", "podName": "p"}, "netns"),
                        ({"netns": "/x", "containerId": "c", "podNamespace": "d", "podName": "p", "ips": ["nope"]},
                         "ips[0]")):
        status, doc = await asyncio.to_thread(plugin.call_agent, str(server.path), "POST", "/v1/cni/add", body, 5)
        assert status == 400 and doc["error"].startswith(field)
    assert handler.events == []


async def test_socket_path_is_taken_over_only_from_a_dead_agent(tmp_path):
    path = tmp_path / "cni.sock"
    first = await CniServer(path, Handler()).start()
    try:
        with pytest.raises(OSError, match="another agent"):
            await CniServer(path, Handler()).start()
    finally:
        await first.stop()
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a killed agent leaves behind
    stale.close()
    second = await CniServer(path, Handler()).start()
    await second.stop()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        await CniServer(path, Handler()).start()


# --- the installer -------------------------------------------------------------------------------------------------


def test_install_chains_after_the_primary_and_is_idempotent(tmp_path):
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    primary = {"cniVersion": "1.0.0", "name": "k8s-pod-network",
               "plugins": [{"type": "calico"}, {"type": "portmap", "capabilities": {"portMappings": True}}]}
    (conf_dir / "10-calico.conflist").write_text(json.dumps(primary))
    (conf_dir / "99-other.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "type": "bridge"}))
    settings = inst.PluginSettings(agent_socket="/var/run/nodemesh/cni.sock", kubeconfig="/etc/cni/net.d/k")
    first = inst.install(bin_dir, conf_dir, settings)
    chain = json.loads((conf_dir / "10-calico.conflist").read_text())
    assert [p["type"] for p in chain["plugins"]] == ["calico", "portmap", "nodemesh-cni"]
    assert chain["plugins"][2]["agentSocket"] == "/var/run/nodemesh/cni.sock"
    assert chain["plugins"][1] == primary["plugins"][1] and chain["name"] == "k8s-pod-network"
    assert json.loads((conf_dir / "99-other.conf").read_text())["type"] == "bridge"  # not the one in use
    assert first.changed and not inst.install(bin_dir, conf_dir, settings).changed
    inst.uninstall(bin_dir, conf_dir)
    assert json.loads((conf_dir / "10-calico.conflist").read_text())["plugins"] == primary["plugins"]
    assert not (bin_dir / "nodemesh-cni").exists()


def test_install_turns_a_single_plugin_conf_into_a_chain(tmp_path):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "05-flannel.conf").write_text(json.dumps(
        {"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": True}}))
    result = inst.install(tmp_path / "bin", conf_dir, inst.PluginSettings())
    assert result.conf_file == conf_dir / "05-flannel.conflist" and not (conf_dir / "05-flannel.conf").exists()
    chain = json.loads(result.conf_file.read_text())
    assert chain["cniVersion"] == "0.3.1" and chain["name"] == "cbr0"
    assert chain["plugins"][0] == {"type": "flannel", "delegate": {"isDefaultGateway": True}}
    assert chain["plugins"][1]["type"] == "nodemesh-cni"


def test_install_waits_for_a_primary_network(tmp_path):
    (tmp_path / "net.d").mkdir()
    with pytest.raises(inst.CniInstallError, match="primary CNI must be installed first"):
        inst.install(tmp_path / "bin", tmp_path / "net.d", inst.PluginSettings())
    (tmp_path / "net.d" / "10-x.conflist").write_text("{broken")
    with pytest.raises(inst.CniInstallError, match=r"10-x\.conflist"):
        inst.install(tmp_path / "bin", tmp_path / "net.d", inst.PluginSettings())


def test_plugin_kubeconfig_is_private(tmp_path):
    path = inst.write_plugin_kubeconfig(tmp_path, "http://10.96.0.1:80", token="secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    server, headers, tls = plugin._load_kubeconfig(str(path))
    assert (server, headers, tls) == ("http://10.96.0.1:80", {"Authorization": "Bearer secret"}, None)

"""daemonset/: every overlay renders with kubectl kustomize, validates against the Kubernetes schemas
offline, and asks for exactly the privileges the agent's code says it needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.privileges import BACKEND_CAPABILITIES, HOST_PROC_IN_CONTAINER, host_paths

ROOT = Path(__file__).resolve().parent.parent / "daemonset"
OVERLAYS = ["base", *sorted(f"overlays/{p.name}" for p in (ROOT / "overlays").iterdir() if p.is_dir())]
K8S_VERSION = "1.32.0"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to render the manifests (scripts/bootstrap.sh installs it)"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / overlay)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"{kind}/{name} not rendered")


def agent_backend(ds: dict) -> str:
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    (redirect,) = [a for a in args if a.startswith("--redirect=")]
    return redirect.split("=", 1)[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                         "DaemonSet", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_asks_for_exactly_what_the_code_needs(overlay):
    docs = render(overlay)
    ds = find(docs, "DaemonSet", "nodemesh-agent")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    backend = agent_backend(ds)
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == set(BACKEND_CAPABILITIES[backend])
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["hostNetwork"] is True

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    host_volumes = {name for name, v in volumes.items() if "hostPath" in v}
    needed = {h.name: h for h in host_paths(backend)}
    assert host_volumes == set(needed), "host paths must be exactly the ones agent/privileges.py lists"
    for name, h in needed.items():
        assert volumes[name]["hostPath"]["path"] == h.path
        assert mounts[name]["mountPath"] == h.container_path
        assert bool(mounts[name].get("readOnly")) == h.read_only, name
        assert mounts[name].get("mountPropagation") == h.propagation, name
    assert needed["host-proc"].container_path == HOST_PROC_IN_CONTAINER
    assert f"--host-proc={HOST_PROC_IN_CONTAINER}" in c["args"]
    # The CNI plugin is installed by the agent into the host directories it mounts for that, and only there.
    assert f"--cni-bin-dir={needed['cni-bin'].container_path}" in c["args"]
    assert f"--cni-conf-dir={needed['cni-conf'].container_path}" in c["args"]


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in container args."""
    out = []
    for a in args:
        for k, v in env.items():
            a = a.replace(f"$({k})", v)
        out.append(a)
    return out


def _parse(register, args: list[str]):
    import argparse

    parser = argparse.ArgumentParser(prog="nodemesh", exit_on_error=False)
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(args)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_component_args_are_what_the_commands_accept(overlay):
    """A renamed flag (--ca-address became --ca-url) must break here, not in a crash-looping pod."""
    from agent.cli import register as agent_register
    from mesh.ca.cli import register as ca_register

    docs = render(overlay)
    ds = find(docs, "DaemonSet", "nodemesh-agent")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    namespace = ds["metadata"]["namespace"]
    args = _parse(agent_register, _expand(c["args"], {"NODE_NAME": "node-1", "POD_NAMESPACE": namespace}))
    assert args.config == ["kube"] and args.ca_token and args.ca_roots and not args.ca_creds
    assert args.ca_url == f"https://nodemesh-ca.{namespace}.svc:15012"
    assert args.cni_exclude_namespaces.split(",") == ["kube-system", namespace]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(args.ca_token).rsplit("/", 1)[0] in mounts and str(args.ca_roots).rsplit("/", 1)[0] in mounts

    dep = find(docs, "Deployment", "nodemesh-ca")
    (ca,) = dep["spec"]["template"]["spec"]["containers"]
    ca_args = _parse(ca_register, _expand(ca["args"], {"POD_NAMESPACE": namespace}))
    assert (ca_args.placement, ca_args.auth) == ("kube", "tokenreview")
    assert ca_args.trusted_agents == f"{namespace}/nodemesh-agent"
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    assert (namespace, sa) == tuple(ca_args.trusted_agents.split("/"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_probes_scrape_and_rollout(overlay):
    ds = find(render(overlay), "DaemonSet", "nodemesh-agent")
    tpl = ds["spec"]["template"]
    (c,) = tpl["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    ann = tpl["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true", "15020", "/metrics")
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_least_privilege_and_bound_to_the_right_accounts(overlay):
    docs = render(overlay)
    sas = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"}
    for d in docs:
        if d["kind"] == "ClusterRoleBinding":
            for s in d["subjects"]:
                assert (s["namespace"], s["name"]) in sas, f"{d['metadata']['name']} binds a missing account"
        if d["kind"] in ("ClusterRole", "Role"):
            for rule in d["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"]
                assert not {"secrets"} & set(rule["resources"]), "no component reads secrets through the API"
                writes = set(rule["verbs"]) - {"get", "list", "watch"}
                if d["metadata"]["name"] == "nodemesh-agent":
                    assert writes <= {"patch"} and (not writes or rule["resources"] == ["pods"])
                else:
                    assert writes <= {"create"} and (not writes or rule["resources"] == ["tokenreviews"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ca_runs_restricted(overlay):
    dep = find(render(overlay), "Deployment", "nodemesh-ca")
    spec = dep["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (v,) = [v for v in spec["volumes"] if v["name"] == "ca-keys"]
    assert v["secret"]["defaultMode"] == 0o400


def test_missing_capabilities_are_named_with_their_reason(tmp_path):
    from agent.privileges import CAP_NUMBERS, missing_capabilities

    status = tmp_path / "status"
    only_net_admin = 1 << CAP_NUMBERS["NET_ADMIN"]
    status.write_text(f"Name:\tagent\nCapEff:\t{only_net_admin:016x}\n")
    missing = missing_capabilities("ebpf", str(status))
    assert set(missing) == {"SYS_ADMIN", "BPF", "PERFMON", "SYS_PTRACE"}
    assert "setns" in missing["SYS_ADMIN"]
    assert set(missing_capabilities("nftables", str(status))) == {"SYS_ADMIN", "SYS_PTRACE"}
    everything = sum(1 << b for b in CAP_NUMBERS.values())
    status.write_text(f"CapEff:\t{everything:016x}\n")
    assert missing_capabilities("ebpf", str(status)) == {}

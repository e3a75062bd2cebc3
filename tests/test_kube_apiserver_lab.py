"""The API server double populated from a real netns lab: what Kubernetes reports is what the lab built."""

from __future__ import annotations

import asyncio

import pytest

from agent.kube import KubeWatch, load_configuration
from mesh.kube.apiserver import ApiServer, sync_lab
from mesh.kube.kubeconfig import write_kubeconfig

pytestmark = pytest.mark.root

TOPOLOGY = {
    "namespaces": {"default": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
    "nodes": [
        {"name": "node-a", "pods": [{"name": "client", "serviceAccount": "sleep", "labels": {"app": "client"}}]},
        {"name": "node-b", "pods": [{"name": "server", "serviceAccount": "httpbin", "labels": {"app": "server"}},
                                    {"name": "server2", "serviceAccount": "httpbin", "labels": {"app": "server"}}]},
    ],
    "services": [{"name": "server", "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "server"}}],
}


def netns_ipv4(lab, pod: str) -> str:
    out = lab.exec(pod, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True,
                   check=True).stdout
    return out.split("inet ")[1].split("/")[0]


async def test_the_watch_sees_the_lab_pods_with_their_real_addresses(make_lab, tmp_path):
    lab = await asyncio.to_thread(make_lab, TOPOLOGY)
    async with ApiServer(bookmark_interval=3600) as server:
        sync_lab(server.store, lab.state.to_json())
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        async with KubeWatch(await load_configuration(kubeconfig), "node-b") as watch:
            await watch.wait_synced(timeout=30)
            pods = watch.objects("Pod")
            assert sorted(pods) == ["default/server", "default/server2"]
            for key, obj in pods.items():
                name = key.split("/")[1]
                assert obj["status"]["podIP"] == netns_ipv4(lab, name) == lab.pod(name).ip
                assert obj["status"]["hostIP"] == lab.node("node-b").fabric_ip
                assert obj["spec"]["serviceAccountName"] == "httpbin"
            (svc,) = watch.objects("Service").values()
            assert svc["spec"]["clusterIP"] == next(s.vip for s in lab.state.services if s.name == "server")
            (slice_,) = watch.objects("EndpointSlice").values()
            assert sorted(a for e in slice_["endpoints"] for a in e["addresses"]) == sorted(
                [lab.pod("server").ip, lab.pod("server2").ip])
            assert watch.objects("Namespace")["default"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"

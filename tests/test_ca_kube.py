"""The CA's Kubernetes side: agents authenticated by TokenReview, placement from pods' spec.nodeName.

Everything runs for real over HTTP(S): the API server test double (which answers TokenReview from its token
table, with the extras bound service-account tokens carry), the CA's TLS signing API, and the agent's
CAClient presenting a projected token file. The only stand-in is the API server itself, since no real one
can run here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from mesh.ca import CertificateAuthority
from mesh.ca.client import CAClient, CADenied, CAUnavailable
from mesh.ca.kube import (
    KubeApi,
    KubePodPlacement,
    TokenCredentials,
    TokenReviewAuthenticator,
    load_configuration,
    parse_trusted_agents,
)
from mesh.ca.kube.tokenreview import read_review
from mesh.ca.placement import PlacementError
from mesh.ca.server import CAServer, Refusal
from mesh.identity import SpiffeId, TrustBundle
from mesh.kube.apiserver import ApiServer, Store, UserInfo
from mesh.kube.apiserver import kinds as k
from mesh.kube.apiserver.controllers import install_controllers
from mesh.kube.kubeconfig import write_kubeconfig

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
HTTPBIN = SpiffeId(TD, "default", "httpbin")
AGENT_SA = "system:serviceaccount:nodemesh-system:nodemesh-agent"
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


def agent_token(node: str | None, pod: str | None = None, uid: str | None = None, user: str = AGENT_SA,
                audiences: tuple[str, ...] = ("nodemesh-ca",)) -> UserInfo:
    extra = {}
    if node:
        extra[NODE_NAME] = (node,)
    if pod:
        extra[POD_NAME] = (pod,)
    if uid:
        extra[POD_UID] = (uid,)
    return UserInfo(user, "sa-uid", ("system:serviceaccounts",), extra, audiences)


def add_pod(store, ns, name, node, sa, phase="Running"):
    store.create(k.CORE_PODS, ns, {"metadata": {"name": name}, "spec": {
        "nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "img"}]}})
    obj = store.get(k.CORE_PODS, ns, name)
    obj["status"] = {"phase": phase, "podIP": "10.244.0.1"}
    store.update(k.CORE_PODS, ns, name, obj, subresource="status")
    return store.get(k.CORE_PODS, ns, name)["metadata"]["uid"]


def seed(store, sleep_node="node-a"):
    for ns in ("nodemesh-system",):
        store.create(k.CORE_NAMESPACES, None, {"metadata": {"name": ns}})
    uids = {n: add_pod(store, "nodemesh-system", f"agent-{n[-1]}", n, "nodemesh-agent") for n in ("node-a", "node-b")}
    add_pod(store, "default", "sleep", sleep_node, "sleep")
    add_pod(store, "default", "httpbin", "node-b", "httpbin")
    add_pod(store, "default", "finished", "node-a", "batch", phase="Succeeded")
    return uids


async def eventually(predicate, timeout=20.0, what="condition"):
    """Wait for an async or sync predicate; the timeout only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Env:
    """An API server (restartable on its port), the CA in front of it, and token files for agents."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ca = CertificateAuthority.create(TD)
        self.roots = TrustBundle((self.ca.root_cert,))
        self.api_server: ApiServer | None = None
        self.port = 0
        self.uids: dict[str, str] = {}
        self.clients: list[CAClient] = []

    def tokens(self) -> dict[str, UserInfo]:
        return {
            "ca-token": UserInfo("system:serviceaccount:nodemesh-system:nodemesh-ca"),
            "agent-a": agent_token("node-a", "agent-a", self.uids.get("node-a")),
            "agent-b": agent_token("node-b", "agent-b", self.uids.get("node-b")),
            "agent-a-podonly": agent_token(None, "agent-a", self.uids.get("node-a")),
            "legacy": agent_token(None),
            "sleep-sa": agent_token("node-a", user="system:serviceaccount:default:sleep"),
            "other-aud": agent_token("node-a", audiences=("https://kubernetes.default.svc",)),
        }

    async def start_api(self, store: Store | None = None, sleep_node: str = "node-a") -> ApiServer:
        if store is None:
            store = Store()
            install_controllers(store)
            self.uids = seed(store, sleep_node)
        self.api_server = ApiServer(port=self.port, store=store, require_auth=True, tokens=self.tokens(),
                                    bookmark_interval=3600, too_large_wait=0.2)
        await self.api_server.start()
        self.port = self.api_server.port
        return self.api_server

    async def stop_api(self) -> None:
        if self.api_server is not None:
            await self.api_server.stop()
            self.api_server = None

    async def start_ca(self, *, start_placement: bool = True, cache_ttl: float = 10.0) -> None:
        kubeconfig = write_kubeconfig(self.tmp / "ca.kubeconfig", self.api_server.url, token="ca-token")
        self.api = KubeApi(await load_configuration(kubeconfig))
        self.placement = KubePodPlacement(self.api, TD, backoff=(0.05, 0.3))
        if start_placement:
            self.placement.start()
            await self.placement.wait_synced(timeout=20)
        self.auth = TokenReviewAuthenticator(self.api, pods=self.placement, cache_ttl=cache_ttl)
        self.server = CAServer(self.ca, self.placement, authenticator=self.auth)
        self.ca_port = await self.server.start("127.0.0.1", 0)

    def client(self, token: str, name: str | None = None) -> CAClient:
        path = self.tmp / (name or f"token-{token}")
        path.write_text(token + "\n")
        path.chmod(0o600)
        client = CAClient(f"https://127.0.0.1:{self.ca_port}", TokenCredentials(path, self.roots))
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        if getattr(self, "server", None) is not None:
            await self.server.stop()
            await self.placement.stop()
            await self.api.close()
        await self.stop_api()


@pytest.fixture
async def env(tmp_path):
    e = Env(tmp_path)
    await e.start_api()
    try:
        await e.start_ca()
        yield e
    finally:
        await e.close()


async def refusal(client: CAClient, identity: SpiffeId) -> tuple[int | None, str]:
    with pytest.raises((CADenied, CAUnavailable)) as info:
        await client.fetch(identity)
    return info.value.status, info.value.code


# --- who may ask for what ---------------------------------------------------------------------------------


async def test_an_agent_gets_certificates_only_for_pods_on_its_own_node(env):
    a, b = env.client("agent-a"), env.client("agent-b")
    cert = await a.fetch(SLEEP)
    assert cert.identity == SLEEP and cert.chain[0] is not None
    assert await refusal(a, HTTPBIN) == (403, "not_on_node"), "httpbin runs on node-b"
    assert (await b.fetch(HTTPBIN)).identity == HTTPBIN
    assert await refusal(b, SLEEP) == (403, "not_on_node")
    assert await refusal(a, SpiffeId(TD, "default", "batch")) == (403, "not_on_node"), \
        "a finished pod authorises nothing"
    denied = env.server.metrics.denied.labels(reason="not_on_node")._value.get()
    assert denied == 3


@pytest.mark.parametrize(("token", "status", "code"), [
    ("no-such-token", 401, "unauthenticated"),
    ("other-aud", 401, "unauthenticated"),
    ("sleep-sa", 403, "not_a_node"),
    ("legacy", 403, "not_a_node"),
])
async def test_refused_tokens(env, token, status, code, caplog):
    caplog.set_level(logging.WARNING, logger="nodemesh.ca")
    assert await refusal(env.client(token), SLEEP) == (status, code)
    assert token not in caplog.text, "tokens are never logged"


async def test_the_token_file_is_read_again_for_every_request(env, tmp_path):
    client = env.client("garbage", name="rotating-token")
    assert await refusal(client, SLEEP) == (401, "unauthenticated")
    (tmp_path / "rotating-token").write_text("agent-a")
    assert (await client.fetch(SLEEP)).identity == SLEEP, "the kubelet rotated the token: the new one is used"
    (tmp_path / "rotating-token").unlink()
    status, code = await refusal(client, SLEEP)
    assert code == "no_token" and status is None


async def test_the_node_comes_from_the_agent_pod_when_the_token_names_none(env):
    client = env.client("agent-a-podonly")
    assert (await client.fetch(SLEEP)).identity == SLEEP
    assert await refusal(client, HTTPBIN) == (403, "not_on_node")
    store = env.api_server.store
    store.delete(k.CORE_PODS, "nodemesh-system", "agent-a")
    add_pod(store, "nodemesh-system", "agent-a", "node-b", "nodemesh-agent")  # same name, new uid, other node
    await eventually(lambda: env.placement.pod("nodemesh-system", "agent-a").node == "node-b", what="the new pod")
    with pytest.raises(CADenied, match="re-created"):
        await client.fetch(HTTPBIN)


async def test_tokenreview_answers_are_cached_briefly(env):
    client = env.client("agent-a")
    certs = await asyncio.gather(*(client.fetch(SLEEP) for _ in range(20)))
    assert {c.identity for c in certs} == {SLEEP}
    for _ in range(3):
        await client.fetch(SLEEP)
    assert env.auth.reviews == 1, "one TokenReview for a burst from one agent"
    reviews = [r for r in env.api_server.requests if r.path.endswith("/tokenreviews")]
    assert len(reviews) == 1


# --- placement follows the cluster ------------------------------------------------------------------------


async def test_pods_moving_between_nodes_are_seen(env):
    a, b = env.client("agent-a"), env.client("agent-b")
    await a.fetch(SLEEP)
    store = env.api_server.store
    store.delete(k.CORE_PODS, "default", "sleep")
    add_pod(store, "default", "sleep", "node-b", "sleep")
    await eventually(lambda: SLEEP in env.placement.identities_on_node("node-b"), what="sleep on node-b")
    assert (await b.fetch(SLEEP)).identity == SLEEP
    assert await refusal(a, SLEEP) == (403, "not_on_node"), "node-a no longer runs sleep"


async def test_no_certificate_before_the_pods_are_listed(tmp_path):
    e = Env(tmp_path)
    await e.start_api()
    try:
        await e.start_ca(start_placement=False)
        with pytest.raises(PlacementError, match="not listed"):
            e.placement.identities_on_node("node-a")
        status, code = await refusal(e.client("agent-a"), SLEEP)
        assert (status, code) == (503, "placement_unavailable")
    finally:
        await e.close()


@pytest.mark.parametrize("versions", ["fresh", "reset"])
async def test_the_placement_converges_after_an_api_server_restart(env, versions):
    a, b = env.client("agent-a"), env.client("agent-b")
    await a.fetch(SLEEP)
    await env.stop_api()
    assert await refusal(b, HTTPBIN) == (503, "auth_unavailable"), "no TokenReview, no certificate: fail closed"
    await eventually(lambda: env.placement.last_error is not None, what="the watch noticing")
    env.placement.max_stale = 0.0
    with pytest.raises(PlacementError, match="broken"):
        env.placement.identities_on_node("node-a")  # a view older than max_stale is not trusted
    env.placement.max_stale = 60.0
    store = Store(start_rv=1 if versions == "reset" else None)
    install_controllers(store)
    env.uids = seed(store, sleep_node="node-b")  # while it was down, sleep moved to node-b
    await env.start_api(store)
    await eventually(lambda: env.placement.lists >= 2 and SLEEP in env.placement.identities_on_node("node-b"),
                     what="the placement listed again")
    assert (await b.fetch(SLEEP)).identity == SLEEP
    assert await refusal(a, SLEEP) == (403, "not_on_node")


async def test_the_placement_survives_a_dropped_watch_and_410_gone(env):
    store, server = env.api_server.store, env.api_server
    server.drop_watches(abort=True)
    add_pod(store, "default", "late", "node-a", "late")
    late = SpiffeId(TD, "default", "late")
    await eventually(lambda: late in env.placement.identities_on_node("node-a"), what="an event after a drop")
    assert env.placement.lists == 1, "a dropped watch resumes without listing again"
    server.refuse_watches = True
    server.drop_watches(abort=False)
    store.delete(k.CORE_PODS, "default", "late")
    store.compact()
    await eventually(lambda: "503" in (env.placement.last_error or ""), what="a refused watch")
    server.refuse_watches = False
    await eventually(lambda: env.placement.lists == 2, what="a re-list after 410 Gone")
    assert late not in env.placement.identities_on_node("node-a")
    assert await refusal(env.client("agent-a"), late) == (403, "not_on_node")


async def test_a_malformed_pod_is_skipped(env, caplog):
    caplog.set_level(logging.WARNING, logger="nodemesh.ca")
    store = env.api_server.store
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": "default",
                                                          "resourceVersion": "1"}, "spec": {"nodeName": 7}}
    store.inject_raw(k.CORE_PODS, "default", "bad", bad)
    add_pod(store, "default", "after", "node-a", "after")
    await eventually(lambda: SpiffeId(TD, "default", "after") in env.placement.identities_on_node("node-a"),
                     what="events after the bad pod")
    assert "spec.nodeName: not a string" in caplog.text


# --- the pieces on their own --------------------------------------------------------------------------------


def test_trusted_agents_are_parsed_strictly():
    assert parse_trusted_agents("a/b, c/d") == {("a", "b"), ("c", "d")}
    for bad in ("a", "a/", "/b", "a/b/c", ""):
        with pytest.raises(ValueError, match="--trusted-agents"):
            parse_trusted_agents(bad)


@pytest.mark.parametrize(("doc", "code"), [
    ({}, "auth_unavailable"),
    ({"status": {"authenticated": False, "error": "expired"}}, "unauthenticated"),
    ({"status": {"authenticated": True, "audiences": ["x"], "user": {"username": AGENT_SA}}}, "unauthenticated"),
    ({"status": {"authenticated": True, "user": {"username": "alice"}}}, "not_a_node"),
    ({"status": {"authenticated": True, "user": {"username": "system:serviceaccount:only-ns"}}}, "not_a_node"),
])
def test_tokenreview_answers_that_are_refused(doc, code):
    with pytest.raises(Refusal) as info:
        read_review(doc, "nodemesh-ca")
    assert info.value.code == code


# --- the command line ---------------------------------------------------------------------------------------


async def test_cli_serve_with_kube_placement_and_tokenreview(tmp_path):
    e = Env(tmp_path)
    await e.start_api()
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init_dir(ca_dir, TD)
    kubeconfig = write_kubeconfig(tmp_path / "ca.kubeconfig", e.api_server.url, token="ca-token")
    token = tmp_path / "agent-token"
    token.write_text("agent-a")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.ca.cli", "ca", "serve", "--ca-dir", str(ca_dir), "--listen", "127.0.0.1:0",
        "--placement", "kube", "--auth", "tokenreview", "--kubeconfig", str(kubeconfig),
        "--trusted-agents", "nodemesh-system/nodemesh-agent,kube-system/other",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "KUBECONFIG": ""},
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "auth tokenreview" in line and "placement kube:http://127.0.0.1:" in line, line
        url = line.split("serving on ")[1].split()[0]
        roots = TrustBundle.from_pem((ca_dir / "root-cert.pem").read_bytes())
        async with CAClient(url, TokenCredentials(token, roots)) as client:
            await eventually(lambda: _fetches(client, SLEEP), what="the CA's first pod list")
            with pytest.raises(CADenied, match="not_on_node"):
                await client.fetch(HTTPBIN)
        proc_req = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.ca.cli", "ca", "request", str(SLEEP), "--ca-url", url,
            "--token-file", str(token), "--ca-roots", str(ca_dir / "root-cert.pem"), "--out", str(tmp_path / "wl"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc_req.communicate(), 60)
        assert proc_req.returncode == 0, err.decode()
        assert (tmp_path / "wl" / "cert-chain.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        await e.close()
    assert proc.returncode == 0, err.decode()


async def _fetches(client: CAClient, identity: SpiffeId) -> bool:
    try:
        await client.fetch(identity)
    except CAUnavailable as exc:
        if exc.code == "placement_unavailable":
            return False
        raise
    return True


def test_cli_refuses_token_options_without_tokenreview(tmp_path):
    import subprocess

    CertificateAuthority.init_dir(tmp_path / "ca", TD)
    result = subprocess.run(
        [sys.executable, "-m", "mesh.ca.cli", "ca", "serve", "--ca-dir", str(tmp_path / "ca"), "--listen",
         "127.0.0.1:0", "--placement", "file:x.yaml", "--trusted-agents", "a/b"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--trusted-agents" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "mesh.ca.cli", "ca", "serve", "--ca-dir", str(tmp_path / "ca"), "--listen",
         "127.0.0.1:0", "--placement", "kube", "--kubeconfig", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr


async def test_workload_tokens_obtain_their_own_identity_and_nothing_else(env, caplog):
    """With --workload-tokens a service account that is not an agent may get its own identity (Istio's CA
    rule, what a waypoint in a cluster needs); never another one, and never without the switch."""
    assert await refusal(env.client("sleep-sa"), SLEEP) == (403, "not_a_node")  # the default: agents only
    env.auth.workload_tokens = True
    own = env.client("sleep-sa", name="sleep-own")
    assert (await own.fetch(SLEEP)).identity == SLEEP
    assert await refusal(own, HTTPBIN) == (403, "not_own_identity")
    assert "may only obtain its own identity" in caplog.text
    # Agents keep the node rule: node-a's agent still cannot get an identity that only runs on node-b.
    assert await refusal(env.client("agent-a"), HTTPBIN) == (403, "not_on_node")


async def test_a_waypoint_gets_and_keeps_its_own_certificate_with_its_token(env, tmp_path, monkeypatch):
    """`nodemesh waypoint --ca-url --ca-token --ca-roots` (file or env:, as the controller passes it)."""
    import argparse

    from waypoint.cli import CliError, _certificate_from_ca

    env.auth.workload_tokens = True
    token = tmp_path / "waypoint-token"
    token.write_text("sleep-sa\n")
    roots = tmp_path / "roots.pem"
    roots.write_bytes(env.roots.roots_pem())
    monkeypatch.setenv("WAYPOINT_ROOTS", env.roots.roots_pem().decode())
    for roots_arg in (str(roots), "env:WAYPOINT_ROOTS"):
        args = argparse.Namespace(ca_url=f"https://127.0.0.1:{env.ca_port}", ca_token=str(token), ca_roots=roots_arg)
        manager, current = await _certificate_from_ca(args, SLEEP)
        try:
            assert current().identity == SLEEP and current().is_valid()
        finally:
            await manager.aclose()
    args = argparse.Namespace(ca_url=f"https://127.0.0.1:{env.ca_port}", ca_token=str(token), ca_roots=str(roots))
    with pytest.raises(CliError, match=r"not_own_identity|may only obtain its own identity"):
        await _certificate_from_ca(args, HTTPBIN)

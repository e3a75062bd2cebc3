"""Policies applied to real connections: a refused connection is counted with response_flags="DENY", and
a policy added while connections are open closes exactly the ones it now denies.

The server here is a small stand-in for the agent's inbound listener, on loopback. The peer identity of a
connection would come from its HBONE certificate; the test maps client source addresses to identities
instead (a test double for the TLS layer only, which other suites cover). Everything else is real:
sockets, the policy files the user edits, the file watcher, the store, and the policy engine.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from mesh.authz import ConnInfo, connections_to_close, enforce_on_change
from mesh.authz.l4 import authorize
from mesh.config import ConfigSet, ConfigStore, local_config_source, policy_file_source
from mesh.config.model import Action, Authorization, Match, Protocol, Scope, Workload

SERVER_IP = "127.0.0.10"
CLIENTS = {
    "127.0.0.21": "spiffe://cluster.local/ns/default/sa/sleep",
    "127.0.0.22": "spiffe://cluster.local/ns/other/sa/curl",
    "127.0.0.23": None,  # plaintext
}


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@dataclass(eq=False)
class Live:
    info: ConnInfo
    writer: asyncio.StreamWriter


class GuardedEcho:
    """Accepts, decides with the store's current snapshot, refuses or echoes; closes what policy revokes."""

    def __init__(self, store: ConfigStore, registry: CollectorRegistry) -> None:
        self.store = store
        self.live: set[Live] = set()
        self.closed_by_policy: list[tuple[ConnInfo, str]] = []
        self.opened = Counter("istio_tcp_connections_opened", "connections", ["response_flags"], registry=registry)
        self.unsubscribe = enforce_on_change(store, lambda: list(self.live), self._revoke, info=lambda c: c.info)
        self.servers: list[asyncio.Server] = []

    def _revoke(self, conn: Live, decision) -> None:
        self.closed_by_policy.append((conn.info, decision.policy or decision.reason.value))
        self.live.discard(conn)
        conn.writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        src_ip, src_port = writer.get_extra_info("peername")[:2]
        dst_ip, dst_port = writer.get_extra_info("sockname")[:2]
        info = ConnInfo(src_ip, dst_ip, dst_port, src_identity=CLIENTS.get(src_ip), src_port=src_port)
        decision = authorize(info, self.store.snapshot)
        self.opened.labels(response_flags=decision.response_flags).inc()
        if not decision.allowed:
            writer.close()
            return
        conn = Live(info, writer)
        self.live.add(conn)
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.live.discard(conn)
            writer.close()

    async def listen(self, port: int = 0) -> int:
        server = await asyncio.start_server(self._handle, SERVER_IP, port)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.unsubscribe()
        for s in self.servers:
            s.close()
        for conn in list(self.live):
            conn.writer.close()
        for s in self.servers:
            await s.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((SERVER_IP, 0))
        return s.getsockname()[1]


@pytest.fixture
async def mesh(tmp_path):
    store = ConfigStore()
    workloads = tmp_path / "workloads.yaml"
    workloads.write_text(
        yaml.safe_dump(
            {
                "workloads": [
                    {
                        "name": "httpbin",
                        "namespace": "default",
                        "serviceAccount": "httpbin",
                        "workloadIps": [SERVER_IP],
                        "protocol": "HBONE",
                        "labels": {"app": "httpbin"},
                    }
                ]
            }
        )
    )
    policies = tmp_path / "policies.yaml"
    policies.write_text("")
    registry = CollectorRegistry()
    echo = GuardedEcho(store, registry)
    async with (
        local_config_source(workloads, store, interval=0.02),
        policy_file_source(policies, store, interval=0.02) as policy_source,
    ):
        try:
            yield echo, policies, policy_source, registry
        finally:
            await echo.close()


async def connect(src_ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(SERVER_IP, port, local_addr=(src_ip, 0)), 10)


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when the connection still carries data; False once the server closed it."""
    try:
        writer.write(b"ping")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(4), 10)
    except ConnectionError:
        return False
    return data == b"ping"


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except ConnectionError:
        return True


def ap(name: str, spec: dict, namespace: str = "default") -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def write_policies(path, *objs: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(objs))
    tmp.replace(path)


async def test_allow_by_principal_added_while_connected_closes_the_others(mesh):
    echo, policies, _source, registry = mesh
    port = await echo.listen()
    conns = {ip: await connect(ip, port) for ip in CLIENTS}
    for ip, (r, w) in conns.items():
        assert await echoes(r, w), ip

    write_policies(
        policies,
        ap(
            "allow-sleep",
            {
                "selector": {"matchLabels": {"app": "httpbin"}},
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}],
            },
        ),
    )
    await wait_for(lambda: len(echo.closed_by_policy) == 2)
    assert await closed_by_peer(conns["127.0.0.22"][0])
    assert await closed_by_peer(conns["127.0.0.23"][0])
    assert await echoes(*conns["127.0.0.21"])  # the allowed one lives on
    assert {c.src_ip.exploded for c, _ in echo.closed_by_policy} == {"127.0.0.22", "127.0.0.23"}

    # a new connection from a denied peer is refused at once, and counted
    r, w = await connect("127.0.0.22", port)
    assert await closed_by_peer(r)
    assert registry.get_sample_value("istio_tcp_connections_opened_total", {"response_flags": "DENY"}) == 1
    assert registry.get_sample_value("istio_tcp_connections_opened_total", {"response_flags": "-"}) == 3
    for _, w in conns.values():
        w.close()


async def test_allow_by_namespace_and_deny_by_port(mesh):
    echo, policies, source, registry = mesh
    app_port = await echo.listen()
    admin_port = await echo.listen(free_port())
    write_policies(
        policies,
        ap("allow-default-ns", {"rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]}),
        ap("deny-admin", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [str(admin_port)]}}]}]}),
    )
    await wait_for(lambda: len(source.store.snapshot.policies) == 2)
    r, w = await connect("127.0.0.21", app_port)
    assert await echoes(r, w)
    w.close()
    for ip in ("127.0.0.22", "127.0.0.23"):  # other namespace, plaintext
        r, w = await connect(ip, app_port)
        assert await closed_by_peer(r), ip
    r, w = await connect("127.0.0.21", admin_port)  # allowed namespace, denied port
    assert await closed_by_peer(r)
    assert registry.get_sample_value("istio_tcp_connections_opened_total", {"response_flags": "DENY"}) == 3


async def test_a_bad_policy_edit_changes_nothing(mesh):
    echo, policies, source, _registry = mesh
    port = await echo.listen()
    r, w = await connect("127.0.0.22", port)
    assert await echoes(r, w)
    write_policies(policies, ap("typo", {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}))
    await wait_for(lambda: source.last_error is not None)
    assert "spec.rules[0].from[0].source.principal: unknown field" in source.last_error
    assert await echoes(r, w)  # no policy was applied, the connection is untouched
    assert echo.closed_by_policy == []
    w.close()


def test_connections_to_close_is_pure():
    dst = "10.0.0.1"
    store = ConfigStore()
    store.replace("w", ConfigSet((Workload("u", "w", "default", (dst,), protocol=Protocol.HBONE),)))
    live = [
        ConnInfo("10.0.0.2", dst, 80, src_identity="spiffe://cluster.local/ns/default/sa/a"),
        ConnInfo("10.0.0.3", dst, 9999, src_identity="spiffe://cluster.local/ns/default/sa/a"),
        ConnInfo("10.0.0.4", "10.9.9.9", 80),  # destination unknown: fail closed
    ]
    deny_9999 = Authorization(
        "d", "default", Scope.NAMESPACE, Action.DENY, rules=(((Match(destination_ports=[9999]),),),)
    )
    store.replace("p", ConfigSet(policies=(deny_9999,)))
    closing = connections_to_close(store.snapshot, live)
    assert [(c.dst_port, d.policy) for c, d in closing] == [(9999, "default/d"), (80, None)]
    assert closing[1][1].reason.value == "destination workload unknown"


async def test_unsubscribed_watchers_close_nothing():
    store = ConfigStore()
    closed = []
    unsubscribe = enforce_on_change(store, lambda: [ConnInfo("10.0.0.1", "10.0.0.2", 1)], lambda c, d: closed.append(c))
    unsubscribe()
    store.replace("p", ConfigSet(policies=(Authorization("x", "d", Scope.GLOBAL, Action.ALLOW),)))
    assert closed == []

"""Test bed for the waypoint shell (no tests here): a real waypoint between real HBONE clients and real
upstream servers, all on loopback.

Each "pod" gets its own loopback address (127.0.x.y) with two application servers (aiohttp for HTTP/1.1
and WebSockets, a small h2 server for h2c and gRPC-shaped traffic) and, in front of them, a real
`HboneServer` standing in for the destination node's agent (the waypoint's second HBONE hop). Clients
open HBONE tunnels to the waypoint with a client workload's certificate, exactly as an agent would, and
speak HTTP/1.1 (h11) or HTTP/2 (h2) inside. Service VIPs are never dialled by anything; they only name
the original destination in the CONNECT authority.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import random
import secrets
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h2.events as h2ev
import h11
import yaml
from aiohttp import WSMsgType, web
from h2.config import H2Configuration
from h2.connection import H2Connection
from prometheus_client import CollectorRegistry

from mesh.ca import CertificateAuthority
from mesh.config import ConfigSet, Protocol, Service, Workload
from mesh.config import ConfigStore as MeshStore
from mesh.config.model import GatewayAddress, NamespacedHostname, NetworkAddress
from mesh.hbone import HboneLimits, HboneMetrics, HbonePool, HboneServer, TunnelRequest
from mesh.identity import SpiffeId
from waypoint.app import WaypointApp, WaypointSettings
from waypoint.server.context import ServerLimits

TD = "cluster.local"
WAYPOINT_ID = SpiffeId(TD, "default", "waypoint")
CLIENT_ID = SpiffeId(TD, "default", "sleep")
OTHER_CLIENT_ID = SpiffeId(TD, "other", "intruder")
SERVER_SA = "httpbin"
CLIENT_IP = "127.0.9.1"
WAYPOINT_REF = GatewayAddress(NamespacedHostname("default", "waypoint.default.svc.cluster.local"))


# --- upstream application servers ----------------------------------------------------------------------


@dataclass
class Pod:
    """One backend pod: its address, its app servers, and knobs tests turn (status to answer, delay)."""

    name: str
    ip: str
    labels: dict[str, str]
    http_port: int = 0
    h2_port: int = 0
    echo_port: int = 0
    hits: int = 0
    fail_status: int | None = None
    delay: float = 0.0
    attempt_headers: list[str] = field(default_factory=list)
    runners: list[Any] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    hbone: HboneServer | None = None


async def _http_app(pod: Pod) -> web.AppRunner:
    async def any_request(request: web.Request) -> web.StreamResponse:
        pod.hits += 1
        pod.attempt_headers.append(request.headers.get("x-envoy-attempt-count", ""))
        path = request.path
        if path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(f"{pod.name}:{msg.data}")
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        body = await request.read()
        delay = pod.delay
        if path.startswith("/delay/"):
            delay = int(path.split("/")[2]) / 1000
        if delay:
            await asyncio.sleep(delay)
        status = pod.fail_status or 200
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            return web.Response(status=status, body=b"x" * n, headers={"x-pod": pod.name})
        doc = {"pod": pod.name, "method": request.method, "path": request.path_qs, "host": request.host,
               "headers": {k.lower(): v for k, v in request.headers.items()}, "body_len": len(body),
               "body_sha": __import__("hashlib").sha256(body).hexdigest()}
        return web.json_response(doc, status=status, headers={"x-pod": pod.name})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    return runner


class H2App(asyncio.Protocol):
    """h2c server: `/pkg.Echo/Say` answers gRPC-shaped (data + trailers); `/pkg.Echo/Fail` trailers-only
    UNAVAILABLE; anything else a plain response naming the pod."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict[str, Any]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception:
            self.transport.close()  # type: ignore[union-attr]
            return
        for e in events:
            if isinstance(e, h2ev.RequestReceived):
                self.requests[e.stream_id] = {"headers": dict(e.headers), "body": b""}
            elif isinstance(e, h2ev.DataReceived):
                self.requests[e.stream_id]["body"] += e.data
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2ev.StreamEnded):
                req = self.requests.pop(e.stream_id)
                asyncio.get_running_loop().create_task(self.respond(e.stream_id, req))
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    async def respond(self, sid: int, req: dict[str, Any]) -> None:
        pod = self.pod
        pod.hits += 1
        headers = req["headers"]
        pod.attempt_headers.append(headers.get("x-envoy-attempt-count", ""))
        if pod.delay:
            await asyncio.sleep(pod.delay)
        path = headers[":path"]
        if path == "/pkg.Echo/Fail":
            self.conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                         ("grpc-status", "14"), ("grpc-message", "down")], end_stream=True)
        elif path.startswith("/pkg.Echo/"):
            msg = req["body"]
            self.conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                         ("x-pod", pod.name)])
            self.conn.send_data(sid, msg + pod.name.encode())
            self.conn.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "ok")], end_stream=True)
        else:
            body = json.dumps({"pod": pod.name, "path": path, "headers": headers}).encode()
            self.conn.send_headers(sid, [(":status", str(pod.fail_status or 200)), ("x-pod", pod.name),
                                         ("content-length", str(len(body)))])
            self.conn.send_data(sid, body, end_stream=True)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())


async def _echo(pod: Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server-first TCP service: greets, then echoes until the client half-closes."""
    pod.hits += 1
    try:
        writer.write(f"hello from {pod.name}\n".encode())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


# --- clients over HBONE ----------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


class H1Client:
    """HTTP/1.1 (h11) inside one HBONE tunnel; keep-alive across requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any, tunnel: Any) -> None:
        self.reader, self.writer, self.tunnel = reader, writer, tunnel
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", host: str = "web.default.svc.cluster.local") -> Response:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("host", host), *(headers or [])]
        if body:
            hdrs.append(("content-length", str(len(body))))
        self.writer.write(self.conn.send(h11.Request(method=method, target=path, headers=hdrs)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        status, rheaders, data = 0, [], bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                chunk = await self.reader.read(65536)
                self.conn.receive_data(chunk)
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                rheaders = [(n.decode(), v.decode()) for n, v in ev.headers]
            elif isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return Response(status, dict(rheaders), bytes(data), header_list=rheaders)

    async def raw(self, data: bytes) -> bytes:
        """Send raw bytes, return everything until the waypoint closes the stream."""
        self.writer.write(data)
        out = bytearray()
        while chunk := await self.reader.read(65536):
            out += chunk
        return bytes(out)


class H2Client:
    """HTTP/2 (prior knowledge) inside one HBONE tunnel; concurrent requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any, tunnel: Any) -> None:
        self.reader, self.writer, self.tunnel = reader, writer, tunnel
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self.streams: dict[int, dict[str, Any]] = {}
        self.reset: dict[int, int] = {}
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                for s in self.streams.values():
                    if not s["done"].done():
                        s["done"].set_exception(ConnectionResetError("connection closed"))
                return
            for e in self.conn.receive_data(data):
                s = self.streams.get(getattr(e, "stream_id", 0))
                if isinstance(e, h2ev.ResponseReceived) and s:
                    s["headers"] = list(e.headers)
                elif isinstance(e, h2ev.DataReceived) and s:
                    s["body"] += e.data
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, h2ev.TrailersReceived) and s:
                    if s["headers"] is None:
                        s["headers"] = list(e.headers)
                    else:
                        s["trailers"] = dict(e.headers)
                elif isinstance(e, h2ev.StreamEnded) and s and not s["done"].done():
                    s["done"].set_result(None)
                elif isinstance(e, h2ev.StreamReset) and s and not s["done"].done():
                    self.reset[e.stream_id] = e.error_code
                    s["done"].set_exception(ConnectionResetError(f"stream reset {e.error_code}"))
            self.writer.write(self.conn.data_to_send())

    async def request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", authority: str = "grpc.default.svc.cluster.local") -> Response:
        sid = self.conn.get_next_available_stream_id()
        done = asyncio.get_running_loop().create_future()
        self.streams[sid] = {"headers": None, "body": b"", "trailers": {}, "done": done}
        hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority),
                *(headers or [])]
        self.conn.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        await done
        s = self.streams.pop(sid)
        hl = [(n, v) for n, v in s["headers"] if not n.startswith(":")]
        status = int(dict(s["headers"])[":status"])
        return Response(status, dict(hl), s["body"], s["trailers"], hl)

    async def close(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self._reader_task
        self.writer.close()


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# --- the environment -------------------------------------------------------------------------------------


@dataclass
class Env:
    ca: CertificateAuthority
    app: WaypointApp
    mesh: MeshStore
    pool: HbonePool
    pods: dict[str, Pod]
    services: dict[str, Service]
    log_lines: list[str]
    registry: CollectorRegistry
    hbone_port: int
    client_cert: Any = None
    other_cert: Any = None

    @property
    def waypoint(self) -> tuple[str, int]:
        assert self.app.address is not None
        return ("127.0.0.1", self.app.address[1])

    def vip(self, service: str) -> str:
        return str(self.services[service].vips[0].address)

    async def tunnel(self, service: str = "web", port: int = 80, *, cert: Any = None,
                     authority: str | None = None, src: tuple[str, int] = (CLIENT_IP, 40000)) -> Any:
        req = TunnelRequest(authority=authority or f"{self.vip(service)}:{port}", src_addr=src)
        identity = WAYPOINT_ID
        # The tunnel leaves from the client's own address, as an agent's does from inside the client pod:
        # the waypoint takes the source from the TCP connection, not from `forwarded`.
        return await self.pool.connect(cert or self.client_cert, self.waypoint, [identity], req, source_ip=src[0])

    async def h1(self, service: str = "web", port: int = 80, **kw: Any) -> H1Client:
        t = await self.tunnel(service, port, **kw)
        r, w = t.streams()
        return H1Client(r, w, t)

    async def h2(self, service: str = "grpc", port: int = 50051, **kw: Any) -> H2Client:
        t = await self.tunnel(service, port, **kw)
        r, w = t.streams()
        return H2Client(r, w, t)

    def apply(self, text: str) -> list[Any]:
        results = [self.app.config.apply(doc) for doc in yaml.safe_load_all(text) if doc]
        for r in results:
            assert r.accepted, r.message
        return results

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def hits(self) -> Counter[str]:
        return Counter({name: pod.hits for name, pod in self.pods.items()})

    def reset_hits(self) -> None:
        for pod in self.pods.values():
            pod.hits = 0
            pod.attempt_headers.clear()


def _loopback_block() -> int:
    return random.randrange(10, 250)


async def _listen_pods(pods: list[Pod], server_certs: dict[str, Any], ca: CertificateAuthority,
                       registry: CollectorRegistry) -> int:
    """Start every pod's apps and its HBONE front on one common port; returns that port."""
    for pod in pods:
        runner = await _http_app(pod)
        site = web.TCPSite(runner, pod.ip, 0)
        await site.start()
        pod.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pod.runners.append(runner)
        srv = await asyncio.get_running_loop().create_server(lambda p=pod: H2App(p), pod.ip, 0)
        pod.h2_port = srv.sockets[0].getsockname()[1]
        pod.servers.append(srv)
        echo = await asyncio.start_server(lambda r, w, p=pod: _echo(p, r, w), pod.ip, 0)
        pod.echo_port = echo.sockets[0].getsockname()[1]
        pod.servers.append(echo)
    metrics = HboneMetrics(CollectorRegistry())
    for _ in range(50):
        port = random.randrange(20000, 60000)
        started: list[HboneServer] = []
        try:
            for pod in pods:
                cert = server_certs[pod.name]
                server = HboneServer(lambda _l, c=cert: c, TD, ca.bundle, metrics=metrics)
                started.append(server)
                await server.listen(pod.ip, port)
                pod.hbone = server
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            for s in started:
                await s.close(0.1)
    raise RuntimeError("no free common HBONE port for the test pods")


@contextlib.asynccontextmanager
async def waypoint_env(*, pods: dict[str, dict[str, str]] | None = None, extra_services: list[Service] | None = None,
                       limits: ServerLimits | None = None, filters: list[Any] | None = None,
                       bind_web: bool = True, access_log: str = "text", trace_exporter: Any = None,
                       sampling: float = 1.0, seed: int | None = None) -> AsyncIterator[Env]:
    """A waypoint for Services `web` (HTTP/1.1, port 80) and `grpc` (h2c, port 50051), backed by `pods`
    (name -> labels; default two pods v1/v2 of app web)."""
    ca = CertificateAuthority.create(TD)
    block = _loopback_block()
    pod_specs = pods or {"web-v1": {"app": "web", "version": "v1"}, "web-v2": {"app": "web", "version": "v2"}}
    pod_list = [Pod(name, f"127.{block}.{i // 200}.{i % 200 + 10}", labels) for i, (name, labels)
                in enumerate(pod_specs.items())]
    server_certs = {p.name: ca.issue_workload(SpiffeId(TD, "default", SERVER_SA)) for p in pod_list}
    registry = CollectorRegistry()
    hbone_port = await _listen_pods(pod_list, server_certs, ca, registry)
    suffix = secrets.token_hex(2)
    vip_base = f"127.255.{random.randrange(1, 250)}."
    web_host, grpc_host = "web.default.svc.cluster.local", "grpc.default.svc.cluster.local"
    waypoint = WAYPOINT_REF if bind_web else None
    web_ports = {p.name: p.http_port for p in pod_list}
    services = {
        "web": Service("web", "default", web_host, (NetworkAddress("", ipaddress.ip_address(vip_base + "1")),),
                       {80: 8080}, waypoint=waypoint),
        "grpc": Service("grpc", "default", grpc_host, (NetworkAddress("", ipaddress.ip_address(vip_base + "2")),),
                        {50051: 50051}, waypoint=WAYPOINT_REF),
        "plain": Service("plain", "default", "plain.default.svc.cluster.local",
                         (NetworkAddress("", ipaddress.ip_address(vip_base + "3")),), {80: 8080}),
        "echo": Service("echo", "default", "echo.default.svc.cluster.local",
                        (NetworkAddress("", ipaddress.ip_address(vip_base + "4")),), {9000: 9000},
                        waypoint=WAYPOINT_REF),
    }
    for i, p in enumerate(pod_list):  # one single-pod Service per pod, for backendRefs and weights
        services[p.name] = Service(p.name, "default", f"{p.name}.default.svc.cluster.local",
                                   (NetworkAddress("", ipaddress.ip_address(vip_base + str(10 + i))),),
                                   {80: 8080}, waypoint=WAYPOINT_REF)
    for svc in extra_services or []:
        services[svc.name] = svc
    workloads = [Workload(f"test//v1/Pod/default/{p.name}-{suffix}", p.name, "default", (p.ip,),
                          service_account=SERVER_SA, protocol=Protocol.HBONE, labels=p.labels,
                          canonical_name=p.labels.get("app", ""), canonical_revision=p.labels.get("version", ""),
                          services={f"default/{web_host}": {80: web_ports[p.name]},
                                    f"default/{grpc_host}": {50051: p.h2_port},
                                    "default/plain.default.svc.cluster.local": {80: web_ports[p.name]},
                                    "default/echo.default.svc.cluster.local": {9000: p.echo_port},
                                    f"default/{p.name}.default.svc.cluster.local": {80: web_ports[p.name]}})
                 for p in pod_list]
    workloads.append(Workload(f"test//v1/Pod/default/sleep-{suffix}", "sleep", "default", (CLIENT_IP,),
                              service_account="sleep", protocol=Protocol.HBONE, labels={"app": "sleep"},
                              canonical_name="sleep", canonical_revision="v1", workload_name="sleep"))
    mesh = MeshStore()
    mesh.replace("test", ConfigSet(tuple(workloads), tuple(services.values())))
    lines: list[str] = []
    settings = WaypointSettings(namespace="default", name="waypoint", listen=("127.0.0.1", 0),
                                hbone_port=hbone_port, limits=limits or ServerLimits(), access_log=access_log,
                                sampling=sampling, connect_timeout=5.0)
    app = WaypointApp(settings, cert=ca.issue_workload(WAYPOINT_ID), mesh=mesh, filters=filters or [],
                      registry=registry, access_log_sink=lines.append, rng=random.Random(seed),
                      trace_exporter=trace_exporter)
    pool = HbonePool(bundle=ca.bundle, metrics=HboneMetrics(CollectorRegistry()),
                     limits=HboneLimits(max_header_list_size=16 * 1024, max_concurrent_streams=100))
    env = Env(ca, app, mesh, pool, {p.name: p for p in pod_list}, services, lines, registry, hbone_port)
    env.client_cert = ca.issue_workload(CLIENT_ID)
    env.other_cert = ca.issue_workload(OTHER_CLIENT_ID)
    try:
        await app.start()
        yield env
    finally:
        await pool.close(drain_timeout=0.5)
        await app.close(drain_timeout=0.5)
        for pod in pod_list:
            if pod.hbone is not None:
                await pod.hbone.close(0.5)
            for srv in pod.servers:
                srv.close()
            for runner in pod.runners:
                await runner.cleanup()


def free_loopback_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


async def many(coros: list[Any], limit: int = 16) -> list[Any]:
    """Run coroutines with bounded concurrency, keeping order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))

"""Test helpers for HBONE: a CA, real loopback upstreams, and a server/pool pair wired to them.

Everything listens on 127.0.0.1 with ephemeral ports and is closed by the fixtures that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h2.events as h2ev
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from prometheus_client import CollectorRegistry

from mesh.ca import CertificateAuthority
from mesh.hbone import HboneLimits, HboneMetrics, HbonePool, HboneServer, TunnelRequest
from mesh.hbone.tunnel import Tunnel
from mesh.identity import SpiffeId, WorkloadCert

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
SERVER_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/httpbin")


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (a broken relay cannot pass by reordering blocks)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(struct.pack(">QQ", seed, counter)).digest() * 64  # 2 KiB per step
        counter += 1
    return bytes(out[:size])


def sample_metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return value or 0.0


class EchoServer:
    """TCP echo on loopback: returns every byte, then half-closes after the client's FIN."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.received_eof = 0

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    self.received_eof += 1
                    writer.write_eof()
                    break
                writer.write(data)
                await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class ResetServer:
    """Accepts, optionally reads a little, then resets the connection (RST)."""

    def __init__(self, after_bytes: int = 1) -> None:
        self.after_bytes = after_bytes
        self.server: asyncio.Server | None = None

    async def start(self) -> ResetServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            if self.after_bytes:
                await reader.readexactly(self.after_bytes)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def free_port() -> int:
    """A port nothing listens on (bound then released; fine for a refused-connection test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HboneEnv:
    ca: CertificateAuthority
    client_cert: WorkloadCert
    server_cert: WorkloadCert
    server: HboneServer
    pool: HbonePool
    echo: EchoServer
    registry: CollectorRegistry
    metrics: HboneMetrics
    port: int
    closed_tunnels: list = field(default_factory=list)

    @property
    def dst(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def tunnel(self, target_port: int | None = None, *, pool: HbonePool | None = None,
                     authority: str | None = None, **request: object) -> Tunnel:
        req = TunnelRequest(authority=authority or f"127.0.0.1:{target_port or self.echo.port}",
                            src_addr=("127.0.0.1", 40000), **request)  # type: ignore[arg-type]
        return await (pool or self.pool).connect(self.client_cert, self.dst, [SERVER_ID], req)


@contextlib.asynccontextmanager
async def hbone_env(*, limits: HboneLimits | None = None, client_limits: HboneLimits | None = None,
                    **server_kwargs: object) -> AsyncIterator[HboneEnv]:
    ca = CertificateAuthority.create(TRUST_DOMAIN)
    client_cert = ca.issue_workload(CLIENT_ID)
    server_cert = ca.issue_workload(SERVER_ID)
    registry = CollectorRegistry()
    metrics = HboneMetrics(registry)
    echo = await EchoServer().start()
    closed: list = []
    kwargs = dict(server_kwargs)
    kwargs.setdefault("on_tunnel_closed", lambda info, stats: closed.append((info, stats)))
    server = HboneServer(lambda local: server_cert, TRUST_DOMAIN, ca.bundle, metrics=metrics,
                         **({"limits": limits} if limits else {}), **kwargs)  # type: ignore[arg-type]
    listener = await server.listen("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    pool = HbonePool(bundle=ca.bundle, metrics=metrics, **({"limits": client_limits} if client_limits else {}))
    env = HboneEnv(ca, client_cert, server_cert, server, pool, echo, registry, metrics, port, closed)
    try:
        yield env
    finally:  # tests may leave tunnels open on purpose: do not wait long for them to drain
        await pool.close(drain_timeout=0.2)
        await server.close(drain_timeout=0.2)
        await echo.close()


async def echo_roundtrip(tunnel: Tunnel, payload: bytes, chunk: int = 256 * 1024) -> bytes:
    """Send ``payload`` and half-close while reading the echo; return everything read back."""
    reader, writer = tunnel.streams()

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), chunk):
            writer.write(bytes(view[i : i + chunk]))
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    received = bytearray()
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        received += data
    await sender
    return bytes(received)


# ---- hostile peers ---------------------------------------------------------------------------------


def ssl_client_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes, alpn: list[str] | None = None,
                       minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    """A client context from raw PEM, for certificates no WorkloadCert would accept."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = minimum
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    if chain_pem:
        with tempfile.TemporaryDirectory() as d:
            cert_path, key_path = Path(d) / "c.pem", Path(d) / "k.pem"
            cert_path.write_bytes(chain_pem)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem)
            ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.set_alpn_protocols(alpn if alpn is not None else ["h2"])
    return ctx


def workload_context(cert: WorkloadCert, roots_pem: bytes | None = None) -> ssl.SSLContext:
    return ssl_client_context(cert.chain_pem(), cert.key_pem(), roots_pem or cert.roots_pem())


def odd_leaf(ca: CertificateAuthority, names: list[x509.GeneralName], *,
             not_after_delta: timedelta = timedelta(hours=1),
             not_before_delta: timedelta = timedelta(minutes=-5)) -> tuple[bytes, bytes]:
    """A client leaf signed by ``ca``'s root with whatever SANs and validity a test needs (chain, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + not_before_delta)
        .not_valid_after(now + not_after_delta)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    assert ca.root_key is not None
    cert = builder.sign(ca.root_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class RawH2:
    """A hand-driven HTTP/2 client over real TLS that sends what a well-behaved client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                               validate_outbound_headers=False, normalize_outbound_headers=False,
                                               validate_inbound_headers=False, normalize_inbound_headers=False))
        self.events: list[h2ev.Event] = []
        self.auto_flush = True  # answer the server (SETTINGS ACK...) while reading

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext | None, *, preface: bool = True) -> RawH2:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
        peer = cls(reader, writer)
        if preface:
            peer.h2.initiate_connection()
            peer.flush()
        return peer

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send_headers_raw(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_headers: bool = True) -> None:
        """A HEADERS frame built by hand (h2 would refuse some of what hostile tests send)."""
        block = self.h2.encoder.encode(headers)
        flags = 0x4 if end_headers else 0x0
        self.send_raw(len(block).to_bytes(3, "big") + b"\x01" + bytes([flags]) + stream_id.to_bytes(4, "big") + block)

    def request(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        self.flush()
        return sid

    async def until(self, predicate: Callable[[h2ev.Event], bool], timeout: float = 10.0) -> h2ev.Event:
        """Read until an event matches; raises EOFError if the connection ends first."""
        async def loop() -> h2ev.Event:
            while True:
                for e in self.events:
                    if predicate(e):
                        self.events.remove(e)
                        return e
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError(f"connection closed; events so far: {self.events}")
                self.events.extend(self.h2.receive_data(data))
                if self.auto_flush:
                    self.flush()
                else:
                    self.h2.data_to_send()

        return await asyncio.wait_for(loop(), timeout)

    async def response(self, sid: int, timeout: float = 10.0) -> int:
        e = await self.until(lambda e: isinstance(e, h2ev.ResponseReceived) and e.stream_id == sid, timeout)
        return int(dict(e.headers)[b":status"])

    async def goaway(self, timeout: float = 10.0) -> h2ev.ConnectionTerminated:
        return await self.until(lambda e: isinstance(e, h2ev.ConnectionTerminated), timeout)  # type: ignore[return-value]

    async def closed(self, timeout: float = 10.0) -> bytes:
        """Read to EOF (raw bytes, unparsed), for peers that may get no HTTP/2 at all."""
        out = bytearray()

        async def loop() -> None:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                out.extend(data)

        await asyncio.wait_for(loop(), timeout)
        return bytes(out)

    def close(self) -> None:
        self.writer.close()


def connect_headers(authority: str, method: bytes = b"CONNECT", extra: list[tuple[bytes, bytes]] | None = None
                    ) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":authority", authority.encode()), *(extra or [])]


class KeepTalking:
    """A good tunnel that keeps exchanging messages while a test attacks the server."""

    def __init__(self, env: HboneEnv) -> None:
        self.env = env
        self.exchanges = 0
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> KeepTalking:
        tunnel = await self.env.tunnel()
        reader, writer = tunnel.streams()

        async def talk() -> None:
            try:
                while not self._stop.is_set():
                    msg = f"msg {self.exchanges}".encode()
                    writer.write(msg)
                    if await asyncio.wait_for(reader.readexactly(len(msg)), 10) != msg:
                        raise AssertionError("echo mismatch")
                    self.exchanges += 1
                    await asyncio.sleep(0.005)
                writer.write_eof()
                await asyncio.wait_for(reader.read(), 10)
            except BaseException as exc:
                self.error = exc

        self._task = asyncio.ensure_future(talk())
        return self

    async def checkpoint(self) -> None:
        """Wait until the good tunnel has made progress since now."""
        start = self.exchanges
        for _ in range(1000):
            if self.exchanges > start + 1 or self.error is not None:
                break
            await asyncio.sleep(0.01)
        assert self.error is None, f"the good stream failed: {self.error!r}"
        assert self.exchanges > start, "the good stream made no progress"

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 15)
        assert self.error is None, f"the good stream failed: {self.error!r}"

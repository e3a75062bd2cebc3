"""Dialling HBONE: one TLS connection to ``dst:15008`` and CONNECT streams over it.

The connection is made as ztunnel makes it: the source workload's certificate, no SNI (IPs are not
legal there), ALPN ``h2``, TLS 1.3; optionally bound to the source pod's IP and marked ``SO_MARK``
0x539 so the pod's own redirection does not capture the agent's socket. The server must prove one of
the expected SPIFFE identities before the HTTP/2 preface is sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mesh.hbone.connection import HboneConnection
from mesh.hbone.constants import CLIENT_LIMITS, HboneLimits
from mesh.hbone.errors import HandshakeError, HboneError
from mesh.hbone.headers import Authority, Baggage, TraceParent, format_forwarded
from mesh.hbone.metrics import HboneMetrics, default_metrics
from mesh.hbone.protocol import build_connect_headers
from mesh.hbone.tls import ContextCache, check_negotiated, server_identity
from mesh.hbone.tuning import tune_allocator
from mesh.hbone.tunnel import Tunnel
from mesh.identity import SpiffeId, TrustBundle, WorkloadCert

SOL_IP = getattr(socket, "SOL_IP", 0)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


SocketFactory = Callable[[], Awaitable[socket.socket]]


@dataclass(frozen=True)
class TunnelRequest:
    """What one CONNECT says: the target and the client's self-description (ztunnel's headers)."""

    authority: Authority | str
    src_addr: tuple[str, int] | None = None  # goes into forwarded: for="ip:port"
    host: str | None = None  # forwarded ;host= when the client addressed a service by name
    baggage: Baggage | str | None = None
    traceparent: TraceParent | None = None
    extra_headers: tuple[tuple[str, str], ...] = field(default=())

    def headers(self) -> list[tuple[bytes, bytes]]:
        forwarded = None
        if self.src_addr is not None:
            forwarded = format_forwarded(self.src_addr[0], self.src_addr[1], self.host)
        return build_connect_headers(self.authority, forwarded=forwarded, baggage=self.baggage,
                                     traceparent=self.traceparent or TraceParent.generate(),
                                     extra=self.extra_headers)


def _expected(expected_sans: Sequence[SpiffeId | str]) -> tuple[str, ...]:
    if not expected_sans:
        raise HboneError("expected_sans is empty: the server's identity could not be checked", reason="config")
    return tuple(sorted({str(SpiffeId.parse(str(s))) for s in expected_sans}))


class HboneClient:
    """Dials HBONE connections (no pooling: see :class:`~mesh.hbone.pool.HbonePool` for that)."""

    def __init__(self, *, bundle: TrustBundle | None = None, limits: HboneLimits = CLIENT_LIMITS,
                 metrics: HboneMetrics | None = None, mark: int | None = None,
                 transparent: bool = False, socket_factory: SocketFactory | None = None) -> None:
        self.bundle = bundle
        self.limits = limits
        self.metrics = metrics or default_metrics()
        self.mark = mark
        self.transparent = transparent
        # The node agent dials from inside a pod's network namespace: it hands in a factory that makes the
        # socket there (a socket's namespace is fixed when it is created).
        self.socket_factory = socket_factory
        self._contexts = ContextCache(server_side=False)
        tune_allocator()

    async def dial(self, cert: WorkloadCert, dst: tuple[str, int], expected_sans: Sequence[SpiffeId | str], *,
                   source_ip: str | None = None) -> HboneConnection:
        """TCP + TLS + identity check + HTTP/2 preface; raises HandshakeError or OSError."""
        expected = _expected(expected_sans)
        bundle = self.bundle if self.bundle is not None else cert.roots
        ctx = self._contexts.get(cert, self.bundle)
        loop = asyncio.get_running_loop()
        host, port = dst[0], int(dst[1])
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = await self.socket_factory() if self.socket_factory is not None else socket.socket(family)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            if source_ip is not None:
                if self.transparent:  # spoof a pod IP that is not local (node-level mode)
                    sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
                    sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
                sock.bind((source_ip, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), self.limits.connect_timeout)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                self.metrics.handshake_failures.labels("outbound", "connect_timeout").inc()
                raise HboneError(f"TCP connect to {host}:{port} timed out after {self.limits.connect_timeout}s "
                                 "(is a NetworkPolicy blocking HBONE port 15008?)", reason="connect_timeout") from None
            if isinstance(exc, OSError):
                self.metrics.handshake_failures.labels("outbound", "connect").inc()
            raise

        def verify(ssl_object: object) -> SpiffeId:
            check_negotiated(ssl_object)  # type: ignore[arg-type]
            return server_identity(ssl_object, bundle, expected)  # type: ignore[arg-type]

        conn = HboneConnection(client_side=True, limits=self.limits, metrics=self.metrics, verify=verify)
        try:
            await loop.create_connection(lambda: conn, sock=sock, ssl=ctx, server_hostname="",
                                         ssl_handshake_timeout=self.limits.tls_handshake_timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = "handshake_timeout" if isinstance(exc, TimeoutError) else "tls"
            self.metrics.handshake_failures.labels("outbound", reason).inc()
            raise HandshakeError(f"TLS to {host}:{port} failed: {exc!r}", reason=reason) from exc
        if conn.handshake_error is not None:
            err = conn.handshake_error
            reason = getattr(err, "reason", "tls")
            self.metrics.handshake_failures.labels("outbound", reason).inc()
            raise HandshakeError(f"{host}:{port}: {err}", reason=reason)
        return conn

    async def connect(self, cert: WorkloadCert, dst: tuple[str, int], expected_sans: Sequence[SpiffeId | str],
                      request: TunnelRequest, *, source_ip: str | None = None) -> Tunnel:
        """A dedicated connection with one tunnel; the connection closes when the tunnel does."""
        conn = await self.dial(cert, dst, expected_sans, source_ip=source_ip)
        try:
            tunnel = await conn.open_tunnel(request.headers(), self.limits.connect_timeout)
        except BaseException:
            conn.close()
            raise
        tunnel._closed.add_done_callback(lambda _f: conn.close())
        return tunnel



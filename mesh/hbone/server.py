"""The HBONE server (the inbound side of port 15008).

Per accepted TCP connection: pick the certificate for the address it was accepted on (the agent
presents a different pod identity on each pod's listener), TLS 1.3 with a required client certificate,
identity checks, then HTTP/2. Per CONNECT stream, in ztunnel's order: validate the request (400), check
that the authority is the address we accepted on unless the policy says otherwise (400), authorize
(401), dial the upstream (503), and only then answer 200 and relay. Every refusal is logged with the
peer's identity and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from h2.errors import ErrorCodes

from mesh.hbone.connection import HboneConnection
from mesh.hbone.constants import SERVER_LIMITS, HboneLimits
from mesh.hbone.errors import HandshakeError, TunnelReset
from mesh.hbone.metrics import HboneMetrics, default_metrics
from mesh.hbone.protocol import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_SERVICE_UNAVAILABLE,
    STATUS_UNAUTHORIZED,
    ConnectRequest,
)
from mesh.hbone.relay import relay
from mesh.hbone.tls import ContextCache, check_negotiated, client_identity, start_tls_server
from mesh.hbone.tuning import tune_allocator
from mesh.hbone.tunnel import ConnectInfo, Tunnel, TunnelStats
from mesh.identity import TrustBundle, WorkloadCert

log = logging.getLogger("mesh.hbone.server")

Upstream = socket.socket | tuple[asyncio.StreamReader, asyncio.StreamWriter]
CertProvider = Callable[[tuple[str, int]], WorkloadCert | Awaitable[WorkloadCert]]
Authorizer = Callable[[ConnectInfo], bool | Awaitable[bool]]
UpstreamDialer = Callable[[ConnectInfo], Awaitable[Upstream]]
AddressCheck = Callable[[ConnectInfo], bool]
TunnelObserver = Callable[[ConnectInfo, TunnelStats], None]


def authority_matches_local_address(info: ConnectInfo) -> bool:
    """ztunnel's rule: the tunnel must target the pod IP the connection was accepted on."""
    ip = info.request.authority.ip
    if ip is None:
        return False
    try:
        local = ipaddress.ip_address(info.local_address[0])
    except ValueError:
        return False
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
        local = local.ipv4_mapped
    return ip == local


def any_authority(info: ConnectInfo) -> bool:
    """For a waypoint, which accepts every authority it serves (routing decides later)."""
    return True


async def dial_tcp(info: ConnectInfo, timeout: float = 10.0, mark: int | None = None) -> socket.socket:
    """Default upstream: a TCP connection to the authority (the caller may bind/mark differently)."""
    host, port = info.destination
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _Handshake(asyncio.Protocol):
    """Holds an accepted TCP connection, paused, until the server has chosen its certificate."""

    def __init__(self, server: HboneServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        # asyncio turns Nagle off only for sockets it created as IPPROTO_TCP; a listener made elsewhere
        # (the agent's, inside a pod's namespace, with proto 0) would otherwise hold every small reply
        # until the peer's delayed ACK.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._spawn(self.server._accept(transport))

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class HboneServer:
    """Accepts HBONE; ``authorize`` and ``connect_upstream`` are the caller's policy and dialler."""

    def __init__(self, cert_provider: CertProvider, trust_domain: str, bundle: TrustBundle, *,
                 authorize: Authorizer | None = None,
                 connect_upstream: UpstreamDialer | None = None,
                 local_address_check: AddressCheck | None = authority_matches_local_address,
                 allow_hostname_authority: bool = False,
                 on_tunnel_closed: TunnelObserver | None = None,
                 limits: HboneLimits = SERVER_LIMITS,
                 metrics: HboneMetrics | None = None) -> None:
        self.cert_provider = cert_provider
        self.trust_domain = trust_domain
        self.bundle = bundle
        self.authorize = authorize or (lambda info: True)
        self.connect_upstream = connect_upstream or (lambda info: dial_tcp(info, limits.connect_timeout))
        self.local_address_check = local_address_check
        self.allow_hostname_authority = allow_hostname_authority
        self.on_tunnel_closed = on_tunnel_closed
        self.limits = limits
        self.metrics = metrics or default_metrics()
        self.connections: set[HboneConnection] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._contexts = ContextCache(server_side=True)
        self._closing = False
        tune_allocator()

    # ---- listeners ---------------------------------------------------------------------------------

    async def listen(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Handshake(self), host, port, reuse_port=reuse_port,
                                          backlog=backlog)
        self._servers.append(server)
        return server

    async def serve_socket(self, sock: socket.socket, backlog: int = 1024) -> asyncio.Server:
        """Serve on a listening socket made elsewhere (e.g. inside a pod's network namespace)."""
        sock.setblocking(False)
        server = await asyncio.get_running_loop().create_server(lambda: _Handshake(self), sock=sock,
                                                                backlog=backlog)
        self._servers.append(server)
        return server

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for srv in self._servers for s in (srv.sockets or ())]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- accept: certificate, TLS, identity --------------------------------------------------------

    def _handshake_failed(self, peer: Any, reason: str, message: str) -> None:
        self.metrics.handshake_failures.labels("inbound", reason).inc()
        log.warning("hbone inbound %s: handshake refused: %s (%s)", peer, message, reason)

    async def _accept(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if self._closing or local is None:
            transport.abort()
            return
        local_address = (local[0], local[1])
        try:
            cert = await asyncio.wait_for(_maybe_await(self.cert_provider(local_address)),
                                          self.limits.tls_handshake_timeout)
            ctx = self._contexts.get(cert, self.bundle)
        except Exception as exc:
            self._handshake_failed(peer, "no_certificate", f"no certificate for {local_address}: {exc!r}")
            transport.abort()
            return
        conn = HboneConnection(client_side=False, limits=self.limits, metrics=self.metrics,
                               allow_hostname_authority=self.allow_hostname_authority,
                               on_request=self._on_request, on_closed=self.connections.discard)
        try:
            tls_transport = await start_tls_server(transport, conn, ctx, self.limits.tls_handshake_timeout)
        except TimeoutError:
            self._handshake_failed(peer, "handshake_timeout",
                                   f"no TLS handshake within {self.limits.tls_handshake_timeout}s")
            transport.abort()
            return
        except ssl.SSLError as exc:
            self._handshake_failed(peer, _ssl_reason(exc), f"TLS handshake failed: {exc.reason or exc}")
            transport.abort()
            return
        except (OSError, EOFError, asyncio.CancelledError) as exc:
            if isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc):  # asyncio's timeout
                self._handshake_failed(peer, "handshake_timeout",
                                       f"no TLS handshake within {self.limits.tls_handshake_timeout}s")
            else:
                self._handshake_failed(peer, "handshake_aborted", f"connection lost during TLS: {exc!r}")
            transport.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if tls_transport is None:
            self._handshake_failed(peer, "handshake_aborted", "connection lost during TLS")
            return
        ssl_object = tls_transport.get_extra_info("ssl_object")
        try:
            check_negotiated(ssl_object)
            conn.peer_identity = client_identity(ssl_object, self.bundle, self.trust_domain)
        except HandshakeError as exc:
            self._handshake_failed(peer, exc.reason, str(exc))
            conn.reject_handshake(tls_transport, str(exc))
            return
        if self._closing:
            conn.reject_handshake(tls_transport, "server shutting down")
            return
        self.connections.add(conn)
        conn.start(tls_transport)

    # ---- streams -----------------------------------------------------------------------------------

    def _on_request(self, conn: HboneConnection, tunnel: Tunnel, request: ConnectRequest) -> None:
        assert conn.peer_identity is not None and conn.peer_address is not None and conn.local_address is not None
        info = ConnectInfo(peer_identity=conn.peer_identity, peer_address=conn.peer_address,
                           local_address=conn.local_address, request=request, stream_id=tunnel.stream_id,
                           connection_id=conn.id)
        tunnel.info = info
        self._spawn(self._serve_stream(conn, tunnel, info))

    def _refuse(self, conn: HboneConnection, tunnel: Tunnel, status: int, reason: str, message: str) -> None:
        self.metrics.stream_rejections.labels("inbound", reason).inc()
        log.warning("%s: stream %d to %s refused with %d: %s", conn.label, tunnel.stream_id,
                    tunnel.info.authority if tunnel.info else "?", status, message)
        conn.respond(tunnel, status)

    async def _serve_stream(self, conn: HboneConnection, tunnel: Tunnel, info: ConnectInfo) -> None:
        stats = TunnelStats()
        upstream: Upstream | None = None
        try:
            if self.local_address_check is not None and not self.local_address_check(info):
                self._refuse(conn, tunnel, STATUS_BAD_REQUEST, "ip_mismatch",
                             f"authority {info.authority} is not the address {info.local_address[0]} "
                             "this connection was accepted on")
                return
            try:
                allowed = bool(await _maybe_await(self.authorize(info)))
            except Exception as exc:  # a broken policy denies (fail closed)
                log.exception("%s: authorization callback failed", conn.label)
                allowed = False
                info_msg = f"authorization failed: {exc!r}"
            else:
                info_msg = f"denied by policy for {info.peer_identity}"
            if not allowed:
                self._refuse(conn, tunnel, STATUS_UNAUTHORIZED, "denied", info_msg)
                return
            try:
                upstream = await asyncio.wait_for(self.connect_upstream(info), self.limits.connect_timeout)
            except (OSError, TimeoutError, ConnectionError) as exc:
                self._refuse(conn, tunnel, STATUS_SERVICE_UNAVAILABLE, "upstream_connect",
                             f"upstream {info.authority} unreachable: {exc!r}")
                return
            if tunnel.closed:
                stats.reset = True
                stats.error = "stream closed before the upstream connected"
                return
            conn.respond(tunnel, STATUS_OK)
            chosen, upstream = upstream, None
            stats = await relay(tunnel, chosen)
        except asyncio.CancelledError:
            tunnel.reset(ErrorCodes.CANCEL, "server shutting down")
            raise
        except Exception as exc:
            log.exception("%s: stream %d failed", conn.label, tunnel.stream_id)
            stats.reset, stats.error = True, repr(exc)
            if tunnel.response is None and not tunnel.closed:
                with contextlib.suppress(TunnelReset):
                    tunnel.reset(ErrorCodes.INTERNAL_ERROR, "server error")
        finally:
            _close_upstream(upstream)
            if self.on_tunnel_closed is not None:
                try:
                    self.on_tunnel_closed(info, stats)
                except Exception:
                    log.exception("on_tunnel_closed callback failed")

    # ---- shutdown ----------------------------------------------------------------------------------

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting; GOAWAY every connection; wait for in-flight streams; then close everything."""
        self._closing = True
        for srv in self._servers:
            srv.close()
        await asyncio.gather(*(c.shutdown(drain_timeout) for c in list(self.connections)),
                             return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for srv in self._servers:  # (from Python 3.12 on this also waits for accepted connections)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 5.0)

    async def __aenter__(self) -> HboneServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(drain_timeout=1.0)


def _close_upstream(upstream: Upstream | None) -> None:
    if upstream is None:
        return
    if isinstance(upstream, socket.socket):
        upstream.close()
    else:
        upstream[1].close()


def _ssl_reason(exc: ssl.SSLError) -> str:
    text = f"{exc.reason or ''} {getattr(exc, 'verify_message', '')} {exc}".lower()
    for needle, reason in (("expired", "cert_expired"), ("unknown ca", "unknown_ca"),
                           ("local issuer", "unknown_ca"), ("self-signed", "unknown_ca"),
                           ("not yet valid", "cert_not_yet_valid"),
                           ("certificate verify failed", "cert_verify"), ("peer did not return", "no_client_cert"),
                           ("certificate required", "no_client_cert"), ("no shared cipher", "cipher"),
                           ("no suitable", "cipher"), ("version", "tls_version"), ("alpn", "alpn"),
                           ("wrong version number", "not_tls"), ("http request", "not_tls")):
        if needle in text:
            return reason
    return "tls_error"

"""HBONE in: the waypoint's own 15008 listener, and protocol detection on each inner stream.

The listener presents the waypoint's identity and accepts a CONNECT for any authority (it names the
original destination, a Service VIP or a pod IP, never the waypoint), but only for Services and pods that
are bound to this waypoint with `istio.io/use-waypoint`; anything else is refused with 401 before a byte
flows (fail closed). An accepted stream is handed to an in-process server over a socket pair, which lets
the HBONE layer splice it with its fast path, and the first bytes decide: HTTP/2 preface -> h2c server,
HTTP/1.x request line -> HTTP/1.1 server, anything else (or silence) -> L4 forwarding.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from mesh.hbone import ConnectInfo, HboneLimits, HboneMetrics, HboneServer, any_authority
from mesh.identity import TrustBundle, WorkloadCert
from waypoint.server.clusters import Resolver
from waypoint.server.context import ConnectionContext, ServerLimits
from waypoint.server.handler import RequestHandler
from waypoint.server.http1 import Http1Server
from waypoint.server.http2 import Http2Server
from waypoint.server.sniff import Detected, detect
from waypoint.server.tcp import TcpForwarder

log = logging.getLogger("waypoint.inbound")


class Sniffer(asyncio.Protocol):
    """Holds the first bytes of a stream until its protocol is known, then hands the transport over."""

    def __init__(self, inbound: Inbound, ctx: ConnectionContext) -> None:
        self.inbound = inbound
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(self.inbound.limits.detection_timeout, self._timeout)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        kind = detect(self.buffer)
        if kind is not None:
            self._hand_over(kind)

    def eof_received(self) -> bool:
        self.eof = True
        self._hand_over(detect(self.buffer) or Detected.TCP)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _timeout(self) -> None:
        self._timer = None
        if not self._handed_over:
            self._hand_over(Detected.TCP)

    def _hand_over(self, kind: Detected) -> None:
        if self._handed_over or self.transport is None:
            return
        self._handed_over = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        inbound = self.inbound
        proto: asyncio.Protocol
        if kind is Detected.HTTP1:
            proto = Http1Server(inbound.handler, self.ctx, inbound.limits)
        elif kind is Detected.HTTP2:
            proto = Http2Server(inbound.handler, self.ctx, inbound.limits)
        else:
            proto = inbound.tcp.protocol(self.ctx)
        transport = self.transport
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.buffer:
            data, self.buffer = self.buffer, b""
            proto.data_received(data)
        if self.eof and not transport.is_closing():
            keep = proto.eof_received()
            if not keep:
                transport.close()


class Inbound:
    def __init__(self, *, cert: Callable[[], WorkloadCert], trust_domain: str, bundle: TrustBundle,
                 resolver: Resolver, handler: RequestHandler, tcp: TcpForwarder, limits: ServerLimits,
                 hbone_limits: HboneLimits | None = None, hbone_metrics: HboneMetrics | None = None) -> None:
        self.resolver = resolver
        self.handler = handler
        self.tcp = tcp
        self.limits = limits
        self.refused = 0
        kwargs = {"limits": hbone_limits} if hbone_limits is not None else {}
        self.server = HboneServer(lambda _local: cert(), trust_domain, bundle, authorize=self._authorize,
                                  connect_upstream=self._connect, local_address_check=any_authority,
                                  metrics=hbone_metrics, **kwargs)  # type: ignore[arg-type]
        self._sockets: set[socket.socket] = set()

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        server = await self.server.listen(host, port)
        sock = server.sockets[0].getsockname()
        self.resolver.own_addresses.add(host)
        return sock[0], sock[1]

    def _authorize(self, info: ConnectInfo) -> bool:
        authority = info.request.authority
        dest = self.resolver.destination(authority.host, authority.port)
        if dest is None:
            self.refused += 1
            log.warning("refusing HBONE from %s to %s: not a Service or pod of the mesh", info.peer_identity,
                        authority)
            return False
        if not self.resolver.served_by_us(dest):
            self.refused += 1
            log.warning("refusing HBONE from %s to %s: it does not use waypoint %s/%s", info.peer_identity,
                        authority, self.resolver.waypoint.namespace, self.resolver.waypoint.name)
            return False
        return True

    async def _connect(self, info: ConnectInfo) -> socket.socket:
        authority = info.request.authority
        # The tunnel's own TCP source is the calling pod (its agent dials from inside it). The `forwarded`
        # header is written by the caller: taking the source from it would let any mesh workload claim
        # another address and pass an ipBlocks rule. So policy, logs and metrics use the TCP source.
        source: tuple[str, int] | None = info.peer_address
        ctx = ConnectionContext(peer_identity=str(info.peer_identity), source=source,
                                destination=(authority.host, authority.port), local=info.local_address,
                                connect_traceparent=str(info.request.traceparent) if info.request.traceparent else None)
        ours, theirs = socket.socketpair()
        try:
            ours.setblocking(False)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: Sniffer(self, ctx), sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs

    async def close(self, drain_timeout: float = 1.0) -> None:
        await self.server.close(drain_timeout=drain_timeout)

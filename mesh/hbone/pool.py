"""Connection pooling for HBONE: many tunnels per HTTP/2 connection, ztunnel's rules.

* Key: (source identity, destination identities, destination ip:port, source IP): the source IP is in
  the key because the connection is bound to it.
* Each key has 1..N connections; a connection takes at most ``max_streams`` streams (100, or the peer's
  lower ``SETTINGS_MAX_CONCURRENT_STREAMS``); a new one is dialled when all are full.
* Only one dial at a time per key; callers wait on the key's lock rather than racing dials.
* Idle connections close themselves after ``limits.idle_timeout`` (5 min); draining or dead ones leave.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.hbone.client import HboneClient, SocketFactory, TunnelRequest, _expected
from mesh.hbone.connection import HboneConnection
from mesh.hbone.constants import CLIENT_LIMITS, POOL_MAX_STREAMS_PER_CONNECTION, HboneLimits
from mesh.hbone.errors import ConnectionClosedError
from mesh.hbone.metrics import HboneMetrics
from mesh.hbone.tunnel import Tunnel
from mesh.identity import SpiffeId, TrustBundle, WorkloadCert

log = logging.getLogger("mesh.hbone.pool")


@dataclass(frozen=True)
class PoolKey:
    src_identity: str
    dst_identities: tuple[str, ...]
    dst: tuple[str, int]
    source_ip: str | None


class HbonePool:
    """``connect()`` returns a tunnel over a shared connection, dialling only when needed."""

    def __init__(self, *, bundle: TrustBundle | None = None, limits: HboneLimits = CLIENT_LIMITS,
                 metrics: HboneMetrics | None = None, mark: int | None = None, transparent: bool = False,
                 max_streams: int = POOL_MAX_STREAMS_PER_CONNECTION,
                 socket_factory: SocketFactory | None = None) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be positive, got {max_streams}")
        self.client = HboneClient(bundle=bundle, limits=limits, metrics=metrics, mark=mark, transparent=transparent,
                                  socket_factory=socket_factory)
        self.limits = limits
        self.max_streams = max_streams
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._closed = False

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        if key is not None:
            return list(self._conns.get(key, ()))
        return [c for conns in self._conns.values() for c in conns]

    def _pick(self, key: PoolKey) -> HboneConnection | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        for conn in list(conns):
            if not conn.available:
                if conn.closed.done() or conn.session.closed:
                    conns.remove(conn)
                continue
            if conn.stream_capacity(self.max_streams) > 0:
                return conn
        return None

    def _drop(self, key: PoolKey, conn: HboneConnection) -> None:
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                self._conns.pop(key, None)
                lock = self._locks.get(key)
                if lock is not None and not lock.locked():
                    del self._locks[key]

    async def _checkout(self, key: PoolKey, cert: WorkloadCert, expected: Sequence[str]) -> HboneConnection:
        conn = self._pick(key)
        if conn is None:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                conn = self._pick(key)  # someone else may have dialled while we waited
                if conn is None:
                    if self._closed:
                        raise ConnectionClosedError("HBONE pool is closed")
                    conn = await self.client.dial(cert, key.dst, expected, source_ip=key.source_ip)
                    self._conns.setdefault(key, []).append(conn)
                    conn.closed.add_done_callback(lambda _f, k=key, c=conn: self._drop(k, c))
        conn.reserved += 1
        return conn

    async def connect(self, cert: WorkloadCert, dst: tuple[str, int], expected_sans: Sequence[SpiffeId | str],
                      request: TunnelRequest, *, source_ip: str | None = None) -> Tunnel:
        """A tunnel to ``request.authority`` through ``dst`` (normally ``<pod ip>:15008``)."""
        if self._closed:
            raise ConnectionClosedError("HBONE pool is closed")
        expected = _expected(expected_sans)
        key = PoolKey(str(cert.identity), expected, (dst[0], int(dst[1])), source_ip)
        headers = request.headers()
        for attempt in range(2):
            conn = await self._checkout(key, cert, expected)
            try:
                return await conn.open_tunnel(headers, self.limits.connect_timeout, reserved=True)
            except ConnectionClosedError:
                # The connection started draining (GOAWAY) between pick and send: retry once, fresh.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def close(self, drain_timeout: float | None = None) -> None:
        """GOAWAY every pooled connection, letting open tunnels finish up to ``drain_timeout``."""
        self._closed = True
        conns = self.connections()
        self._conns.clear()
        await asyncio.gather(*(c.shutdown(drain_timeout) for c in conns), return_exceptions=True)

    async def __aenter__(self) -> HbonePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(drain_timeout=1.0)

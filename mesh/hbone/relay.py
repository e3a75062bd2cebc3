"""Move bytes between a plain TCP connection and an HBONE tunnel, both ways, with half-close.

The hot path is callbacks only, no tasks: the TCP side is an ``asyncio.Protocol`` whose
``data_received`` writes straight into the tunnel (the same ``bytes`` object ends up in the TLS writer)
and whose transport is paused when the tunnel's window or the TLS writer is full; tunnel data is written
to TCP and acknowledged to the peer unless the TCP writer is over its high-water mark.

Semantics (RFC 9113 §8.5 for CONNECT):
* TCP FIN -> END_STREAM; END_STREAM -> ``shutdown(SHUT_WR)``; done when both directions ended.
* TCP RST (or any socket error) -> RST_STREAM(CONNECT_ERROR); RST_STREAM -> TCP RST (``SO_LINGER`` 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from h2.errors import ErrorCodes

from mesh.hbone.tunnel import Tunnel, TunnelStats

_LINGER_RST = struct.pack("ii", 1, 0)
TCP_HIGH_WATER = 1024 * 1024


def _abort_with_rst(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class TcpTunnelPipe(asyncio.Protocol):
    """One TCP connection spliced to one tunnel; ``done`` resolves to the byte counts."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.stats = TunnelStats()
        self.done: asyncio.Future[TunnelStats] = tunnel.conn.loop.create_future()
        self._tcp_eof = False  # TCP peer sent FIN
        self._tunnel_eof = False  # tunnel peer sent END_STREAM
        self._write_paused = False
        self._reading_paused = False

    # ---- TCP side ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        self.tunnel.set_source(self)
        self.tunnel.attach_sink(self)

    def data_received(self, data: bytes) -> None:
        self.stats.sent += len(data)
        try:
            more = self.tunnel.write(data)
        except ConnectionError as exc:
            self._finish(reset=True, error=str(exc))
            return
        if not more and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._tcp_eof = True
        with contextlib.suppress(ConnectionError):
            self.tunnel.write_eof()
        self._check_done()
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is not None or not (self._tcp_eof and self._tunnel_eof):
            # The TCP side broke (RST, error) or was closed under us: the stream must not look complete.
            self.tunnel.reset(ErrorCodes.CONNECT_ERROR, f"TCP side lost: {exc or 'closed'}")
            self._finish(reset=True, error=str(exc) if exc else "tcp closed")
        else:
            self._finish(reset=False)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.tunnel.resume_receiving()

    # ---- tunnel side -------------------------------------------------------------------------------

    def tunnel_data(self, data: bytes | memoryview) -> bool:
        self.stats.received += len(data)
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        transport.write(data)  # sends now, or copies the rest into its buffer: safe for a borrowed view
        return not self._write_paused

    def tunnel_eof(self) -> None:
        self._tunnel_eof = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self._check_done()

    def tunnel_reset(self, exc: BaseException) -> None:
        if self.transport is not None and not self.done.done():
            _abort_with_rst(self.transport)
        self._finish(reset=True, error=str(exc))

    def tunnel_pause_source(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def tunnel_resume_source(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    # ---- completion --------------------------------------------------------------------------------

    def _check_done(self) -> None:
        if self._tcp_eof and self._tunnel_eof and self.transport is not None:
            # Both directions ended: close TCP once its buffer has drained; connection_lost finishes.
            self.transport.close()

    def _finish(self, reset: bool, error: str | None = None) -> None:
        if self.done.done():
            return
        self.stats.reset = reset
        self.stats.error = error
        if self.transport is not None and not self.transport.is_closing():
            if reset:
                _abort_with_rst(self.transport)
            else:
                self.transport.close()
        self.done.set_result(self.stats)


async def relay(tunnel: Tunnel, upstream: socket.socket | tuple[asyncio.StreamReader, asyncio.StreamWriter]
                ) -> TunnelStats:
    """Relay until both directions ended or either side was reset; returns bytes each way.

    ``stats.sent`` counts bytes from the TCP side into the tunnel, ``stats.received`` the other way.
    A connected ``socket.socket`` takes the fast callback path; a stream pair is copied by two tasks.
    """
    stats = await _relay(tunnel, upstream)
    metrics, direction = tunnel.conn.metrics, tunnel.conn.direction
    metrics.bytes.labels(direction, "to_tunnel").inc(stats.sent)
    metrics.bytes.labels(direction, "from_tunnel").inc(stats.received)
    return stats


async def _relay(tunnel: Tunnel, upstream: socket.socket | tuple[asyncio.StreamReader, asyncio.StreamWriter]
                 ) -> TunnelStats:
    if isinstance(upstream, socket.socket):
        upstream.setblocking(False)
        pipe = TcpTunnelPipe(tunnel)
        try:
            await tunnel.conn.loop.create_connection(lambda: pipe, sock=upstream)
        except OSError as exc:
            tunnel.reset(ErrorCodes.CONNECT_ERROR, f"cannot use upstream socket: {exc}")
            upstream.close()
            return TunnelStats(reset=True, error=str(exc))
        try:
            stats = await pipe.done
        except asyncio.CancelledError:
            tunnel.reset(ErrorCodes.CANCEL, "relay cancelled")
            if pipe.transport is not None:
                _abort_with_rst(pipe.transport)
            raise
        if not stats.reset:
            with contextlib.suppress(ConnectionError):
                await tunnel.wait_closed()
        return stats
    reader, writer = upstream
    return await _relay_streams(tunnel, reader, writer)


async def _relay_streams(tunnel: Tunnel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> TunnelStats:
    stats = TunnelStats()
    t_reader, t_writer = tunnel.streams()

    async def up() -> None:  # TCP -> tunnel
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                t_writer.write_eof()
                return
            stats.sent += len(data)
            t_writer.write(data)
            await t_writer.drain()

    async def down() -> None:  # tunnel -> TCP
        while True:
            data = await t_reader.read(256 * 1024)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            stats.received += len(data)
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        for fut in asyncio.as_completed(tasks):
            await fut
    except (ConnectionError, OSError) as exc:
        stats.reset = True
        stats.error = str(exc)
        tunnel.reset(ErrorCodes.CONNECT_ERROR, f"relay failed: {exc}")
        transport = writer.transport
        if transport is not None:
            _abort_with_rst(transport)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not writer.is_closing():
            writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    if not stats.reset:
        with contextlib.suppress(ConnectionError):
            await tunnel.wait_closed()
    return stats

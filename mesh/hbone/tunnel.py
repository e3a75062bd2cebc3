"""One HBONE stream as the proxy sees it: a byte pipe with half-close, reset and backpressure.

A :class:`Tunnel` has one *sink* (where received bytes go: the fast TCP relay, or a
:class:`TunnelReader`) and at most one *source* (what to pause when the peer's window or the TLS
writer is full). Flow control is end to end: received bytes are acknowledged to the peer (reopening its
window) only once the sink has taken them without backpressure; otherwise they are credited when the
sink asks for more. So a slow consumer holds the sender to at most one stream window in flight.

``open_stream_pair()``-style code uses :meth:`Tunnel.streams` to get an asyncio
``StreamReader``/writer pair; relaying to a socket uses ``mesh.hbone.relay``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from h2.errors import ErrorCodes

from mesh.hbone.constants import TUNNEL_WRITE_HIGH_WATER
from mesh.hbone.errors import TunnelReset
from mesh.hbone.protocol import ConnectRequest, ConnectResponse

if TYPE_CHECKING:
    from mesh.hbone.connection import HboneConnection
    from mesh.hbone.headers import Authority, IPAddress
    from mesh.identity import SpiffeId


class TunnelSink(Protocol):
    def tunnel_data(self, data: bytes | memoryview) -> bool:
        """Take bytes (possibly a view, valid only during this call: write or copy it, do not keep it);
        return False to stop acknowledging until ``Tunnel.resume_receiving``."""

    def tunnel_eof(self) -> None:
        """The peer half-closed its direction."""

    def tunnel_reset(self, exc: BaseException) -> None:
        """The stream died (reset by the peer, or the connection under it went away)."""


class TunnelSource(Protocol):
    def tunnel_pause_source(self) -> None: ...

    def tunnel_resume_source(self) -> None: ...


@dataclass(frozen=True)
class ConnectInfo:
    """Everything known about an inbound tunnel when deciding on it; handed to authorize/connect/logs."""

    peer_identity: SpiffeId
    peer_address: tuple[str, int]
    local_address: tuple[str, int]
    request: ConnectRequest
    stream_id: int
    connection_id: int

    @property
    def authority(self) -> Authority:
        return self.request.authority

    @property
    def destination(self) -> tuple[str, int]:
        return (self.request.authority.host, self.request.authority.port)

    @property
    def source_ip(self) -> IPAddress | None:
        """The original client per ``forwarded: for=``; None when absent or unparseable."""
        fwd = self.request.forwarded
        return fwd.for_ip if fwd is not None else None

    @property
    def traceparent(self) -> str:
        return str(self.request.traceparent)


@dataclass
class TunnelStats:
    """Payload bytes each way and how the stream ended."""

    sent: int = 0
    received: int = 0
    reset: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Tunnel:
    """One CONNECT stream; created by :class:`~mesh.hbone.connection.HboneConnection`, never directly."""

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.info: ConnectInfo | None = None
        self.response: ConnectResponse | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        loop = conn.loop
        self._response_waiter: asyncio.Future[ConnectResponse] | None = None
        self._closed: asyncio.Future[None] = loop.create_future()
        self._sink: TunnelSink | None = None
        self._source: TunnelSource | None = None
        self._early: list[tuple[bytes, int]] = []
        self._early_eof = False
        self._unacked = 0
        self._receiving_paused = False
        self._source_paused = False
        self._eof_written = False
        self._eof_received = False
        self._error: BaseException | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.high_water = TUNNEL_WRITE_HIGH_WATER

    def __repr__(self) -> str:
        return f"<Tunnel {self.conn.label} stream {self.stream_id}>"

    # ---- state -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def eof_received(self) -> bool:
        return self._eof_received

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _maybe_finish(self) -> None:
        if self._closed.done():
            return
        if self._eof_written and self._eof_received and self.conn.session.pending(self.stream_id) == 0:
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed.done():
            return
        if exc is not None and self._error is None:
            self._error = exc
        self._closed.set_result(None)
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        if self._response_waiter is not None and not self._response_waiter.done():
            self._response_waiter.set_exception(exc or TunnelReset("stream closed before a response"))
        self.conn._forget(self)

    # ---- receiving ---------------------------------------------------------------------------------

    def attach_sink(self, sink: TunnelSink) -> None:
        """Start delivering received bytes (anything that arrived early goes first)."""
        if self._sink is not None:
            raise RuntimeError("tunnel already has a sink")
        self._sink = sink
        early, self._early = self._early, []
        for data, flow in early:
            self._deliver(data, flow)
        if self._early_eof:
            sink.tunnel_eof()
        if self._error is not None:
            sink.tunnel_reset(self._error)

    def _on_data(self, data: bytes | memoryview, flow_length: int) -> None:
        """``data`` may be a view into the connection's receive buffer: pass it on or copy it, now."""
        self.bytes_received += len(data)
        if self._sink is None:
            self._early.append((bytes(data), flow_length))
            return
        self._deliver(data, flow_length)

    def _deliver(self, data: bytes, flow_length: int) -> None:
        sink = self._sink
        assert sink is not None
        more = sink.tunnel_data(data) if data else True
        if more and not self._receiving_paused:
            self.conn._acknowledge(self.stream_id, flow_length + self._unacked)
            self._unacked = 0
        else:
            self._receiving_paused = True
            self._unacked += flow_length

    def resume_receiving(self) -> None:
        """The sink has room again: give the peer back the window it was holding."""
        self._receiving_paused = False
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.conn._acknowledge(self.stream_id, n)

    def pause_receiving(self) -> None:
        self._receiving_paused = True

    def _on_end(self) -> None:
        self._eof_received = True
        if self._sink is None:
            self._early_eof = True
        else:
            self._sink.tunnel_eof()
        self._maybe_finish()

    def _on_reset(self, exc: BaseException) -> None:
        if self._closed.done():
            return
        if self._sink is not None:
            self._sink.tunnel_reset(exc)
        self._finish(exc)

    def _on_response(self, response: ConnectResponse) -> None:
        self.response = response
        if self._response_waiter is not None and not self._response_waiter.done():
            self._response_waiter.set_result(response)

    # ---- sending -----------------------------------------------------------------------------------

    def set_source(self, source: TunnelSource | None) -> None:
        self._source = source

    def write(self, data: bytes | memoryview) -> bool:
        """Send bytes; returns False when the caller should stop producing until its source is resumed.

        Pass immutable data: it may be written out later without a copy.
        """
        if self._error is not None:
            raise self._error if isinstance(self._error, ConnectionError) else TunnelReset(str(self._error))
        if self._eof_written:
            raise TunnelReset(f"write after write_eof on {self!r}")
        n = len(data)
        if not n:
            return True
        self.bytes_sent += n
        pending = self.conn._send(self.stream_id, data)
        if pending > self.high_water or self.conn.write_paused:
            self._pause_source()
            return False
        return True

    def write_eof(self) -> None:
        """Half-close: END_STREAM after everything written so far."""
        if self._eof_written or self._error is not None or self._closed.done():
            return
        self._eof_written = True
        self.conn._send(self.stream_id, b"", end_stream=True)
        self._maybe_finish()

    def reset(self, error_code: int = ErrorCodes.CANCEL, reason: str = "") -> None:
        """Abort the stream (RST_STREAM); e.g. CONNECT_ERROR when the TCP side was reset."""
        if self._closed.done():
            return
        self.conn._reset(self.stream_id, error_code)
        self._finish(TunnelReset(reason or f"stream reset locally (code {int(error_code)})", int(error_code)))

    @property
    def pending(self) -> int:
        """Bytes written but not yet sent because of flow control."""
        return self.conn.session.pending(self.stream_id)

    def _pause_source(self) -> None:
        if not self._source_paused:
            self._source_paused = True
            if self._source is not None:
                self._source.tunnel_pause_source()

    def _on_writable(self) -> None:
        """Queue drained or the TLS writer resumed: let the source go on, wake drainers."""
        self._maybe_finish()
        if self.conn.write_paused or self.pending > self.high_water // 2:
            return
        if self._source_paused:
            self._source_paused = False
            if self._source is not None:
                self._source.tunnel_resume_source()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error if isinstance(self._error, ConnectionError) else TunnelReset(str(self._error))
        if not self._source_paused and not self.conn.write_paused and self.pending <= self.high_water:
            return
        waiter = self.conn.loop.create_future()
        self._drain_waiters.append(waiter)
        self._source_paused = True
        await waiter
        if self._error is not None:
            raise self._error if isinstance(self._error, ConnectionError) else TunnelReset(str(self._error))

    # ---- stream API --------------------------------------------------------------------------------

    def streams(self, limit: int = 1 << 20) -> tuple[asyncio.StreamReader, TunnelWriter]:
        """An asyncio ``StreamReader`` and a writer with the ``StreamWriter`` methods proxies use."""
        reader = asyncio.StreamReader(limit=limit, loop=self.conn.loop)
        adapter = _ReaderSink(self, reader)
        reader.set_transport(adapter)  # type: ignore[arg-type]
        self.attach_sink(adapter)
        return reader, TunnelWriter(self)


class _ReaderSink:
    """Feeds a StreamReader; the reader's pause/resume calls drive the tunnel's acknowledgements."""

    def __init__(self, tunnel: Tunnel, reader: asyncio.StreamReader) -> None:
        self._tunnel = tunnel
        self._reader = reader
        self._paused = False

    # the "transport" face the StreamReader sees
    def pause_reading(self) -> None:
        self._paused = True
        self._tunnel.pause_receiving()

    def resume_reading(self) -> None:
        self._paused = False
        self._tunnel.resume_receiving()

    # the sink face the tunnel sees
    def tunnel_data(self, data: bytes | memoryview) -> bool:
        self._reader.feed_data(data)  # copies into the reader's buffer
        return not self._paused

    def tunnel_eof(self) -> None:
        self._reader.feed_eof()

    def tunnel_reset(self, exc: BaseException) -> None:
        self._reader.set_exception(exc if isinstance(exc, Exception) else TunnelReset(str(exc)))


class TunnelWriter:
    """The ``asyncio.StreamWriter`` surface over a tunnel (write, drain, write_eof, close...)."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    @property
    def transport(self) -> None:
        return None

    def write(self, data: bytes) -> None:
        self.tunnel.write(bytes(data))

    def writelines(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.tunnel.write_eof()

    async def drain(self) -> None:
        await self.tunnel.drain()

    def is_closing(self) -> bool:
        return self.tunnel.closed or self.tunnel._eof_written

    def close(self) -> None:
        """Half-close our side; the stream ends when the peer has half-closed too."""
        self.tunnel.write_eof()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.tunnel.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tunnel = self.tunnel
        values: dict[str, Callable[[], Any]] = {
            "peername": lambda: tunnel.conn.peer_address,
            "sockname": lambda: tunnel.conn.local_address,
            "peer_identity": lambda: tunnel.conn.peer_identity,
            "stream_id": lambda: tunnel.stream_id,
            "connect_info": lambda: tunnel.info,
        }
        getter = values.get(name)
        return getter() if getter is not None else default

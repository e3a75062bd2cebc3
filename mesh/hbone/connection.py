"""The asyncio shell around :class:`~mesh.hbone.session.HboneSession`: one TLS connection, many tunnels.

It is an ``asyncio.BufferedProtocol`` so the TLS layer decrypts straight into the session's frame
buffer, and it adds what a sans-IO core cannot have: a clock (PING every ``ping_interval``, drop after
``ping_timeout`` without an answer; CONNECT header timeout; idle timeout) and backpressure from the TLS
writer (``pause_writing``) to every tunnel's source. Logs name the peer address and identity; every
reason a connection ends is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from mesh.hbone.constants import HboneLimits
from mesh.hbone.errors import ConnectionClosedError, HboneError, TunnelRefused, TunnelReset
from mesh.hbone.metrics import HboneMetrics
from mesh.hbone.protocol import STATUS_OK, ConnectRequest, Header
from mesh.hbone.session import (
    DataReceived,
    GoAwayReceived,
    HboneSession,
    PeerSettingsChanged,
    PingAcknowledged,
    ProtocolViolation,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    StreamDrained,
    StreamEnded,
    StreamReset,
)
from mesh.hbone.tunnel import Tunnel

if TYPE_CHECKING:
    from mesh.identity import SpiffeId

log = logging.getLogger("mesh.hbone")

_ids = itertools.count(1)


class HboneConnection(asyncio.BufferedProtocol):
    """Client or server end of one HBONE connection."""

    def __init__(self, *, client_side: bool, limits: HboneLimits, metrics: HboneMetrics,
                 allow_hostname_authority: bool = False,
                 on_request: Callable[[HboneConnection, Tunnel, ConnectRequest], None] | None = None,
                 on_rejected: Callable[[HboneConnection, RequestRejected], None] | None = None,
                 on_closed: Callable[[HboneConnection], None] | None = None,
                 verify: Callable[[Any], Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.id = next(_ids)
        self.client_side = client_side
        self.direction = "outbound" if client_side else "inbound"
        self.limits = limits
        self.metrics = metrics
        # Received DATA arrives as views into the receive buffer: every consumer (relay, reader, early
        # buffer in Tunnel) writes or copies it before returning.
        self.session = HboneSession(client_side, limits, allow_hostname_authority, borrow_data=True)
        self.transport: asyncio.Transport | None = None
        self.tunnels: dict[int, Tunnel] = {}
        self.write_paused = False
        self.peer_identity: SpiffeId | None = None
        self.peer_address: tuple[str, int] | None = None
        self.local_address: tuple[str, int] | None = None
        self.handshake_error: BaseException | None = None
        self.close_reason = ""
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.reserved = 0  # streams promised to pool callers that are still sending their CONNECT
        self._on_request = on_request
        self._on_rejected = on_rejected
        self._on_closed = on_closed
        self._verify = verify
        self._started = False
        self._dispatching = False
        self._ping_sent_at: float | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._header_handle: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None

    @property
    def label(self) -> str:
        peer = f"{self.peer_address[0]}:{self.peer_address[1]}" if self.peer_address else "?"
        who = f" {self.peer_identity}" if self.peer_identity else ""
        return f"hbone#{self.id} {self.direction} {peer}{who}"

    def __repr__(self) -> str:
        return f"<HboneConnection {self.label} streams={len(self.tunnels)}>"

    # ---- asyncio protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Client side: called by asyncio once TLS is up. Server: ``start`` is called instead."""
        assert isinstance(transport, asyncio.Transport)
        if self._verify is not None:
            try:
                self.peer_identity = self._verify(transport.get_extra_info("ssl_object"))
            except HboneError as exc:
                self.handshake_error = exc
                self.transport = transport
                transport.abort()
                return
        self.start(transport)

    def start(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer_address = (peer[0], peer[1]) if peer else None
        self.local_address = (local[0], local[1]) if local else None
        transport.set_write_buffer_limits(high=self.limits.transport_high_water)
        self._started = True
        self.session.initiate()
        self.metrics.connections_opened.labels(self.direction).inc()
        self.metrics.active_connections.labels(self.direction).inc()
        self._ping_handle = self.loop.call_later(self.limits.ping_interval, self._ping_tick)
        log.debug("%s: established", self.label)
        if self.session.h2.incoming_buffer.pending:
            self._process(0)
        else:
            self._flush()
            self._update_timers()

    def reject_handshake(self, transport: asyncio.Transport, message: str) -> None:
        """TLS is up but the peer is unacceptable: SETTINGS + GOAWAY(INADEQUATE_SECURITY), then close."""
        self.transport = transport
        self.session.initiate()
        self.session.close(ErrorCodes.INADEQUATE_SECURITY, message)
        self._flush()
        transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if not self._started:  # TLS delivered bytes before the server finished its identity checks
            self.session.h2.incoming_buffer.commit(nbytes)
            return
        self._process(nbytes)

    def _process(self, nbytes: int) -> None:
        self._dispatching = True
        try:
            for event in self.session.receive_committed(nbytes):
                self._dispatch(event)
        finally:
            self._dispatching = False
        self._flush()
        self._update_timers()

    def eof_received(self) -> bool:
        self._end_tunnels(ConnectionClosedError(f"{self.label}: peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in (self._ping_handle, self._header_handle, self._idle_handle):
            if handle is not None:
                handle.cancel()
        self.session.closed = True
        if self._started:
            reason = self.close_reason or ("error" if exc else "closed")
            self.metrics.connections_closed.labels(self.direction, reason).inc()
            self.metrics.active_connections.labels(self.direction).dec()
        self._end_tunnels(ConnectionClosedError(f"{self.label}: connection lost" + (f" ({exc})" if exc else "")))
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for tunnel in list(self.tunnels.values()):
            tunnel._on_writable()

    # ---- events ------------------------------------------------------------------------------------

    def _dispatch(self, e: Any) -> None:
        cls = e.__class__
        if cls is DataReceived:
            tunnel = self.tunnels.get(e.stream_id)
            if tunnel is not None:
                tunnel._on_data(e.data, e.flow_length)
            else:  # a stream we already gave up on: still credit the connection window
                self.session.acknowledge(e.stream_id, e.flow_length)
        elif cls is StreamDrained:
            tunnel = self.tunnels.get(e.stream_id)
            if tunnel is not None:
                tunnel._on_writable()
        elif cls is StreamEnded:
            tunnel = self.tunnels.get(e.stream_id)
            if tunnel is not None:
                tunnel._on_end()
        elif cls is RequestReceived:
            self._on_new_request(e)
        elif cls is ResponseReceived:
            tunnel = self.tunnels.get(e.stream_id)
            if tunnel is not None:
                tunnel._on_response(e.response)
        elif cls is StreamReset:
            tunnel = self.tunnels.get(e.stream_id)
            if e.reason == "refused":
                self.metrics.stream_rejections.labels(self.direction, "refused_stream").inc()
                log.warning("%s: refused stream %d (over the stream limit or draining)", self.label, e.stream_id)
            if tunnel is not None:
                who = "peer" if e.remote else "local"
                tunnel._on_reset(TunnelReset(f"stream {e.stream_id} reset by {who} (code {e.error_code})"
                                             + (f": {e.reason}" if e.reason else ""), e.error_code))
        elif cls is RequestRejected:
            self.metrics.stream_rejections.labels(self.direction, e.rejection.reason).inc()
            self.metrics.streams.labels(self.direction, str(e.rejection.status)).inc()
            log.warning("%s: stream %d refused with %d: %s", self.label, e.stream_id, e.rejection.status,
                        e.rejection.message)
            if self._on_rejected is not None:
                self._on_rejected(self, e)
        elif cls is PingAcknowledged:
            self._ping_sent_at = None
        elif cls is GoAwayReceived:
            self._on_goaway(e)
        elif cls is ProtocolViolation:
            self._fail(e.reason, None, e.message)
        elif cls is PeerSettingsChanged:
            pass  # the pool reads session.peer_max_streams when it picks a connection

    def _on_new_request(self, e: RequestReceived) -> None:
        tunnel = Tunnel(self, e.stream_id)
        self.tunnels[e.stream_id] = tunnel
        self.metrics.active_streams.labels(self.direction).inc()
        self._cancel_idle()
        if self._on_request is None:
            self.respond(tunnel, 503)
            return
        self._on_request(self, tunnel, e.request)

    def _on_goaway(self, e: GoAwayReceived) -> None:
        log.info("%s: peer sent GOAWAY (code %d, last stream %d)", self.label, e.error_code, e.last_stream_id)
        self.close_reason = self.close_reason or "peer_goaway"
        for sid, tunnel in list(self.tunnels.items()):
            # last_stream_id speaks of streams *we* opened (odd ids are the client's); the peer's own
            # streams are not cut by its GOAWAY.
            ours = (sid % 2 == 1) == self.client_side
            if not e.graceful or (ours and sid > e.last_stream_id):
                tunnel._on_reset(ConnectionClosedError(f"{self.label}: stream {sid} not served (GOAWAY)"))
        if not e.graceful and self.transport is not None:
            self.transport.close()
        elif not self.tunnels and self.transport is not None:
            self.close()

    # ---- tunnel-facing -----------------------------------------------------------------------------

    def _send(self, stream_id: int, data: Any, end_stream: bool = False) -> int:
        try:
            pending = self.session.send_data(stream_id, data, end_stream)
        except (ConnectionResetError, ConnectionClosedError) as exc:
            raise TunnelReset(str(exc)) from exc
        if not self._dispatching:
            self._flush()
        return pending

    def _acknowledge(self, stream_id: int, nbytes: int) -> None:
        self.session.acknowledge(stream_id, nbytes)
        if not self._dispatching:
            self._flush()

    def _reset(self, stream_id: int, error_code: int) -> None:
        self.session.reset(stream_id, error_code)
        if not self._dispatching:
            self._flush()

    def _forget(self, tunnel: Tunnel) -> None:
        if self.tunnels.pop(tunnel.stream_id, None) is None:
            return
        self.metrics.active_streams.labels(self.direction).dec()
        if not self.tunnels:
            if self._drained is not None:
                self._drained.set()
            if self.session.draining and self.transport is not None and not self.transport.is_closing():
                self.loop.call_soon(self.close)
            else:
                self._update_timers()

    def _end_tunnels(self, exc: BaseException) -> None:
        for tunnel in list(self.tunnels.values()):
            tunnel._on_reset(exc)

    def _flush(self) -> None:
        out = self.session.take_output()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    # ---- client ------------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Can take another stream: open, not draining."""
        return (self._started and not self.session.closed and not self.session.draining
                and self.transport is not None and not self.transport.is_closing())

    def stream_capacity(self, cap: int) -> int:
        return min(cap, self.session.peer_max_streams) - len(self.tunnels) - self.reserved

    async def open_tunnel(self, headers: list[Header], timeout: float | None = None,
                          reserved: bool = False) -> Tunnel:
        """Send a CONNECT and wait for the answer; returns the tunnel on 200, raises TunnelRefused otherwise.

        ``reserved``: the caller holds one of ``self.reserved`` (the pool's); it is released here, as
        soon as the stream exists and counts by itself.
        """
        try:
            if not self.available:
                raise ConnectionClosedError(f"{self.label}: connection is not available for new streams")
            sid = self.session.send_request(headers)
        finally:
            if reserved:
                self.reserved -= 1
        tunnel = Tunnel(self, sid)
        waiter: asyncio.Future[Any] = self.loop.create_future()
        tunnel._response_waiter = waiter
        self.tunnels[sid] = tunnel
        self.metrics.active_streams.labels(self.direction).inc()
        self._cancel_idle()
        self._flush()
        try:
            response = await asyncio.wait_for(asyncio.shield(waiter), timeout or self.limits.connect_timeout)
        except TimeoutError:
            waiter.cancel()
            tunnel.reset(ErrorCodes.CANCEL, "no CONNECT response in time")
            self.metrics.streams.labels(self.direction, "timeout").inc()
            raise HboneError(f"{self.label}: no response to CONNECT within "
                             f"{timeout or self.limits.connect_timeout}s", reason="timeout") from None
        except asyncio.CancelledError:
            waiter.cancel()
            tunnel.reset(ErrorCodes.CANCEL, "cancelled")
            raise
        except ConnectionError:
            self.metrics.streams.labels(self.direction, "reset").inc()
            raise
        self.metrics.streams.labels(self.direction, str(response.status)).inc()
        if response.status != STATUS_OK:
            tunnel.reset(ErrorCodes.CANCEL, f"CONNECT refused with {response.status}")
            raise TunnelRefused(response.status, f"{self.label}: CONNECT refused with status {response.status}")
        return tunnel

    # ---- server ------------------------------------------------------------------------------------

    def respond(self, tunnel: Tunnel, status: int, headers: list[Header] | None = None) -> None:
        """Answer a CONNECT: 200 starts the tunnel, anything else ends the stream."""
        if tunnel.closed:
            return
        try:
            self.session.respond(tunnel.stream_id, status, headers)
        except (ConnectionClosedError, ConnectionResetError) as exc:
            tunnel._on_reset(TunnelReset(str(exc)))
            return
        self.metrics.streams.labels(self.direction, str(status)).inc()
        if status != STATUS_OK:
            tunnel._finish(TunnelRefused(status))
        self._flush()

    # ---- timers and shutdown -----------------------------------------------------------------------

    def _ping_tick(self) -> None:
        self._ping_handle = None
        if self.session.closed or self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self.limits.ping_timeout:
            self._fail("ping_timeout", None, f"no PING answer within {self.limits.ping_timeout}s", abort=True)
            return
        if self._ping_sent_at is None:
            self.session.ping()
            self._ping_sent_at = now
            self._flush()
        delay = self.limits.ping_interval
        if self._ping_sent_at is not None:
            delay = min(delay, max(0.0, self._ping_sent_at + self.limits.ping_timeout - now))
        self._ping_handle = self.loop.call_later(delay, self._ping_tick)

    def _update_timers(self) -> None:
        if self.session.closed:
            return
        if not self.client_side:
            waiting = self.session.in_header_block or self.session.requests_seen == 0
            if waiting and self._header_handle is None:
                self._header_handle = self.loop.call_later(self.limits.connect_header_timeout, self._header_timeout)
            elif not waiting and self._header_handle is not None:
                self._header_handle.cancel()
                self._header_handle = None
        if not self.tunnels and self.reserved == 0 and self._idle_handle is None:
            self._idle_handle = self.loop.call_later(self.limits.idle_timeout, self._idle_timeout)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _header_timeout(self) -> None:
        self._header_handle = None
        if self.session.in_header_block or self.session.requests_seen == 0:
            self._fail("header_timeout", ErrorCodes.NO_ERROR,
                       f"no complete CONNECT header block within {self.limits.connect_header_timeout}s")

    def _idle_timeout(self) -> None:
        self._idle_handle = None
        if not self.tunnels and self.reserved == 0 and not self.session.closed:
            log.debug("%s: idle for %ss, closing", self.label, self.limits.idle_timeout)
            self.close_reason = "idle"
            self.close()

    def _fail(self, reason: str, error_code: int | None, message: str, abort: bool = False) -> None:
        """End the connection because of the peer: log, count, GOAWAY, close."""
        log.warning("%s: closing connection: %s (%s)", self.label, message, reason)
        self.metrics.protocol_errors.labels(self.direction, reason).inc()
        self.close_reason = reason
        if error_code is not None:
            self.session.close(error_code, reason)
        self.session.closed = True
        self._flush()
        self._end_tunnels(ConnectionClosedError(f"{self.label}: {message}"))
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def close(self) -> None:
        """GOAWAY(NO_ERROR) and close; open tunnels are reset."""
        if self.transport is None:
            return
        if not self.session.closed:
            if self.session.h2.goaway_sent_last_id is None:  # a graceful GOAWAY already said it all
                self.session.close(ErrorCodes.NO_ERROR)
                self._flush()
            self.session.closed = True
        self._end_tunnels(ConnectionClosedError(f"{self.label}: connection closed locally"))
        if not self.transport.is_closing():
            self.transport.close()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Graceful: GOAWAY, let in-flight streams finish (up to ``drain_timeout``), then close."""
        if self.transport is None or self.session.closed:
            self.abort()
            return
        self.close_reason = self.close_reason or "shutdown"
        self.session.goaway_graceful()
        self._flush()
        if self.tunnels:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout or self.limits.drain_timeout)
            except TimeoutError:
                log.warning("%s: %d streams still open after the drain timeout; resetting them",
                            self.label, len(self.tunnels))
        self.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 5.0)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif not self.closed.done():
            self.closed.set_result(None)

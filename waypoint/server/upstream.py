"""HTTP/1.1 and HTTP/2 clients over HBONE tunnels to the chosen endpoint, with connection reuse.

Each upstream connection is one CONNECT tunnel through the destination node's agent to `<pod ip>:<target
port>` (the waypoint's second HBONE hop), and the tunnel itself is multiplexed with others on the pooled
mTLS connection to `<pod ip>:15008`. On top of a tunnel:

* HTTP/1.1 (h11): one request at a time; idle connections are kept per endpoint and reused
  (`maxRequestsPerConnection` caps how often);
* HTTP/2 (h2, prior knowledge): many streams per connection, flow control end to end.

The cluster's circuit breaker counts connections; when the ceiling is reached a request waits as a
*pending* request, and one over `http1MaxPendingRequests` is refused at once (503 UO), as Envoy's
connection pool does. Every failure before response headers is an `UpstreamError` carrying Envoy's reset
reason, so the retry state machine and the access log see what Envoy's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.events as h2ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes

from mesh.hbone import (
    ConnectionClosedError,
    HandshakeError,
    HboneError,
    HbonePool,
    Tunnel,
    TunnelRefused,
    TunnelRequest,
)
from mesh.hbone.headers import Authority
from mesh.identity import WorkloadCert
from waypoint.resilience.circuit import CircuitBreaker, Permit, Resource
from waypoint.resilience.retry import ResetReason
from waypoint.server.body import HIGH_WATER, Body, BodyReader, Trailers
from waypoint.server.h11compat import h11
from waypoint.server.messages import HOP_BY_HOP, RequestHead, ResponseHead

log = logging.getLogger("waypoint.upstream")

MAX_RESPONSE_HEADERS = 60 * 1024


class UpstreamError(Exception):
    """The attempt failed before response headers (Envoy's stream reset, with its reason)."""

    def __init__(self, reason: ResetReason, request_sent: bool, detail: str = "") -> None:
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")
        self.reason = reason
        self.request_sent = request_sent
        self.detail = detail  # %UPSTREAM_TRANSPORT_FAILURE_REASON%


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One endpoint: the pod's IP and target port, the identity its agent must prove, the protocol."""

    ip: str
    port: int
    identity: str
    http2: bool = False

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class Exchange:
    """One request/response on an upstream connection."""

    __slots__ = ("_conn", "_raw_eof", "_raw_pending", "body", "head", "on_raw", "on_raw_eof", "request_sent",
                 "stream_id")

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop, stream_id: int = 0) -> None:
        self._conn = conn
        self.head: asyncio.Future[ResponseHead] = loop.create_future()
        self.body = Body(replay_limit=0, on_consumed=self._consumed)
        self.request_sent = False
        self.stream_id = stream_id
        self.on_raw: Callable[[bytes], None] | None = None
        self.on_raw_eof: Callable[[], None] | None = None
        self._raw_pending: list[bytes] = []
        self._raw_eof = False

    def deliver_raw(self, data: bytes) -> None:
        if self.on_raw is None:
            self._raw_pending.append(data)
        else:
            self.on_raw(data)

    def deliver_raw_eof(self) -> None:
        if self.on_raw_eof is None:
            self._raw_eof = True
        else:
            self.on_raw_eof()

    def set_raw_handlers(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        """Start receiving the upgraded connection's bytes (anything that arrived early comes first)."""
        self.on_raw, self.on_raw_eof = on_data, on_eof
        pending, self._raw_pending = self._raw_pending, []
        for chunk in pending:
            on_data(chunk)
        if self._raw_eof:
            on_eof()

    def _consumed(self, n: int) -> None:
        self._conn.consumed(self, n)

    def fail(self, exc: BaseException) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # mark retrieved: nobody may be waiting any more
        else:
            self.body.fail(exc)

    def abort(self) -> None:
        """Give up on this exchange (timeout, retry, client gone): reset it upstream."""
        self._conn.abort_exchange(self)

    # ---- upgraded (WebSocket) connections: raw bytes both ways ----

    def write_raw(self, data: bytes) -> bool:
        return self._conn.write_raw(data)

    def write_raw_eof(self) -> None:
        self._conn.write_raw_eof()

    def pause_raw(self) -> None:
        self._conn.tunnel.pause_receiving()

    def resume_raw(self) -> None:
        self._conn.tunnel.resume_receiving()


def _connect_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, TunnelRefused):
        return UpstreamError(ResetReason.REMOTE_CONNECTION_FAILURE, False, f"HBONE CONNECT refused ({exc.status})")
    if isinstance(exc, TimeoutError) or (isinstance(exc, HboneError) and "timeout" in exc.reason):
        return UpstreamError(ResetReason.CONNECTION_TIMEOUT, False, "connect timeout")
    if isinstance(exc, HandshakeError):
        return UpstreamError(ResetReason.LOCAL_CONNECTION_FAILURE, False, f"TLS error: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamError(ResetReason.REMOTE_CONNECTION_FAILURE, False, "delayed connect error: 111")
    return UpstreamError(ResetReason.REMOTE_CONNECTION_FAILURE, False, str(exc) or type(exc).__name__)


# --- HTTP/1.1 ------------------------------------------------------------------------------------------


class _H1Upstream:
    """HTTP/1.1 over one tunnel; a tunnel sink and source."""

    http2 = False

    def __init__(self, pool: UpstreamPool, cluster: ClusterConnections, target: UpstreamTarget, tunnel: Tunnel,
                 permit: Permit | None) -> None:
        self.pool = pool
        self.cluster = cluster
        self.target = target
        self.tunnel = tunnel
        self.permit = permit
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEADERS)
        self.exchange: Exchange | None = None
        self.requests = 0
        self.dead = False
        self.raw = False
        self.keep_alive = True
        self._paused_receiving = False
        self._source_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        tunnel.attach_sink(self)
        tunnel.set_source(self)

    @property
    def busy(self) -> bool:
        return self.exchange is not None

    # ---- requests ----------------------------------------------------------------------------------

    def start(self, head: RequestHead, reader: BodyReader) -> Exchange:
        loop = self.pool.loop
        ex = Exchange(self, loop)
        self.exchange = ex
        self.requests += 1
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        body = reader.body
        headers = [("host", head.authority)]
        has_length = False
        for n, v in head.headers:
            if n == "content-length":
                has_length = True
            headers.append((n, v))
        if head.upgrade is None:
            empty = body.complete and body.received == 0
            if not has_length and not empty:
                buffered = body.buffered()
                if buffered is not None:
                    headers.append(("content-length", str(len(buffered))))
                else:
                    headers.append(("transfer-encoding", "chunked"))
        limit = self.cluster.breaker.thresholds.max_requests_per_connection
        if limit and self.requests >= limit:
            headers.append(("connection", "close"))
        try:
            out = [self.h11.send(h11.Request(method=head.method, target=head.path, headers=headers))]
        except h11.LocalProtocolError as exc:
            self.dead = True
            ex.fail(UpstreamError(ResetReason.LOCAL_RESET, False, f"cannot encode request: {exc}"))
            return ex
        complete = self._encode_body_now(reader, out)
        # Head and whatever body is there already leave in one tunnel write (one DATA frame).
        if not self._write(b"".join(out)):  # type: ignore[arg-type]
            ex.fail(UpstreamError(ResetReason.CONNECTION_TERMINATION, False, "tunnel closed"))
            return ex
        ex.request_sent = True
        if complete:
            self._maybe_done()
        else:
            self.pool.spawn(self._pump(reader, ex))
        return ex

    def _encode_body_now(self, reader: BodyReader, out: list[bytes | None]) -> bool:
        """Encode what is there already; True when the whole body (and its end) is encoded."""
        while True:
            chunk = reader.read_nowait()
            if chunk is None:
                trailers = reader.body.trailers
                try:
                    out.append(self.h11.send(h11.EndOfMessage(headers=trailers or [])))
                except h11.LocalProtocolError:
                    out.append(self.h11.send(h11.EndOfMessage()))
                return True
            if chunk == b"":
                return False
            out.append(self.h11.send(h11.Data(data=chunk)))

    async def _pump(self, reader: BodyReader, ex: Exchange) -> None:
        try:
            while True:
                chunk = await reader.read()
                if self.exchange is not ex or self.dead:
                    return
                if chunk is None:
                    self._end_request(reader.body.trailers)
                    return
                self._write(self.h11.send(h11.Data(data=chunk)))
                await self._drain()
        except Exception as exc:  # the client went away mid-body, or the body cannot be replayed
            if self.exchange is ex:
                log.debug("upstream request body aborted: %r", exc)
                ex.fail(UpstreamError(ResetReason.LOCAL_RESET, True, "request body aborted"))
                self._kill()

    def _end_request(self, trailers: Trailers | None) -> None:
        try:
            data = self.h11.send(h11.EndOfMessage(headers=trailers or []))
        except h11.LocalProtocolError:
            data = self.h11.send(h11.EndOfMessage())
        self._write(data)
        self._maybe_done()

    def _write(self, data: bytes | None) -> bool:
        if not data or self.dead:
            return not self.dead
        try:
            if not self.tunnel.write(data):
                self._source_paused = True
        except (ConnectionError, HboneError):
            self.dead = True
            return False
        return True

    async def _drain(self) -> None:
        if self._source_paused and not self.dead:
            self._drain_waiter = self.pool.loop.create_future()
            await self._drain_waiter

    # ---- tunnel sink / source ----------------------------------------------------------------------

    def tunnel_data(self, data: bytes) -> bool:
        if self.raw:
            ex = self.exchange
            if ex is not None:
                ex.deliver_raw(data)
            return True
        try:
            self.h11.receive_data(data if type(data) is bytes else bytes(data))
        except RuntimeError:
            return True
        self._process()
        ex = self.exchange
        if ex is not None and ex.body.unread > HIGH_WATER:
            self._paused_receiving = True
            return False
        return True

    def tunnel_eof(self) -> None:
        if self.raw:
            ex = self.exchange
            if ex is not None:
                ex.deliver_raw_eof()
            return
        with contextlib.suppress(RuntimeError):
            self.h11.receive_data(b"")
        self._process()
        self._kill(ResetReason.CONNECTION_TERMINATION)

    def tunnel_reset(self, exc: BaseException) -> None:
        if self.raw:
            ex = self.exchange
            if ex is not None:
                ex.deliver_raw_eof()
        self._kill(ResetReason.CONNECTION_TERMINATION, str(exc))

    def tunnel_pause_source(self) -> None:
        self._source_paused = True

    def tunnel_resume_source(self) -> None:
        self._source_paused = False
        w, self._drain_waiter = self._drain_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def consumed(self, ex: Exchange, n: int) -> None:
        if self._paused_receiving and ex.body.unread <= HIGH_WATER // 2:
            self._paused_receiving = False
            self.tunnel.resume_receiving()

    # ---- response ----------------------------------------------------------------------------------

    def _process(self) -> None:
        while not self.dead or self.exchange is not None:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                ex = self.exchange
                if ex is not None:
                    ex.fail(UpstreamError(ResetReason.PROTOCOL_ERROR, True, str(exc)))
                self._kill()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            ex = self.exchange
            cls = type(event)
            if cls is h11.Data:
                if ex is not None:
                    ex.body.feed(event.data)  # type: ignore[union-attr]
            elif cls is h11.Response:
                if ex is not None and not ex.head.done():
                    ex.head.set_result(ResponseHead(event.status_code,  # type: ignore[union-attr]
                                                    [(n.decode("latin-1"), v.decode("latin-1"))
                                                     for n, v in event.headers]))  # type: ignore[union-attr]
            elif cls is h11.EndOfMessage:
                if ex is not None:
                    trailers = [(n.decode("latin-1"), v.decode("latin-1"))
                                for n, v in event.headers] or None  # type: ignore[union-attr]
                    ex.body.finish(trailers)
                self._maybe_done()
            elif cls is h11.InformationalResponse:
                if event.status_code == 101 and ex is not None:  # type: ignore[union-attr]
                    self.raw = True
                    self.keep_alive = False
                    ex.head.set_result(ResponseHead(101, [(n.decode("latin-1"), v.decode("latin-1"))
                                                          for n, v in event.headers]))  # type: ignore[union-attr]
                    trailing = bytes(self.h11.trailing_data[0])
                    if trailing:
                        self.pool.loop.call_soon(self.tunnel_data, trailing)
                    return
            elif cls is h11.ConnectionClosed:
                self._kill(ResetReason.CONNECTION_TERMINATION)
                return

    def _maybe_done(self) -> None:
        h = self.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            self.exchange = None
            limit = self.cluster.breaker.thresholds.max_requests_per_connection
            if limit and self.requests >= limit:
                self.keep_alive = False
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                self.keep_alive = False
            if self.keep_alive and not self.dead:
                self.pool._release(self)
            else:
                self._kill()
        elif h.their_state in (h11.MUST_CLOSE, h11.CLOSED) and h.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self.exchange = None
            self._kill()

    # ---- lifecycle ---------------------------------------------------------------------------------

    def abort_exchange(self, ex: Exchange) -> None:
        if self.exchange is ex:
            self._kill(ResetReason.LOCAL_RESET)

    def _kill(self, reason: ResetReason = ResetReason.CONNECTION_TERMINATION, detail: str = "") -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.fail(UpstreamError(reason, ex.request_sent, detail))
        if self.dead and self.tunnel.closed:
            self.pool._forget(self)
            return
        self.dead = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if not self.tunnel.closed:
            if reason is ResetReason.CONNECTION_TERMINATION and not detail:
                with contextlib.suppress(Exception):
                    self.tunnel.write_eof()
            else:
                self.tunnel.reset(ErrorCodes.CANCEL, "upstream connection closed by the waypoint")
        self.pool._forget(self)

    def close(self) -> None:
        self._kill(ResetReason.LOCAL_RESET, "closed")

    def idle_expired(self) -> None:
        self._idle_handle = None
        if self.exchange is None:
            self._kill()

    def write_raw(self, data: bytes) -> bool:
        try:
            return self.tunnel.write(data)
        except (ConnectionError, HboneError):
            return False

    def write_raw_eof(self) -> None:
        with contextlib.suppress(ConnectionError, HboneError):
            self.tunnel.write_eof()


# --- HTTP/2 --------------------------------------------------------------------------------------------


class _H2Upstream:
    """HTTP/2 (prior knowledge) over one tunnel: many exchanges at once."""

    http2 = True

    def __init__(self, pool: UpstreamPool, cluster: ClusterConnections, target: UpstreamTarget, tunnel: Tunnel,
                 permit: Permit | None) -> None:
        self.pool = pool
        self.cluster = cluster
        self.target = target
        self.tunnel = tunnel
        self.permit = permit
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.exchanges: dict[int, Exchange] = {}
        self.dead = False
        self.draining = False
        self.requests = 0
        self._window_waiters: list[asyncio.Future[None]] = []
        self._idle_handle: asyncio.TimerHandle | None = None
        # The preface goes out before anything the server sent early is read (and acknowledged).
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1024 * 1024,
                                 SettingCodes.ENABLE_PUSH: 0,
                                 SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEADERS})
        self.h2.increment_flow_control_window(16 * 1024 * 1024)
        self._flush()
        tunnel.attach_sink(self)
        tunnel.set_source(self)

    @property
    def busy(self) -> bool:
        return bool(self.exchanges)

    @property
    def capacity(self) -> int:
        if self.dead or self.draining:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams
        mcs = self.cluster.breaker.thresholds.max_concurrent_streams
        if mcs:
            limit = min(limit, mcs)
        return limit - len(self.exchanges)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.dead:
            try:
                self.tunnel.write(data)
            except (ConnectionError, HboneError):
                self._kill(ResetReason.CONNECTION_TERMINATION)

    def start(self, head: RequestHead, reader: BodyReader) -> Exchange:
        loop = self.pool.loop
        sid = self.h2.get_next_available_stream_id()
        ex = Exchange(self, loop, sid)
        self.exchanges[sid] = ex
        self.requests += 1
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        headers = [(":method", head.method), (":scheme", head.scheme or "http"), (":authority", head.authority),
                   (":path", head.path)]
        headers += [(n, v) for n, v in head.headers if n not in HOP_BY_HOP or (n == "te" and v == "trailers")]
        body = reader.body
        end = body.complete and body.received == 0 and not body.trailers
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except ProtocolError as exc:
            del self.exchanges[sid]
            ex.fail(UpstreamError(ResetReason.LOCAL_RESET, False, f"cannot encode request: {exc}"))
            return ex
        ex.request_sent = True
        self._flush()
        if not end:
            self.pool.spawn(self._pump(reader, ex))
        return ex

    async def _pump(self, reader: BodyReader, ex: Exchange) -> None:
        sid = ex.stream_id
        try:
            while True:
                chunk = await reader.read()
                if self.exchanges.get(sid) is not ex:
                    return
                if chunk is None:
                    trailers = reader.body.trailers
                    if trailers:
                        self.h2.send_headers(sid, trailers, end_stream=True)
                    else:
                        self.h2.end_stream(sid)
                    self._flush()
                    return
                view = memoryview(chunk)
                while view:
                    window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                    if window <= 0:
                        w = self.pool.loop.create_future()
                        self._window_waiters.append(w)
                        await w
                        if self.exchanges.get(sid) is not ex:
                            return
                        continue
                    self.h2.send_data(sid, bytes(view[:window]))
                    view = view[window:]
                    self._flush()
        except (StreamClosedError, ProtocolError, FlowControlError):
            return
        except Exception as exc:
            if self.exchanges.get(sid) is ex:
                log.debug("upstream h2 request body aborted: %r", exc)
                ex.fail(UpstreamError(ResetReason.LOCAL_RESET, True, "request body aborted"))
                self.abort_exchange(ex)

    def consumed(self, ex: Exchange, n: int) -> None:
        if self.dead:
            return
        try:
            self.h2.acknowledge_received_data(n, ex.stream_id)
        except (StreamClosedError, ProtocolError):
            with contextlib.suppress(FlowControlError, ProtocolError):
                self.h2.increment_flow_control_window(n)
        self._flush()

    # ---- tunnel ------------------------------------------------------------------------------------

    def tunnel_data(self, data: bytes) -> bool:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self._kill(ResetReason.PROTOCOL_ERROR, str(exc))
            return True
        for e in events:
            self._dispatch(e)
        self._flush()
        return True

    def _dispatch(self, e: h2ev.Event) -> None:
        cls = type(e)
        if cls is h2ev.DataReceived:
            ex = self.exchanges.get(e.stream_id)  # type: ignore[attr-defined]
            flow = e.flow_controlled_length  # type: ignore[attr-defined]
            if ex is None:
                with contextlib.suppress(StreamClosedError, ProtocolError):
                    self.h2.acknowledge_received_data(flow, e.stream_id)  # type: ignore[attr-defined]
                return
            data = e.data  # type: ignore[attr-defined]
            if flow > len(data):
                with contextlib.suppress(StreamClosedError, ProtocolError):
                    self.h2.acknowledge_received_data(flow - len(data), e.stream_id)  # type: ignore[attr-defined]
            if data:
                ex.body.feed(data)
        elif cls is h2ev.ResponseReceived:
            ex = self.exchanges.get(e.stream_id)  # type: ignore[attr-defined]
            if ex is not None and not ex.head.done():
                status = 0
                headers = []
                for n, v in e.headers:  # type: ignore[attr-defined]
                    name, value = n.decode("latin-1"), v.decode("latin-1")
                    if name == ":status":
                        status = int(value)
                    elif name[:1] != ":":
                        headers.append((name, value))
                ex.head.set_result(ResponseHead(status, headers))
        elif cls is h2ev.StreamEnded:
            ex = self.exchanges.pop(e.stream_id, None)  # type: ignore[attr-defined]
            if ex is not None:
                ex.body.finish(ex.body.trailers)
                self._after_stream()
        elif cls is h2ev.TrailersReceived:
            ex = self.exchanges.get(e.stream_id)  # type: ignore[attr-defined]
            if ex is not None:
                trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in e.headers]  # type: ignore
                if not ex.head.done():  # trailers-only response: the first HEADERS ended the stream
                    ex.head.set_result(ResponseHead(200, trailers))
                ex.body.trailers = trailers
        elif cls is h2ev.StreamReset:
            ex = self.exchanges.pop(e.stream_id, None)  # type: ignore[attr-defined]
            if ex is not None:
                code = e.error_code  # type: ignore[attr-defined]
                reason = (ResetReason.REMOTE_REFUSED_STREAM if code == ErrorCodes.REFUSED_STREAM
                          else ResetReason.REMOTE_RESET)
                ex.fail(UpstreamError(reason, True, f"stream reset with {ErrorCodes(code).name}"
                                      if code in iter(ErrorCodes) else f"stream reset with code {code}"))
                self._after_stream()
        elif cls is h2ev.WindowUpdated or cls is h2ev.RemoteSettingsChanged:
            waiters, self._window_waiters = self._window_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
        elif cls is h2ev.ConnectionTerminated:
            self.draining = True
            last = e.last_stream_id or 0  # type: ignore[attr-defined]
            for sid, ex in list(self.exchanges.items()):
                if sid > last:
                    del self.exchanges[sid]
                    ex.fail(UpstreamError(ResetReason.REMOTE_REFUSED_STREAM, False, "GOAWAY"))
            self.pool._forget(self)
            if not self.exchanges:
                self._kill()

    def _after_stream(self) -> None:
        if self.draining and not self.exchanges:
            self._kill()
        elif not self.exchanges:
            self.pool._idle_h2(self)
        self.pool._wake(self.cluster)

    def tunnel_eof(self) -> None:
        self._kill(ResetReason.CONNECTION_TERMINATION)

    def tunnel_reset(self, exc: BaseException) -> None:
        self._kill(ResetReason.CONNECTION_TERMINATION, str(exc))

    def tunnel_pause_source(self) -> None:
        pass

    def tunnel_resume_source(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def abort_exchange(self, ex: Exchange) -> None:
        if self.exchanges.pop(ex.stream_id, None) is not None:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.h2.reset_stream(ex.stream_id, ErrorCodes.CANCEL)
            self._flush()
            ex.fail(UpstreamError(ResetReason.LOCAL_RESET, ex.request_sent))
            self._after_stream()

    def _kill(self, reason: ResetReason = ResetReason.CONNECTION_TERMINATION, detail: str = "") -> None:
        exchanges, self.exchanges = self.exchanges, {}
        for ex in exchanges.values():
            ex.fail(UpstreamError(reason, ex.request_sent, detail))
        for w in self._window_waiters:
            if not w.done():
                w.set_result(None)
        if not self.dead:
            self.dead = True
            if self._idle_handle is not None:
                self._idle_handle.cancel()
            if not self.tunnel.closed:
                with contextlib.suppress(Exception):
                    self.h2.close_connection()
                    self.tunnel.write(self.h2.data_to_send())
                with contextlib.suppress(Exception):
                    self.tunnel.write_eof()
        self.pool._forget(self)

    def close(self) -> None:
        self._kill(ResetReason.LOCAL_RESET, "closed")

    def idle_expired(self) -> None:
        self._idle_handle = None
        if not self.exchanges:
            self._kill()

    def write_raw(self, data: bytes) -> bool:
        return False

    def write_raw_eof(self) -> None:
        pass


UpstreamConnection = _H1Upstream | _H2Upstream


# --- the pool ------------------------------------------------------------------------------------------


class ClusterConnections:
    """The connection accounting of one upstream cluster (its circuit breaker's CONNECTIONS and
    PENDING_REQUESTS), shared by its endpoints."""

    def __init__(self, name: str, breaker: CircuitBreaker, idle_timeout: float = 3600.0) -> None:
        self.name = name
        self.breaker = breaker
        self.idle_timeout = idle_timeout
        self.waiters: list[asyncio.Future[None]] = []


class UpstreamPool:
    """Upstream HTTP connections by endpoint, over tunnels from an `HbonePool`."""

    def __init__(self, hbone: HbonePool, cert: Callable[[], WorkloadCert], *, hbone_port: int = 15008,
                 connect_timeout: float = 10.0) -> None:
        self.hbone = hbone
        self.cert = cert
        self.hbone_port = hbone_port
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: dict[UpstreamTarget, list[_H1Upstream]] = {}
        self._h2: dict[UpstreamTarget, list[_H2Upstream]] = {}
        self._all: set[UpstreamConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def connections(self) -> int:
        return len(self._all)

    async def send(self, cluster: ClusterConnections, target: UpstreamTarget, head: RequestHead,
                   reader: BodyReader, *, source: tuple[str, int] | None = None,
                   dedicated: bool = False) -> Exchange:
        """Start the request on a connection to `target`; raises UpstreamError when none can be had.

        `dedicated`: a fresh connection never returned to the pool (WebSocket upgrades).
        """
        conn = await self._acquire(cluster, target, source, dedicated)
        return conn.start(head, reader)

    async def _acquire(self, cluster: ClusterConnections, target: UpstreamTarget, source: tuple[str, int] | None,
                       dedicated: bool) -> UpstreamConnection:
        pending: Permit | None = None
        try:
            while True:
                if self._closed:
                    raise UpstreamError(ResetReason.LOCAL_RESET, False, "waypoint shutting down")
                if not dedicated:
                    conn = self._reusable(target)
                    if conn is not None:
                        return conn
                permit = cluster.breaker.try_acquire(Resource.CONNECTIONS)
                if permit is None and self._evict_idle(cluster, target):
                    permit = cluster.breaker.try_acquire(Resource.CONNECTIONS)
                if permit is not None:
                    return await self._dial(cluster, target, source, permit)
                if pending is None:
                    admitted = cluster.breaker.admit_pending()
                    if not isinstance(admitted, Permit):
                        raise UpstreamError(ResetReason.OVERFLOW, False)
                    pending = admitted
                waiter = self.loop.create_future()
                cluster.waiters.append(waiter)
                await waiter
        finally:
            if pending is not None:
                pending.release()

    def _reusable(self, target: UpstreamTarget) -> UpstreamConnection | None:
        if target.http2:
            for conn in self._h2.get(target, ()):
                if conn.capacity > 0:
                    return conn
            return None
        idle = self._idle.get(target)
        while idle:
            conn = idle.pop()
            if not conn.dead and not conn.tunnel.closed:
                if conn._idle_handle is not None:
                    conn._idle_handle.cancel()
                    conn._idle_handle = None
                return conn
        return None

    def _evict_idle(self, cluster: ClusterConnections, target: UpstreamTarget) -> bool:
        """At the connection ceiling: close an idle connection of the cluster to another endpoint."""
        for other, idle in self._idle.items():
            if other == target:
                continue
            for conn in idle:
                if conn.cluster is cluster:
                    conn.close()
                    return True
        return False

    async def _dial(self, cluster: ClusterConnections, target: UpstreamTarget, source: tuple[str, int] | None,
                    permit: Permit) -> UpstreamConnection:
        request = TunnelRequest(authority=Authority.from_address(target.ip, target.port), src_addr=source)
        try:
            tunnel = await asyncio.wait_for(
                self.hbone.connect(self.cert(), (target.ip, self.hbone_port), [target.identity], request),
                self.connect_timeout)
        except asyncio.CancelledError:
            permit.release()
            self._wake(cluster)
            raise
        except (OSError, TimeoutError, HboneError, ConnectionClosedError) as exc:
            permit.release()
            self._wake(cluster)
            raise _connect_error(exc) from exc
        except Exception as exc:  # an unexpected failure is still only this attempt's failure
            permit.release()
            self._wake(cluster)
            log.exception("HBONE connect to %s failed", target.address)
            raise UpstreamError(ResetReason.LOCAL_CONNECTION_FAILURE, False, repr(exc)) from exc
        conn: UpstreamConnection
        if target.http2:
            conn = _H2Upstream(self, cluster, target, tunnel, permit)
            self._h2.setdefault(target, []).append(conn)
        else:
            conn = _H1Upstream(self, cluster, target, tunnel, permit)
        self._all.add(conn)
        return conn

    def _release(self, conn: _H1Upstream) -> None:
        if self._closed:
            conn.close()
            return
        self._idle.setdefault(conn.target, []).append(conn)
        conn._idle_handle = self.loop.call_later(conn.cluster.idle_timeout, conn.idle_expired)
        self._wake(conn.cluster)

    def _idle_h2(self, conn: _H2Upstream) -> None:
        if conn._idle_handle is None and not conn.dead:
            conn._idle_handle = self.loop.call_later(conn.cluster.idle_timeout, conn.idle_expired)

    def _forget(self, conn: UpstreamConnection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            if conn.permit is not None:
                conn.permit.release()
                conn.permit = None
        if isinstance(conn, _H1Upstream):
            idle = self._idle.get(conn.target)
            if idle and conn in idle:
                idle.remove(conn)
                if not idle:
                    del self._idle[conn.target]
        else:
            conns = self._h2.get(conn.target)
            if conns and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._h2[conn.target]
        self._wake(conn.cluster)

    def _wake(self, cluster: ClusterConnections) -> None:
        if cluster.waiters:
            w = cluster.waiters.pop(0)
            if not w.done():
                w.set_result(None)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

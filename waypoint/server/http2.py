"""The downstream HTTP/2 (h2c, prior knowledge) server: h2 (sans-IO) in an asyncio protocol.

Every stream is a request handed to the proxy in its own task, so gRPC streams (unary and streaming)
run concurrently over one connection. Flow control is end to end: received DATA is acknowledged to the
client only when the proxy has taken it from the request body, and response DATA is sent as the client's
windows allow (`drain()` waits for them). A client RST_STREAM cancels the request and its upstream
attempt; a protocol error ends the connection with GOAWAY, as Envoy does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes

from waypoint.flags import ResponseFlag
from waypoint.server.body import Body, BodyAborted, Trailers
from waypoint.server.context import ConnectionContext, ServerLimits
from waypoint.server.messages import HOP_BY_HOP, HTTP2, DownstreamRequest, RequestHead, ResponseHead

if TYPE_CHECKING:
    from waypoint.server.handler import RequestHandler

log = logging.getLogger("waypoint.http2")


class _Stream:
    __slots__ = ("body", "pending", "pending_end", "pending_trailers", "responder", "task", "waiters")

    def __init__(self, body: Body, responder: Http2Responder) -> None:
        self.body = body
        self.responder = responder
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []
        self.pending_end = False
        self.pending_trailers: Trailers | None = None
        self.waiters: list[asyncio.Future[None]] = []


class Http2Responder:
    protocol = HTTP2

    def __init__(self, server: Http2Server, stream_id: int) -> None:
        self._server = server
        self.stream_id = stream_id
        self.bytes_sent = 0
        self.head_sent = False
        self.finished = False
        self.reset_by_peer = False

    @property
    def gone(self) -> bool:
        return self.reset_by_peer or self._server.lost

    def send_head(self, head: ResponseHead, end_stream: bool) -> None:
        headers = [(":status", str(head.status))]
        headers += [(n, v) for n, v in head.headers if n not in HOP_BY_HOP and n[:1] != ":"]
        self.head_sent = True
        if end_stream:
            self.finished = True
        self._server._send_headers(self, headers, end_stream)

    def send_data(self, data: bytes, end_stream: bool = False) -> None:
        if end_stream:
            self.finished = True
        self._server._send_data(self, data, end_stream)

    def send_trailers(self, trailers: Trailers) -> None:
        self.finished = True
        keep = [(n, v) for n, v in trailers if n[:1] != ":" and n not in HOP_BY_HOP]
        self._server._send_trailers(self, keep)

    async def drain(self) -> None:
        await self._server._drain(self.stream_id)

    def reset(self) -> None:
        self.finished = True
        self._server._reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)


class Http2Server(asyncio.Protocol):
    def __init__(self, handler: RequestHandler, ctx: ConnectionContext, limits: ServerLimits) -> None:
        self.handler = handler
        self.ctx = ctx
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        config = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                                 normalize_inbound_headers=True)
        self.h2 = H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.lost = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._write_paused = False
        self._conn_waiters: list[asyncio.Future[None]] = []
        self._idle_timer: asyncio.TimerHandle | None = None

    # ---- asyncio -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        h2c = self.h2
        h2c.initiate_connection()
        h2c.update_settings({
            SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.h2_max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: self.limits.h2_stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_request_headers,
        })
        extra = self.limits.h2_connection_window - 65535
        if extra > 0:
            h2c.increment_flow_control_window(extra)
        self._flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def eof_received(self) -> bool | None:
        for stream in self.streams.values():
            stream.body.fail(BodyAborted("client closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for stream in list(self.streams.values()):
            stream.body.fail(BodyAborted("client closed the connection"))
            if stream.task is not None and not stream.task.done() and not stream.responder.finished:
                stream.task.cancel()
            self._wake(stream)
        self._wake_conn()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_conn()

    # ---- receiving ---------------------------------------------------------------------------------

    def _dispatch(self, e: ev.Event) -> None:
        cls = type(e)
        if cls is ev.DataReceived:
            stream = self.streams.get(e.stream_id)  # type: ignore[attr-defined]
            data = e.data  # type: ignore[attr-defined]
            flow = e.flow_controlled_length  # type: ignore[attr-defined]
            if stream is None or stream.body.complete or stream.body.failed:
                self._ack(e.stream_id, flow)  # type: ignore[attr-defined]
                return
            if flow > len(data):
                self._ack(e.stream_id, flow - len(data))  # type: ignore[attr-defined]  # padding
            stream.body.feed(data)
        elif cls is ev.RequestReceived:
            self._on_request(e)  # type: ignore[arg-type]
        elif cls is ev.StreamEnded:
            stream = self.streams.get(e.stream_id)  # type: ignore[attr-defined]
            if stream is not None:
                stream.body.finish()
        elif cls is ev.WindowUpdated:
            sid = e.stream_id  # type: ignore[attr-defined]
            if sid:
                stream = self.streams.get(sid)
                if stream is not None:
                    self._push(sid, stream)
            else:
                for sid2, stream in list(self.streams.items()):
                    self._push(sid2, stream)
        elif cls is ev.RemoteSettingsChanged:
            for sid2, stream in list(self.streams.items()):
                self._push(sid2, stream)
        elif cls is ev.TrailersReceived:
            stream = self.streams.get(e.stream_id)  # type: ignore[attr-defined]
            if stream is not None:
                stream.body.finish([(n.decode("latin-1"), v.decode("latin-1"))
                                    for n, v in e.headers])  # type: ignore[attr-defined]
        elif cls is ev.StreamReset:
            stream = self.streams.pop(e.stream_id, None)  # type: ignore[attr-defined]
            if stream is not None:
                stream.responder.reset_by_peer = True
                stream.body.fail(BodyAborted("client reset the stream"))
                if stream.task is not None and not stream.task.done() and not stream.responder.finished:
                    stream.task.cancel()
                self._wake(stream)
        elif cls is ev.ConnectionTerminated and self.transport is not None:
            self.transport.close()

    def _on_request(self, e: ev.RequestReceived) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        sid = e.stream_id
        method = path = authority = ""
        scheme = "http"
        protocol_pseudo = None
        headers: list[tuple[str, str]] = []
        size = 0
        for raw_n, raw_v in e.headers or ():
            n = raw_n.decode("latin-1") if isinstance(raw_n, bytes) else raw_n
            v = raw_v.decode("latin-1") if isinstance(raw_v, bytes) else raw_v
            size += len(n) + len(v) + 32
            if n[:1] == ":":
                if n == ":method":
                    method = v
                elif n == ":path":
                    path = v
                elif n == ":authority":
                    authority = v
                elif n == ":scheme":
                    scheme = v
                elif n == ":protocol":
                    protocol_pseudo = v
            elif n == "host":
                authority = authority or v
            else:
                headers.append((n, v))
        head = RequestHead(method, path, authority, headers, scheme, HTTP2, None, size)
        body = Body(on_consumed=lambda n, sid=sid: self._ack(sid, n))
        responder = Http2Responder(self, sid)
        stream = _Stream(body, responder)
        self.streams[sid] = stream
        if method == "CONNECT" or protocol_pseudo is not None:
            # Extended CONNECT (RFC 8441 WebSockets) and plain CONNECT are off, as in Envoy by default.
            body.finish()
            stream.task = self.loop.create_task(self._refuse(DownstreamRequest(head, body), responder))
            return
        stream.task = self.loop.create_task(self._run(DownstreamRequest(head, body), responder, sid))

    async def _refuse(self, request: DownstreamRequest, responder: Http2Responder) -> None:
        await self.handler.refuse_connect(request, responder, self.ctx)
        self._forget(responder.stream_id)

    async def _run(self, request: DownstreamRequest, responder: Http2Responder, sid: int) -> None:
        try:
            await self.handler.handle(request, responder, self.ctx)
        except asyncio.CancelledError:
            if not responder.gone:
                raise
        except Exception:
            log.exception("waypoint request handler failed")
            if not responder.head_sent and not responder.gone:
                responder.send_head(ResponseHead(500, []), True)
            elif not responder.finished:
                responder.reset()
        finally:
            if not responder.finished and not responder.gone:
                responder.reset()
            self._forget(sid)

    def _forget(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None and not stream.pending and (stream.responder.finished or stream.responder.gone):
            del self.streams[sid]
            if not stream.body.complete:
                # Answered before the request ended: stop the client sending the rest.
                self._reset(sid, ErrorCodes.NO_ERROR)
        if not self.streams:
            self._arm_idle()

    def _ack(self, sid: int, n: int) -> None:
        if self.lost or n <= 0:
            return
        try:
            self.h2.acknowledge_received_data(n, sid)
        except (StreamClosedError, ProtocolError):
            try:
                self.h2.increment_flow_control_window(n)
            except (FlowControlError, ProtocolError):
                return
        self._flush()

    # ---- sending -----------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def _send_headers(self, responder: Http2Responder, headers: list[tuple[str, str]], end: bool) -> None:
        if responder.gone:
            return
        try:
            self.h2.send_headers(responder.stream_id, headers, end_stream=end)
        except (StreamClosedError, ProtocolError) as exc:
            log.debug("http2: cannot send headers on stream %d: %s", responder.stream_id, exc)
            return
        self._flush()

    def _send_data(self, responder: Http2Responder, data: bytes, end: bool) -> None:
        stream = self.streams.get(responder.stream_id)
        if stream is None or responder.gone:
            return
        if data:
            stream.pending.append(data)
            responder.bytes_sent += len(data)
        if end:
            stream.pending_end = True
        self._push(responder.stream_id, stream)

    def _send_trailers(self, responder: Http2Responder, trailers: Trailers) -> None:
        stream = self.streams.get(responder.stream_id)
        if stream is None or responder.gone:
            return
        stream.pending_trailers = trailers
        stream.pending_end = True
        self._push(responder.stream_id, stream)

    def _push(self, sid: int, stream: _Stream) -> None:
        """Send as much pending data as the windows allow; then END_STREAM or trailers if due."""
        h2c = self.h2
        try:
            while stream.pending:
                window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = stream.pending[0]
                if len(chunk) <= window:
                    stream.pending.pop(0)
                    last = not stream.pending and stream.pending_end and stream.pending_trailers is None
                    h2c.send_data(sid, chunk, end_stream=last)
                    if last:
                        stream.pending_end = False
                else:
                    h2c.send_data(sid, chunk[:window])
                    stream.pending[0] = chunk[window:]
            if not stream.pending and stream.pending_end:
                stream.pending_end = False
                if stream.pending_trailers is not None:
                    h2c.send_headers(sid, stream.pending_trailers, end_stream=True)
                    stream.pending_trailers = None
                else:
                    h2c.end_stream(sid)
        except (StreamClosedError, ProtocolError, FlowControlError) as exc:
            log.debug("http2: stream %d: %s", sid, exc)
            stream.pending.clear()
        self._flush()
        if not stream.pending:
            self._wake(stream)
            if stream.responder.finished:
                self._forget(sid)

    async def _drain(self, sid: int) -> None:
        stream = self.streams.get(sid)
        while stream is not None and stream.pending and not stream.responder.gone:
            w = self.loop.create_future()
            stream.waiters.append(w)
            await w
        if self.lost or (stream is not None and stream.responder.gone):
            raise ConnectionResetError("client went away")
        while self._write_paused and not self.lost:
            w = self.loop.create_future()
            self._conn_waiters.append(w)
            await w

    def _wake(self, stream: _Stream) -> None:
        waiters, stream.waiters = stream.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _wake_conn(self) -> None:
        waiters, self._conn_waiters = self._conn_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except (StreamClosedError, ProtocolError):
            return
        stream = self.streams.get(sid)
        if stream is not None:
            stream.pending.clear()
        self._flush()

    def _protocol_error(self, exc: Exception) -> None:
        log.info("http2: protocol error from %s: %s", self.ctx.source_ip or "?", exc)
        self.handler.protocol_error(self.ctx, 400, "http2.codec_error", ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, 0,
                                    protocol=HTTP2)
        try:
            self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._flush()
        except ProtocolError:
            pass
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self.limits.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.streams and not self.lost:
            try:
                self.h2.close_connection(ErrorCodes.NO_ERROR)
                self._flush()
            except ProtocolError:
                pass
            if self.transport is not None:
                self.transport.close()

"""The downstream HTTP/1.1 server: h11 (sans-IO) in an asyncio protocol, one request at a time.

Each request becomes a `DownstreamRequest` handed to the proxy in its own task; the body streams in
while the proxy already routes. Keep-alive, pipelining (h11 holds the next request until the current
response ends) and `Expect: 100-continue` work as clients expect. What Envoy answers itself, this server
answers too, and then closes the connection without disturbing any other:

* a malformed request: 400 (flag DPE); a request head over the limit: 431;
* a client that starts a request and does not finish its head in time: 408;
* a request body that stalls for the stream idle timeout: 408 `stream timeout` (flag SI).

A WebSocket `Upgrade` is passed to the proxy like any request; once the upstream answered 101, the
connection carries raw bytes both ways (`RawChannel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from waypoint.flags import ResponseFlag
from waypoint.server.body import HIGH_WATER, Body, BodyAborted, Trailers
from waypoint.server.context import ConnectionContext, ServerLimits
from waypoint.server.h11compat import h11
from waypoint.server.messages import HOP_BY_HOP, HTTP1, HTTP10, DownstreamRequest, RequestHead, ResponseHead

if TYPE_CHECKING:
    from waypoint.server.handler import RequestHandler

log = logging.getLogger("waypoint.http1")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large",
            431: b"Request Header Fields Too Large", 403: b"Forbidden", 503: b"Service Unavailable"}


def _text(b: bytes) -> str:
    return b.decode("latin-1")


def request_head_from_h11(ev: h11.Request, header_bytes: int) -> RequestHead:
    headers = [(_text(n), _text(v)) for n, v in ev.headers]
    authority = ""
    connection_tokens: set[str] = set()
    upgrade = None
    for n, v in headers:
        if n == "host" and not authority:
            authority = v
        elif n == "connection":
            connection_tokens.update(t.strip().lower() for t in v.split(","))
        elif n == "upgrade":
            upgrade = v.strip().lower()
    target = _text(ev.target)
    scheme = "http"
    if not target.startswith("/") and "://" in target:  # absolute-form: take authority and path from it
        scheme, _, rest = target.partition("://")
        host, slash, path = rest.partition("/")
        authority = host or authority
        target = slash + path or "/"
    if "upgrade" not in connection_tokens or upgrade != "websocket":
        upgrade = None
    dropped = HOP_BY_HOP | {t for t in connection_tokens if t not in ("close", "keep-alive", "upgrade")}
    kept = [(n, v) for n, v in headers if n not in dropped and n != "host"]
    if upgrade is not None:
        kept += [("connection", "upgrade"), ("upgrade", "websocket")]
    protocol = HTTP10 if ev.http_version == b"1.0" else HTTP1
    return RequestHead(_text(ev.method), target, authority, kept, scheme, protocol, upgrade, header_bytes)


def raw_reply(status: int, body: bytes = b"", extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete response written without h11 (when its state machine is already in ERROR)."""
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")), b"server: istio-envoy",
             b"content-length: %d" % len(body), b"connection: close"]
    if body:
        lines.append(b"content-type: text/plain")
    lines += [f"{n}: {v}".encode("latin-1") for n, v in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RawChannel:
    """The downstream side of an upgraded (WebSocket) connection: raw bytes, half-close, backpressure."""

    def __init__(self, server: Http1Server) -> None:
        self._server = server
        self.on_data: Callable[[bytes], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self._pending: list[bytes] = []
        self._eof = False

    def _deliver(self, data: bytes) -> None:
        if self.on_data is None:
            self._pending.append(data)
        else:
            self.on_data(data)

    def _deliver_eof(self) -> None:
        if self.on_eof is None:
            self._eof = True
        else:
            self.on_eof()

    def start(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self.on_data, self.on_eof = on_data, on_eof
        pending, self._pending = self._pending, []
        for chunk in pending:
            on_data(chunk)
        if self._eof:
            on_eof()

    def write(self, data: bytes) -> None:
        t = self._server.transport
        if t is not None and not t.is_closing():
            self._server.bytes_sent_raw += len(data)
            t.write(data)

    def write_eof(self) -> None:
        t = self._server.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def pause_reading(self) -> None:
        t = self._server.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self._server.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    async def drain(self) -> None:
        await self._server._drain()

    def close(self) -> None:
        t = self._server.transport
        if t is not None:
            t.close()

    @property
    def closed(self) -> asyncio.Future[None]:
        return self._server.closed


class Http1Responder:
    """Answers the current request of an `Http1Server`."""

    protocol = HTTP1

    def __init__(self, server: Http1Server, head: RequestHead) -> None:
        self._server = server
        self._request = head
        self.protocol = head.protocol
        self.bytes_sent = 0
        self.head_sent = False
        self.finished = False
        self._chunked_ok = head.protocol == HTTP1
        self.raw: RawChannel | None = None
        self._out: list[bytes] = []

    @property
    def gone(self) -> bool:
        return self._server.lost

    def _write(self, event: h11._events.Event) -> None:  # type: ignore[name-defined]
        """Encode now, write at the next flush: a whole small response leaves in one write."""
        server = self._server
        if server.lost:
            return
        try:
            data = server.conn.send(event)
        except h11.LocalProtocolError as exc:
            log.debug("http1: cannot send %r: %s", type(event).__name__, exc)
            server.abort()
            return
        if data:
            self.bytes_sent += len(data)
            self._out.append(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            transport = self._server.transport
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if transport is not None and not self._server.lost:
                transport.write(data)

    def send_head(self, head: ResponseHead, end_stream: bool) -> None:
        if self.head_sent:
            raise RuntimeError("response head already sent")
        status = head.status
        headers: list[tuple[str, str]] = []
        has_length = False
        for n, v in head.headers:
            if n in HOP_BY_HOP or n[:1] == ":":
                continue
            if n == "content-length":
                has_length = True
            headers.append((n, v))
        if status == 101:
            headers += [("connection", "upgrade"), ("upgrade", "websocket")]
            self.head_sent = True
            self._write(h11.InformationalResponse(status_code=101, headers=headers))
            self._flush()
            self.raw = self._server._switch_to_raw()
            return
        no_body = self._request.method == "HEAD" or status in (204, 304) or status < 200
        if end_stream and not has_length and not no_body:
            headers.append(("content-length", "0"))
        if self._server.close_after_response:
            headers.append(("connection", "close"))
        if has_length:
            self._chunked_ok = False
        self.head_sent = True
        self._write(h11.Response(status_code=status, headers=headers))
        if end_stream:
            self._end(None)

    def send_data(self, data: bytes, end_stream: bool = False) -> None:
        if data:
            self._write(h11.Data(data=data))
        if end_stream:
            self._end(None)

    def send_trailers(self, trailers: Trailers) -> None:
        keep = [(n, v) for n, v in trailers if n[:1] != ":" and n not in HOP_BY_HOP]
        self._end(keep if self._chunked_ok else None)

    def _end(self, trailers: Trailers | None) -> None:
        if self.finished:
            return
        self.finished = True
        # Trailers need chunked framing; on a Content-Length response (or to HTTP/1.0) they are dropped.
        self._write(h11.EndOfMessage(headers=(trailers or []) if self._chunked_ok else []))
        self._flush()
        self._server._response_done()

    async def drain(self) -> None:
        self._flush()
        await self._server._drain()

    def reset(self) -> None:
        self._out.clear()
        self._server.abort()


class Http1Server(asyncio.Protocol):
    def __init__(self, handler: RequestHandler, ctx: ConnectionContext, limits: ServerLimits) -> None:
        self.handler = handler
        self.ctx = ctx
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_request_headers)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.lost = False
        self.close_after_response = False
        self.bytes_sent_raw = 0
        self._body: Body | None = None
        self._responder: Http1Responder | None = None
        self._task: asyncio.Task[None] | None = None
        self._raw: RawChannel | None = None
        self._discard_body = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    # ---- asyncio -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw._deliver(data)
            return
        if self._responder is None:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._cancel(self._idle_timer)
                self._idle_timer = None
                self._head_timer = self.loop.call_later(self.limits.request_headers_timeout, self._head_timeout)
        elif self._body is not None and not self._body.complete:
            self._arm_body_timer()
        try:
            self.conn.receive_data(data)
        except RuntimeError:  # data after the connection was closed by our side
            return
        self._process()

    def eof_received(self) -> bool | None:
        if self._raw is not None:
            self._raw._deliver_eof()
            return True
        with contextlib.suppress(RuntimeError):
            self.conn.receive_data(b"")
        self._process()
        return self._responder is not None and not self._responder.finished  # let a response finish

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for timer in (self._head_timer, self._idle_timer, self._body_timer):
            self._cancel(timer)
        if self._body is not None and not self._body.complete:
            self._body.fail(BodyAborted("client closed the connection mid-request"))
        task = self._task
        if (task is not None and not task.done() and self._responder is not None and not self._responder.finished
                and self._raw is None):
            task.cancel()
        if self._raw is not None:
            self._raw._deliver_eof()
        self._wake_drainers()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("client went away")
        if self._write_paused:
            w = self.loop.create_future()
            self._drain_waiters.append(w)
            await w
            if self.lost:
                raise ConnectionResetError("client went away")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---- events ------------------------------------------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        while not self.lost:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                body = self._body
                if body is not None and not body.complete and self._body_timer is None and not self._discard_body:
                    self._arm_body_timer()
                return
            cls = type(ev)
            if cls is h11.Data:
                self._on_body(ev.data)  # type: ignore[union-attr]
            elif cls is h11.Request:
                self._on_request(ev)  # type: ignore[arg-type]
            elif cls is h11.EndOfMessage:
                self._on_end(ev)  # type: ignore[arg-type]
            elif cls is h11.ConnectionClosed:
                if self._responder is None or self._responder.finished:
                    self._close()
                return

    def _on_request(self, ev: h11.Request) -> None:
        self._cancel(self._head_timer)
        self._head_timer = None
        self._cancel(self._idle_timer)
        self._idle_timer = None
        head = request_head_from_h11(ev, self._head_bytes - len(self.conn.trailing_data[0]))
        self._head_bytes = 0
        if head.header_bytes > self.limits.max_request_headers:
            # h11 bounds only heads that arrive in pieces; one that arrived whole is measured here.
            self._local_error(431, "http1.headers_too_large", ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)
            return
        self.close_after_response = self.conn.our_state is h11.MUST_CLOSE or any(
            n == "connection" and "close" in v.lower() for n, v in ev.headers)  # type: ignore[comparison-overlap]
        body = Body(on_consumed=self._body_consumed)
        self._body = body
        self._discard_body = False
        responder = Http1Responder(self, head)
        self._responder = responder
        if head.header("expect") == "100-continue":
            head.headers = [(n, v) for n, v in head.headers if n != "expect"]
            responder._write(h11.InformationalResponse(status_code=100, headers=[]))
            responder._flush()
        self._task = self.loop.create_task(self._run(DownstreamRequest(head, body), responder))

    def _on_body(self, data: bytes) -> None:
        body = self._body
        if body is None or self._discard_body:
            return
        body.feed(data)
        if body.unread > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _on_end(self, ev: h11.EndOfMessage) -> None:
        self._cancel(self._body_timer)
        self._body_timer = None
        body = self._body
        if body is not None:
            trailers = [(_text(n), _text(v)) for n, v in ev.headers] if ev.headers else None
            body.finish(trailers)
        self._maybe_next_cycle()

    def _body_consumed(self, n: int) -> None:
        body = self._body
        if self._reading_paused and body is not None and body.unread <= HIGH_WATER // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    async def _run(self, request: DownstreamRequest, responder: Http1Responder) -> None:
        try:
            await self.handler.handle(request, responder, self.ctx)
        except asyncio.CancelledError:
            if not self.lost:
                raise
        except Exception:
            log.exception("waypoint request handler failed")
            if not responder.head_sent and not self.lost:
                responder.send_head(ResponseHead(500, []), True)
            else:
                self.abort()
        finally:
            if not responder.finished and self._raw is None and not self.lost:
                # The handler returned without ending the response: the message cannot be trusted.
                self.abort()

    def _switch_to_raw(self) -> RawChannel:
        raw = RawChannel(self)
        self._raw = raw
        self._cancel(self._body_timer)
        trailing, _closed = self.conn.trailing_data
        if trailing:
            raw._deliver(bytes(trailing))
        return raw

    def _response_done(self) -> None:
        body = self._body
        if body is not None and not body.complete:
            # Answered before the request body ended (a 403 to a large POST): read and drop the rest.
            self._discard_body = True
            body.fail(BodyAborted("response sent before the request body ended"))
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
        self._maybe_next_cycle()

    def _maybe_next_cycle(self) -> None:
        conn = self.conn
        responder = self._responder
        if responder is None or not responder.finished:
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            self._responder = None
            self._body = None
            conn.start_next_cycle()
            self._arm_idle()
            if conn.trailing_data[0]:
                self.loop.call_soon(self._after_cycle)
        elif conn.our_state in (h11.MUST_CLOSE, h11.CLOSED):
            self._close()

    def _after_cycle(self) -> None:
        if self.conn.trailing_data[0] and self._responder is None:
            self._head_bytes = len(self.conn.trailing_data[0])
            self._head_timer = self.loop.call_later(self.limits.request_headers_timeout, self._head_timeout)
        self._process()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---- errors and timers -------------------------------------------------------------------------

    def _local_error(self, status: int, details: str, flag: ResponseFlag | None, body: bytes = b"") -> None:
        responder = self._responder
        if responder is not None and responder.head_sent:
            self.abort()
            return
        data = raw_reply(status, body)
        self.handler.protocol_error(self.ctx, status, details, flag, len(data), body=body)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.transport.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint or 400
        details = "http1.headers_too_large" if status == 431 else "http1.codec_error"
        log.info("http1: protocol error from %s: %s", self.ctx.source_ip or "?", exc)
        self._local_error(status, details, ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._responder is None and not self.lost:
            self._local_error(408, "request_header_timeout", None, b"request timeout")

    def _arm_idle(self) -> None:
        self._cancel(self._idle_timer)
        self._idle_timer = self.loop.call_later(self.limits.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self._responder is None:
            self._close()

    def _arm_body_timer(self) -> None:
        self._cancel(self._body_timer)
        self._body_timer = self.loop.call_later(self.limits.stream_idle_timeout, self._body_stalled)

    def _body_stalled(self) -> None:
        self._body_timer = None
        body = self._body
        if body is not None and not body.complete and not self.lost:
            body.fail(BodyAborted("request body stalled"))
            self._local_error(408, "stream_idle_timeout", ResponseFlag.STREAM_IDLE_TIMEOUT, b"stream timeout")

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

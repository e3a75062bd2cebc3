"""The sans-IO core of one HBONE connection: bytes and calls in, tunnel events and bytes out.

It turns h2's frame-level events into the few things a tunnel endpoint acts on (a CONNECT to answer,
data, half-close, reset, shutdown), validates requests and responses per stream, queues outbound data
beyond the peer's flow-control windows and releases it as WINDOW_UPDATEs arrive, and reports every
peer misbehaviour as an event instead of raising. No sockets, no clock: the asyncio shell in
``connection.py`` supplies both, and the tests drive two sessions against each other in memory.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from dataclasses import dataclass
from typing import Any

import h2.events as ev
from h2.errors import ErrorCodes
from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    FrameTooLargeError,
    ProtocolError,
    StreamClosedError,
    TooManyStreamsError,
)
from h2.settings import SettingCodes
from h2.stream import StreamState

from mesh.hbone.constants import HboneLimits
from mesh.hbone.errors import ConnectionClosedError, HeaderError
from mesh.hbone.h2conn import HboneH2Connection, PrefaceError
from mesh.hbone.protocol import (
    STATUS_OK,
    ConnectRequest,
    ConnectResponse,
    Header,
    Rejection,
    response_headers,
    validate_connect,
    validate_response,
)

# ---- events ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestReceived:
    """Server: a well-formed CONNECT; answer with ``respond``."""

    stream_id: int
    request: ConnectRequest


@dataclass(slots=True)
class RequestRejected:
    """Server: a malformed request; the session already answered ``rejection.status`` and closed it."""

    stream_id: int
    rejection: Rejection


@dataclass(slots=True)
class ResponseReceived:
    """Client: the server's answer to our CONNECT."""

    stream_id: int
    response: ConnectResponse


@dataclass(slots=True)
class DataReceived:
    """Payload for a stream; acknowledge ``flow_length`` once it has been passed on."""

    stream_id: int
    data: bytes
    flow_length: int


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed its direction (END_STREAM)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The stream is gone: reset by the peer (``remote``) or by the session (``reason`` says why)."""

    stream_id: int
    error_code: int
    remote: bool
    reason: str = ""


@dataclass(slots=True)
class StreamDrained:
    """Everything queued for the stream has gone out; a paused source may resume."""

    stream_id: int


@dataclass(slots=True)
class PingAcknowledged:
    opaque: bytes


@dataclass(slots=True)
class GoAwayReceived:
    """The peer is shutting down: no new streams; those up to ``last_stream_id`` may finish if graceful."""

    error_code: int
    last_stream_id: int
    graceful: bool


@dataclass(slots=True)
class PeerSettingsChanged:
    max_concurrent_streams: int | None


@dataclass(slots=True)
class ProtocolViolation:
    """The peer broke HTTP/2; GOAWAY is queued and the connection must be closed after flushing."""

    reason: str
    error_code: int
    message: str


Event = (RequestReceived | RequestRejected | ResponseReceived | DataReceived | StreamEnded | StreamReset
         | StreamDrained | PingAcknowledged | GoAwayReceived | PeerSettingsChanged | ProtocolViolation)


def _violation_reason(exc: Exception) -> str:
    if isinstance(exc, PrefaceError):
        return "bad_preface"
    if isinstance(exc, DenialOfServiceError):
        return "header_too_large"
    if isinstance(exc, FrameTooLargeError):
        return "frame_too_large"
    if isinstance(exc, FlowControlError):
        return "flow_control"
    if isinstance(exc, TooManyStreamsError):
        return "too_many_streams"
    return "protocol_error"


_SENDABLE = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class _Outbound:
    """Bytes waiting for flow-control window on one stream, and whether END_STREAM follows them."""

    __slots__ = ("chunks", "eof", "size")

    def __init__(self) -> None:
        self.chunks: collections.deque[Any] = collections.deque()
        self.size = 0
        self.eof = False


class HboneSession:
    """One HTTP/2 connection carrying HBONE tunnels, in either role."""

    def __init__(self, client_side: bool, limits: HboneLimits, allow_hostname_authority: bool = False,
                 borrow_data: bool = False) -> None:
        """``borrow_data``: ``DataReceived.data`` is a memoryview into the receive buffer, valid only until
        the caller is done with the events of that call (one copy less; the asyncio shell uses it)."""
        self.client_side = client_side
        self.limits = limits
        self.allow_hostname_authority = allow_hostname_authority
        self.h2 = HboneH2Connection(client_side=client_side, limits=limits, borrow_data=borrow_data)
        self._queues: dict[int, _Outbound] = {}
        self._ping_ids = itertools.count(1)
        self.closed = False  # no more frames may be sent or received
        self.close_reason = ""
        self.requests_seen = 0

    # ---- lifecycle ---------------------------------------------------------------------------------

    def initiate(self) -> None:
        self.h2.initiate_connection()

    @property
    def draining(self) -> bool:
        """A GOAWAY went either way: no new streams on this connection."""
        return self.h2.goaway_sent_last_id is not None or self.h2.goaway_received_last_id is not None

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self.h2.streams.values() if not s.closed)

    @property
    def peer_max_streams(self) -> int:
        value = self.h2.remote_settings.max_concurrent_streams
        return value if value is not None else 2**31 - 1

    def get_buffer(self) -> memoryview:
        return self.h2.incoming_buffer.get_buffer()

    @property
    def in_header_block(self) -> bool:
        return self.h2.incoming_buffer.in_header_block

    def take_output(self) -> list[Any]:
        return self.h2.take_output()

    # ---- input -------------------------------------------------------------------------------------

    def receive_committed(self, nbytes: int) -> list[Event]:
        """``nbytes`` were read into ``get_buffer()``."""
        return self._receive(nbytes, None)

    def receive_data(self, data: bytes) -> list[Event]:
        return self._receive(0, data)

    def _receive(self, nbytes: int, data: bytes | None) -> list[Event]:
        if self.closed:
            return []
        try:
            h2_events = self.h2.receive_committed(nbytes) if data is None else self.h2.receive_data(data)
        except ProtocolError as exc:  # h2 already queued GOAWAY with the matching error code
            return [self._violation(_violation_reason(exc), int(exc.error_code), str(exc))]
        except Exception as exc:  # anything unexpected from a peer's bytes still ends only this connection
            try:
                self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            except Exception:
                self.h2.clear_outbound_data_buffer()
            return [self._violation("protocol_error", int(ErrorCodes.PROTOCOL_ERROR), f"{type(exc).__name__}: {exc}")]
        out: list[Event] = []
        for e in h2_events:
            self._translate(e, out)
        return out

    def _violation(self, reason: str, code: int, message: str) -> ProtocolViolation:
        self.closed = True
        self.close_reason = reason
        self._queues.clear()
        return ProtocolViolation(reason, code, message)

    def _translate(self, e: ev.Event, out: list[Event]) -> None:
        cls = e.__class__
        if cls is ev.DataReceived:
            out.append(DataReceived(e.stream_id, e.data, e.flow_controlled_length))
        elif cls is ev.WindowUpdated:
            self._on_window(e.stream_id, out)
        elif cls is ev.StreamEnded:  # h2 emits it right after the DATA or HEADERS that carried END_STREAM
            out.append(StreamEnded(e.stream_id))
            self._end_seen(e.stream_id)
        elif cls is ev.RequestReceived:
            self._on_request(e, out)
        elif cls is ev.ResponseReceived:
            self._on_response(e, out)
        elif cls is ev.StreamReset:
            self._queues.pop(e.stream_id, None)
            reason = "refused" if e.error_code == ErrorCodes.REFUSED_STREAM and not e.remote_reset else ""
            out.append(StreamReset(e.stream_id, int(e.error_code), bool(e.remote_reset), reason))
        elif cls is ev.TrailersReceived:
            self._reset(e.stream_id, ErrorCodes.PROTOCOL_ERROR, "trailers on a CONNECT stream", out)
        elif cls is ev.PingAckReceived:
            out.append(PingAcknowledged(bytes(e.ping_data)))
        elif cls is ev.RemoteSettingsChanged:
            mcs = e.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
            out.append(PeerSettingsChanged(mcs.new_value if mcs is not None else None))
            if SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings:
                self._on_window(0, out)
        elif cls is ev.ConnectionTerminated:
            graceful = e.error_code == ErrorCodes.NO_ERROR
            if not graceful:
                self.closed = True
                self.close_reason = "goaway"
                self._queues.clear()
            out.append(GoAwayReceived(int(e.error_code), int(e.last_stream_id or 0), graceful))
        # InformationalResponseReceived (1xx), PriorityUpdated, SettingsAcknowledged, PingReceived (h2
        # answers it), UnknownFrameReceived, AlternativeServiceAvailable: nothing for a tunnel to do.

    def _on_request(self, e: ev.RequestReceived, out: list[Event]) -> None:
        self.requests_seen += 1
        sid = e.stream_id
        verdict = validate_connect(e.headers, self.allow_hostname_authority)
        if isinstance(verdict, Rejection):
            self._reject(sid, verdict.status)
            out.append(RequestRejected(sid, verdict))
            return
        out.append(RequestReceived(sid, verdict))

    def _reject(self, stream_id: int, status: int) -> None:
        try:
            self.h2.send_headers(stream_id, response_headers(status), end_stream=True)
            stream = self.h2.streams.get(stream_id)
            if stream is not None and not stream.closed:
                # The client may still be sending: ask it to stop, without error (RFC 9113 §8.1).
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except (ProtocolError, StreamClosedError, KeyError):
            pass

    def _on_response(self, e: ev.ResponseReceived, out: list[Event]) -> None:
        try:
            response = validate_response(e.headers)
        except HeaderError as exc:
            self._reset(e.stream_id, ErrorCodes.PROTOCOL_ERROR, f"malformed response: {exc}", out)
            return
        out.append(ResponseReceived(e.stream_id, response))
        if response.status != STATUS_OK:
            self._queues.pop(e.stream_id, None)

    def _end_seen(self, stream_id: int) -> None:
        stream = self.h2.streams.get(stream_id)
        if stream is None or stream.closed:
            self._queues.pop(stream_id, None)

    def _reset(self, stream_id: int, code: ErrorCodes, reason: str, out: list[Event]) -> None:
        self._queues.pop(stream_id, None)
        with contextlib.suppress(ProtocolError, StreamClosedError, KeyError):
            self.h2.reset_stream(stream_id, code)
        out.append(StreamReset(stream_id, int(code), False, reason))

    # ---- output ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionClosedError(f"HBONE connection is closed ({self.close_reason or 'closed'})")

    def send_request(self, headers: list[Header]) -> int:
        """Client: open a stream with a CONNECT header block; returns its stream id."""
        self._check_open()
        if self.draining:
            raise ConnectionClosedError("HBONE connection is draining (GOAWAY) and takes no new streams")
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        return sid

    def respond(self, stream_id: int, status: int, headers: list[Header] | None = None) -> None:
        """Server: answer a CONNECT; anything but 200 also ends the stream."""
        self._check_open()
        if status == STATUS_OK:
            self.h2.send_headers(stream_id, response_headers(status, headers or ()))
        else:
            self._reject(stream_id, status)

    def send_data(self, stream_id: int, data: Any, end_stream: bool = False) -> int:
        """Queue ``data`` on the stream, sending at once what the windows allow; returns bytes queued.

        ``data`` must not be modified afterwards (it may be written out later, without a copy).
        """
        self._check_open()
        q = self._queues.get(stream_id)
        if q is None:
            stream = self.h2.streams.get(stream_id)
            if stream is None or stream.state_machine.state not in _SENDABLE:
                raise ConnectionResetError(f"HBONE stream {stream_id} is closed for sending")
            q = self._queues[stream_id] = _Outbound()
        if q.eof:
            raise ConnectionResetError(f"HBONE stream {stream_id} was already half-closed (write_eof)")
        if len(data):
            q.chunks.append(data)
            q.size += len(data)
        if end_stream:
            q.eof = True
        try:
            self._flush(stream_id, q)
        except ProtocolError as exc:
            self._queues.pop(stream_id, None)
            raise ConnectionResetError(f"HBONE stream {stream_id}: {exc}") from exc
        return q.size

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction once queued data has been sent."""
        self.send_data(stream_id, b"", end_stream=True)

    def pending(self, stream_id: int) -> int:
        q = self._queues.get(stream_id)
        return q.size if q is not None else 0

    def _flush(self, stream_id: int, q: _Outbound) -> bool:
        """Send what the windows allow; True when the queue emptied (END_STREAM sent if asked)."""
        h2c = self.h2
        chunks = q.chunks
        while chunks:
            window = h2c.local_flow_control_window(stream_id)
            if window <= 0:
                return False
            chunk = chunks[0]
            n = len(chunk)
            limit = min(window, h2c.max_outbound_frame_size)
            if n <= limit:
                chunks.popleft()
                q.size -= n
                h2c.send_data(stream_id, chunk, end_stream=q.eof and not chunks)
            else:
                view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                chunks[0] = view[limit:]
                q.size -= limit
                h2c.send_data(stream_id, view[:limit])
        if q.eof and q.size == 0 and (not chunks):
            if not self._last_frame_ended(stream_id):
                h2c.end_stream(stream_id)
            self._queues.pop(stream_id, None)
        return True

    def _last_frame_ended(self, stream_id: int) -> bool:
        stream = self.h2.streams.get(stream_id)
        return stream is None or stream.state_machine.state not in _SENDABLE

    def _on_window(self, stream_id: int, out: list[Event]) -> None:
        if self.closed:
            return
        targets = list(self._queues.items()) if stream_id == 0 else (
            [(stream_id, self._queues[stream_id])] if stream_id in self._queues else [])
        for sid, q in targets:
            if not q.chunks and not q.eof:
                continue
            try:
                if self._flush(sid, q):
                    out.append(StreamDrained(sid))
            except (ProtocolError, StreamClosedError) as exc:
                self._reset(sid, ErrorCodes.INTERNAL_ERROR, f"send failed: {exc}", out)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The consumer has taken ``nbytes`` of this stream's data: reopen that much window."""
        if self.closed or nbytes <= 0:
            return
        # If the stream is already gone h2 still credits the connection window, which is what matters.
        with contextlib.suppress(ProtocolError, StreamClosedError, KeyError):
            self.h2.acknowledge_received_data(nbytes, stream_id)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        self._queues.pop(stream_id, None)
        if self.closed:
            return
        stream = self.h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        with contextlib.suppress(ProtocolError, StreamClosedError, KeyError):
            self.h2.reset_stream(stream_id, error_code)

    def ping(self) -> bytes:
        self._check_open()
        opaque = next(self._ping_ids).to_bytes(8, "big")
        self.h2.ping(opaque)
        return opaque

    def goaway_graceful(self) -> int:
        """Stop taking streams, let open ones finish; returns the last stream id we will serve."""
        self._check_open()
        return self.h2.graceful_goaway()

    def close(self, error_code: int = ErrorCodes.NO_ERROR, message: str = "") -> None:
        """GOAWAY with ``error_code`` and no more frames after it."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = message or "closed"
        self._queues.clear()
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(error_code, additional_data=message.encode("ascii", "replace")[:256])

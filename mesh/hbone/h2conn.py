"""An ``h2`` connection tuned for HBONE: big frames, few copies, per-stream (not per-connection) errors.

h2 does the HTTP/2 state machine, HPACK and flow-control bookkeeping; this subclass changes only how
bytes get in and out, because a tunnel moves gigabytes through it:

* **In**: :class:`FrameBuffer` owns one large receive buffer that the TLS layer decrypts straight into
  (``asyncio.BufferedProtocol``), parses frames in place and rejects an over-long frame from its header,
  before buffering its body. The only copy of a DATA payload is the ``bytes`` handed to the consumer.
* **Out**: DATA frames are emitted as a 9-byte header plus the caller's own buffer, not joined into
  h2's output bytearray, so a 256 KiB read from a socket goes to the TLS writer without a copy.
* **Limits**: the HBONE settings are in force from the first SETTINGS frame (h2's documented way of
  overriding ``local_settings`` before ``initiate_connection``); a header block bigger than the limit
  ends the connection before it is buffered; a peer that opens more streams than we advertised gets
  ``REFUSED_STREAM`` on that stream instead of h2's connection teardown.

Private h2 hooks used (h2 4.x): ``_prepare_for_sending``, ``_receive_headers_frame``, ``_data_to_send``,
``incoming_buffer``; ``tests/test_hbone_h2conn.py`` pins their behaviour.
"""

from __future__ import annotations

import struct
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event, StreamReset
from h2.exceptions import DenialOfServiceError, FrameTooLargeError, ProtocolError
from h2.frame_buffer import CONTINUATION_BACKLOG
from h2.frame_buffer import FrameBuffer as _H2FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.exceptions import InvalidDataError, InvalidFrameError, InvalidPaddingError
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
)

from mesh.hbone.constants import HboneLimits

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length split 16+8, type, flags, stream id
_DATA_TYPE = 0x0
_FLAG_END_STREAM = 0x1
_MIN_READ = 64 * 1024
_SPLIT_AT = 64 * 1024
_HEADER_TYPES = (0x1, 0x5, 0x9)  # HEADERS, PUSH_PROMISE, CONTINUATION


class QuietDataFrame(DataFrame):
    """A received DATA frame whose repr does not hex-dump the payload.

    h2 formats ``repr(frame)`` of every received frame for its trace log even when tracing is off, and
    hyperframe's repr hexlifies the whole body: for 1 MiB frames that was half the server's CPU time.
    """

    def __repr__(self) -> str:
        return f"DataFrame(stream_id={self.stream_id}, length={len(self.data)})"


class BorrowedDataFrame(QuietDataFrame):
    """A received DATA frame whose payload is a view into the receive buffer, not a copy.

    Valid only until the code handling the events of that ``receive_*`` call returns (the buffer is
    reused for the next read); consumers that keep data must copy it. Saves one copy of every byte.
    """

    def parse_body(self, data: memoryview) -> None:
        pad = self.parse_padding_data(data)
        self.data = data[pad : len(data) - self.pad_length]
        self.body_len = len(data)
        if self.pad_length and self.pad_length >= self.body_len:
            raise InvalidPaddingError("Padding is too long.")


class PrefaceError(ProtocolError):
    """The first bytes on a server connection are not the HTTP/2 connection preface."""


class FrameBuffer(_H2FrameBuffer):
    """Frame splitter over one reusable buffer; see the module docstring."""

    def __init__(self, server: bool, max_frame_size: int, max_header_block: int, borrow: bool = False) -> None:
        super().__init__(server=server)
        self._data_class = BorrowedDataFrame if borrow else QuietDataFrame
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_block
        self._buf = bytearray(2 * (max_frame_size + 9) + _MIN_READ)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._block_bytes = 0

    @property
    def in_header_block(self) -> bool:
        """A HEADERS frame without END_HEADERS is waiting for its CONTINUATIONs."""
        return bool(self._headers_buffer)

    @property
    def pending(self) -> int:
        return self._end - self._start

    def _make_room(self, want: int) -> None:
        if len(self._buf) - self._end >= want:
            return
        pending = self._end - self._start
        if self._start:
            self._buf[:pending] = bytes(self._view[self._start : self._end])
            self._start, self._end = 0, pending
        if len(self._buf) - self._end < want:
            grown = bytearray(max(len(self._buf) * 2, pending + want))
            grown[:pending] = self._buf[:pending]
            self._buf = grown
            self._view = memoryview(self._buf)

    def get_buffer(self) -> memoryview:
        """Free space to read into; at least 64 KiB, usually megabytes."""
        self._make_room(_MIN_READ)
        return self._view[self._end :]

    def commit(self, nbytes: int) -> None:
        self._end += nbytes

    def add_data(self, data: Any) -> None:
        n = len(data)
        if not n:
            return
        self._make_room(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def _check_preface(self) -> bool:
        """Consume as much of the preface as is there; False while more is needed."""
        have = min(self._preamble_len, self._end - self._start)
        expected = self._preamble[:have]
        if self._view[self._start : self._start + have] != expected:
            raise PrefaceError("Invalid HTTP/2 preamble.")
        self._start += have
        self._preamble = self._preamble[have:]
        self._preamble_len -= have
        return not self._preamble_len

    def __next__(self) -> Frame:
        if self._preamble_len and not self._check_preface():
            raise StopIteration
        while True:
            start, avail = self._start, self._end - self._start
            if avail < 9:
                raise StopIteration
            view = self._view
            length = (view[start] << 16) | (view[start + 1] << 8) | view[start + 2]
            if length > self.max_frame_size:
                raise FrameTooLargeError(f"Received overlong frame: length {length}, max {self.max_frame_size}")
            ftype = view[start + 3]
            if ftype in _HEADER_TYPES:
                self._block_bytes = (self._block_bytes if self._headers_buffer else 0) + length
                if self._block_bytes > self.max_header_block:
                    raise DenialOfServiceError(
                        f"header block of more than {self.max_header_block} bytes")
                if len(self._headers_buffer) >= CONTINUATION_BACKLOG:
                    raise ProtocolError("Too many continuation frames received.")
            if avail < length + 9:
                raise StopIteration
            try:
                f, _ = Frame.parse_frame_header(view[start : start + 9])
                if ftype == _DATA_TYPE:
                    f.__class__ = self._data_class
                f.parse_body(view[start + 9 : start + 9 + length])
            except InvalidDataError as err:
                raise ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise ProtocolError(f"Frame data missing or invalid: {err}") from err
            self._start = start + 9 + length
            if self._start == self._end:
                self._start = self._end = 0
            f = self._update_header_buffer(f)
            if f is not None:
                return f


class HboneH2Connection(H2Connection):
    """``H2Connection`` with HBONE settings and the zero-copy paths described in the module docstring."""

    def __init__(self, client_side: bool, limits: HboneLimits, borrow_data: bool = False) -> None:
        config = H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,  # mesh.hbone.protocol validates, per stream
            normalize_inbound_headers=False,
        )
        super().__init__(config)
        initial = {
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        }
        if client_side:
            initial[SettingCodes.ENABLE_PUSH] = 0
        self.local_settings = Settings(client=client_side, initial_values=initial)
        self.max_inbound_frame_size = limits.max_frame_size
        self.decoder.max_header_list_size = limits.max_header_list_size
        self.incoming_buffer = FrameBuffer(
            server=not client_side,
            max_frame_size=limits.max_frame_size,
            # An encoded block is at most a little over its decoded size; HPACK's own limit catches the rest.
            max_header_block=limits.max_header_list_size + 4096,
            borrow=borrow_data,
        )
        self._frame_dispatch_table[QuietDataFrame] = self._receive_data_frame
        self._frame_dispatch_table[BorrowedDataFrame] = self._receive_data_frame
        self._limits = limits
        self._out: list[Any] = []
        self._refusing = False
        #: Set once we sent a graceful GOAWAY: streams above it are refused, those below finish.
        self.goaway_sent_last_id: int | None = None
        #: Set once the peer sent a graceful GOAWAY: no new streams, existing ones finish.
        self.goaway_received_last_id: int | None = None

    def initiate_connection(self) -> None:
        super().initiate_connection()
        extra = self._limits.connection_window - 65535
        if extra > 0:
            self.increment_flow_control_window(extra)

    # ---- output ------------------------------------------------------------------------------------

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        if not frames:
            return
        out = self._out
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        for f in frames:
            if f.__class__ is DataFrame and not f.pad_length:
                data = f.data
                length = len(data)
                flags = _FLAG_END_STREAM if "END_STREAM" in f.flags else 0
                header = _FRAME_HEADER.pack(length >> 8, length & 0xFF, _DATA_TYPE, flags, f.stream_id)
                if length >= _SPLIT_AT:
                    out.append(header)  # big payload: hand it on as is, no copy
                    out.append(data)
                else:  # small payload: one buffer, so TLS makes one record instead of two
                    out.append(header + bytes(data))
            else:
                out.append(f.serialize())

    def take_output(self) -> list[Any]:
        """Everything to write, in order, as a list of bytes-like objects (for ``writelines``)."""
        out = self._out
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        self._out = []
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        data = b"".join(self.take_output())
        if amount is not None and amount < len(data):
            self._out = [data[amount:]]
            return data[:amount]
        return data

    def clear_outbound_data_buffer(self) -> None:
        super().clear_outbound_data_buffer()
        self._out = []

    def graceful_goaway(self, additional_data: bytes = b"") -> int:
        """Announce shutdown with GOAWAY(NO_ERROR) yet keep serving the streams already open.

        h2's ``close_connection`` moves its state machine to CLOSED, after which even in-flight streams
        may not send DATA; RFC 9113 §6.8 wants them drained, so the frame is sent without that step.
        """
        last = self.highest_inbound_stream_id
        if self.goaway_sent_last_id is None:
            self.goaway_sent_last_id = last
            f = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=ErrorCodes.NO_ERROR,
                            additional_data=additional_data)
            self._prepare_for_sending([f])
        return self.goaway_sent_last_id

    # ---- input -------------------------------------------------------------------------------------

    def receive_committed(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written into ``incoming_buffer.get_buffer()``; process them."""
        self.incoming_buffer.commit(nbytes)
        return self.receive_data(b"")

    @property
    def open_inbound_streams(self) -> int:
        if self._refusing:
            return 0
        return super().open_inbound_streams

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        # Graceful: streams up to last_stream_id may finish, so keep the state machine open.
        self.goaway_received_last_id = frame.last_stream_id
        event = ConnectionTerminated()  # (not a dataclass in h2 4.x, unlike StreamReset)
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        new = frame.stream_id not in self.streams
        if not new or self.config.client_side:
            return super()._receive_headers_frame(frame)
        limit = self.local_settings.max_concurrent_streams
        if self.goaway_sent_last_id is None and super().open_inbound_streams + 1 <= limit:
            return super()._receive_headers_frame(frame)
        # Decode anyway (the HPACK table must stay in sync), then refuse only this stream.
        self._refusing = True
        try:
            frames, _events = super()._receive_headers_frame(frame)
        finally:
            self._refusing = False
        self.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
        refused = StreamReset(stream_id=frame.stream_id, error_code=ErrorCodes.REFUSED_STREAM, remote_reset=False)
        return frames, [refused]


__all__ = ["PREFACE", "BorrowedDataFrame", "FrameBuffer", "HboneH2Connection", "PrefaceError", "QuietDataFrame"]

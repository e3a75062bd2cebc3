"""A request or response body as a stream of chunks that can be read again (for retries) up to a limit.

Envoy buffers a request body while retries are possible and gives up on retrying once the body outgrows
its buffer; a body read twice must give the same bytes. `Body` does the same: chunks are kept until
`replay_limit` bytes have arrived, after which a reader's chunks are dropped as soon as it has taken
them (memory stays bounded) and a second reader gets `BodyNotReplayable`.

Flow control is the producer's: it feeds chunks and looks at `unread` to decide whether to pause its
source; `on_consumed(n)` is called the first time each byte is handed to a reader, which is where an
HTTP/2 producer returns window to its peer and an HTTP/1.1 producer resumes reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: Bytes of a request body kept for retries (Envoy's default per-connection buffer limit is 1 MiB).
REPLAY_LIMIT = 1024 * 1024
#: Unread bytes above which a producer should stop reading from its source.
HIGH_WATER = 256 * 1024


class BodyNotReplayable(Exception):
    """The body was larger than the replay limit and a reader already consumed part of it."""


class BodyAborted(ConnectionError):
    """The side producing the body went away before its end."""


Trailers = list[tuple[str, str]]


class Body:
    __slots__ = ("_chunks", "_consumed_upto", "_dropped", "_dropped_bytes", "_error", "_waiter", "complete",
                 "on_consumed", "received", "replay_limit", "trailers", "unread")

    def __init__(self, replay_limit: int = REPLAY_LIMIT, on_consumed: Callable[[int], None] | None = None) -> None:
        self._chunks: list[bytes] = []
        self._dropped = 0  # number of leading chunks no longer kept
        self._dropped_bytes = 0
        self._consumed_upto = 0  # chunk index up to which on_consumed was already called
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.received = 0
        self.unread = 0
        self.trailers: Trailers | None = None
        self.replay_limit = replay_limit
        self.on_consumed = on_consumed

    @classmethod
    def of(cls, data: bytes = b"", trailers: Trailers | None = None) -> Body:
        body = cls()
        if data:
            body.feed(data)
        body.finish(trailers)
        return body

    # ---- producer side -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if not data or self.complete or self._error is not None:
            return
        self._chunks.append(data)
        self.received += len(data)
        self.unread += len(data)
        self._wake()

    def finish(self, trailers: Trailers | None = None) -> None:
        if self.complete or self._error is not None:
            return
        self.trailers = trailers or None
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.complete or self._error is not None:
            return
        self._error = exc
        self._wake()

    @property
    def failed(self) -> BaseException | None:
        return self._error

    @property
    def replayable(self) -> bool:
        return self._dropped == 0 and self.received <= self.replay_limit

    def buffered(self) -> bytes | None:
        """The whole body when it is complete and every chunk was kept (mirrors, small retries)."""
        if not self.complete or self._dropped:
            return None
        return b"".join(self._chunks)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def wait_complete(self) -> None:
        while not self.complete and self._error is None:
            await self._wait()

    async def _wait(self) -> None:
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)

    # ---- consumer side -----------------------------------------------------------------------------

    def reader(self) -> BodyReader:
        if self._dropped:
            raise BodyNotReplayable(f"the body outgrew the {self.replay_limit}-byte replay buffer")
        return BodyReader(self)

    def _taken(self, index: int) -> None:
        """A reader took chunk `index` (absolute)."""
        if index >= self._consumed_upto:
            self._consumed_upto = index + 1
            n = len(self._chunks[index - self._dropped])
            self.unread -= n
            if self.on_consumed is not None:
                self.on_consumed(n)
        if self.received > self.replay_limit:
            # Too big to replay: keep only what no reader has taken yet.
            drop = index + 1 - self._dropped
            if drop > 0:
                self._dropped_bytes += sum(len(c) for c in self._chunks[:drop])
                del self._chunks[:drop]
                self._dropped += drop


class BodyReader:
    """One pass over a body; `read()` gives the next chunk, None at the end."""

    __slots__ = ("_body", "_pos", "bytes_read")

    def __init__(self, body: Body) -> None:
        self._body = body
        self._pos = 0
        self.bytes_read = 0

    @property
    def body(self) -> Body:
        return self._body

    def read_nowait(self) -> bytes | None:
        """The next chunk if one is there already; b"" when the caller must wait; None at the end."""
        body = self._body
        idx = self._pos - body._dropped
        if idx < 0:
            raise BodyNotReplayable(f"the body outgrew the {body.replay_limit}-byte replay buffer")
        if idx < len(body._chunks):
            chunk = body._chunks[idx]
            body._taken(self._pos)
            self._pos += 1
            self.bytes_read += len(chunk)
            return chunk
        if body._error is not None:
            raise body._error
        if body.complete:
            return None
        return b""

    async def read(self) -> bytes | None:
        while True:
            chunk = self.read_nowait()
            if chunk != b"":
                return chunk
            await self._body._wait()

    @property
    def at_end(self) -> bool:
        body = self._body
        return body.complete and self._pos - body._dropped >= len(body._chunks)

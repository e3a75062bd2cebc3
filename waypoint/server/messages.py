"""What the downstream protocols hand the proxy, and what the proxy hands back: one shape for HTTP/1.1
and HTTP/2, so routing, policy and telemetry never care which one the client spoke.

Header names are lower-case `str` (HTTP/2 requires it; HTTP/1.1 names are case-insensitive), values
`str` decoded as latin-1 so any byte survives the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from waypoint.server.body import Body, Trailers

HeaderList = list[tuple[str, str]]

HTTP1 = "HTTP/1.1"
HTTP10 = "HTTP/1.0"
HTTP2 = "HTTP/2"

# Connection-specific headers: never forwarded (RFC 9110 §7.6.1; RFC 9113 §8.2.2 forbids them in HTTP/2).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
                        "trailer", "proxy-authenticate", "proxy-authorization", "http2-settings"})


@dataclass(slots=True)
class RequestHead:
    method: str
    path: str
    authority: str
    headers: HeaderList
    scheme: str = "http"
    protocol: str = HTTP1
    upgrade: str | None = None  # "websocket" for an HTTP/1.1 Upgrade request
    header_bytes: int = 0  # wire size of the request head, for %BYTES_RECEIVED%

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


@dataclass(slots=True)
class DownstreamRequest:
    head: RequestHead
    body: Body

    @property
    def is_grpc(self) -> bool:
        ct = self.head.header("content-type")
        return ct is not None and ct.startswith("application/grpc")


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: HeaderList = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class Responder(Protocol):
    """How the proxy answers one downstream request (implemented by the HTTP/1.1 and HTTP/2 servers)."""

    protocol: str
    bytes_sent: int
    head_sent: bool

    def send_head(self, head: ResponseHead, end_stream: bool) -> None: ...

    def send_data(self, data: bytes, end_stream: bool = False) -> None: ...

    def send_trailers(self, trailers: Trailers) -> None: ...

    async def drain(self) -> None: ...

    def reset(self) -> None:
        """Abort the response (after headers went out, this is the only way to signal failure)."""

    @property
    def gone(self) -> bool:
        """The client went away; there is nobody to answer."""

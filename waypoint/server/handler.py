"""The interface between the downstream protocol servers and the proxy pipeline."""

from __future__ import annotations

from typing import Protocol

from waypoint.flags import ResponseFlag
from waypoint.server.context import ConnectionContext
from waypoint.server.messages import DownstreamRequest, Responder


class RequestHandler(Protocol):
    async def handle(self, request: DownstreamRequest, responder: Responder, ctx: ConnectionContext) -> None:
        """Answer one request; must end the response (or reset it) before returning."""

    async def refuse_connect(self, request: DownstreamRequest, responder: Responder,
                             ctx: ConnectionContext) -> None:
        """An HTTP/2 CONNECT or extended CONNECT, which the waypoint does not proxy."""

    def protocol_error(self, ctx: ConnectionContext, status: int, details: str, flag: ResponseFlag | None,
                       bytes_sent: int, *, body: bytes = b"", protocol: str = "HTTP/1.1") -> None:
        """A request the server answered itself (400, 408, 431): log and count it like any other."""

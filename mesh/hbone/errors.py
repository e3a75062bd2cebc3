"""Errors of the HBONE layer, each naming its cause so callers can log, count and map it."""

from __future__ import annotations


class HboneError(Exception):
    """Base class; ``reason`` is a short stable token for metrics labels and response flags."""

    reason = "hbone"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class HeaderError(HboneError, ValueError):
    """A request or response header is missing or malformed; ``header`` names it."""

    reason = "bad_header"

    def __init__(self, header: str, problem: str) -> None:
        super().__init__(f"header {header}: {problem}")
        self.header = header
        self.problem = problem


class HandshakeError(HboneError):
    """TLS did not produce an acceptable peer: handshake failure, timeout, wrong identity, ALPN, cipher."""

    reason = "tls"


class TunnelRefused(HboneError):
    """The server answered the CONNECT with a non-200 status (400 bad request, 401 denied, 503 upstream)."""

    reason = "refused"

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message or f"HBONE CONNECT refused with status {status}", reason=f"status_{status}")
        self.status = status


class TunnelReset(HboneError, ConnectionResetError):
    """The peer reset the stream (RST_STREAM) or the connection under it went away."""

    reason = "reset"

    def __init__(self, message: str, error_code: int = 0) -> None:
        super().__init__(message)
        self.error_code = error_code


class ConnectionClosedError(HboneError, ConnectionError):
    """The HTTP/2 connection is closed or draining (GOAWAY) and takes no new streams."""

    reason = "closed"

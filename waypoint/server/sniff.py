"""Protocol detection on the first bytes of an inner HBONE stream (sans-IO).

The mesh model carries no port protocol, so the waypoint does what Istio does for an unnamed port: it
looks at what the client sends first. The HTTP/2 connection preface means h2c (prior knowledge, what gRPC
clients and the agents send); a request line ending in `HTTP/1.x` means HTTP/1.1; anything else, or
silence until the detection timeout (a server-first protocol), is plain TCP and forwarded at L4.
"""

from __future__ import annotations

from enum import StrEnum

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
           b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH", b"PURGE")
#: A request line longer than this is not worth waiting for: give up and treat the stream as TCP.
MAX_REQUEST_LINE = 64 * 1024


class Detected(StrEnum):
    HTTP1 = "http1"
    HTTP2 = "http2"
    TCP = "tcp"


def detect(data: bytes) -> Detected | None:
    """What `data` (everything received so far) is, or None when more bytes are needed."""
    if not data:
        return None
    # "P..." could still be the preface or a POST/PUT/PATCH line: decide only once one is ruled out.
    if (data[:1] == b"P" and len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data)
            and not any(m.startswith(data[: len(m)]) and len(data) <= len(m) for m in METHODS)):
        return None
    if data.startswith(H2_PREFACE):
        return Detected.HTTP2
    space = data.find(b" ", 0, 16)
    if space < 0:
        if len(data) >= 16 or not any(m.startswith(data) for m in METHODS):
            return Detected.TCP
        return None
    if data[:space] not in METHODS:
        return Detected.TCP
    end = data.find(b"\r\n")
    if end < 0:
        return Detected.TCP if len(data) > MAX_REQUEST_LINE else None
    line = data[:end]
    if line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
        return Detected.HTTP1
    return Detected.TCP

"""Validation of HBONE CONNECT requests and responses: header lists in, decisions out.

h2's own inbound header validation is switched off on HBONE connections (see ``h2conn``) because it
treats a malformed request as a *connection* error: one bad CONNECT would tear down every tunnel pooled
on that connection. Here the same checks (RFC 9113 §8.2-8.5) become per-stream answers instead: the
caller replies 400 to that stream and the others keep flowing. The status mapping is ztunnel's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.hbone.errors import HeaderError
from mesh.hbone.headers import (
    Authority,
    Baggage,
    Forwarded,
    TraceParent,
    parse_authority,
    parse_baggage,
    parse_forwarded,
    parse_traceparent,
)

Header = tuple[bytes, bytes]

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_SERVICE_UNAVAILABLE = 503

#: Fields that are only meaningful hop-by-hop in HTTP/1 and are malformed in HTTP/2 (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"})
_NAME_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE_RE = re.compile(rb"[\x00\r\n]")
_STATUS_RE = re.compile(rb"^[1-5][0-9][0-9]$")


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A syntactically valid CONNECT: where to, and what the client told about itself."""

    authority: Authority
    forwarded: Forwarded | None
    forwarded_raw: str | None
    baggage: Baggage | None
    traceparent: TraceParent
    traceparent_received: bool
    forwarded_network: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused and with which status; ``reason`` is a metrics/log token."""

    status: int
    reason: str
    message: str


def _check_field(name: bytes, value: bytes) -> None:
    if not _NAME_RE.match(name):
        shown = name[:40].decode("ascii", "replace")
        raise HeaderError(shown or "(empty)", "name is not a lowercase token")
    if _BAD_VALUE_RE.search(value):
        raise HeaderError(name.decode("ascii"), "value contains NUL, CR or LF")
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise HeaderError(name.decode("ascii"), "value has leading or trailing whitespace")


def _split(headers: Iterable[Header], allowed_pseudo: frozenset[bytes]) -> tuple[dict[bytes, bytes],
                                                                             dict[bytes, list[bytes]]]:
    """Pseudo-headers first, each once, only the allowed ones; then well-formed regular fields."""
    pseudo: dict[bytes, bytes] = {}
    regular: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        name, value = bytes(name), bytes(value)
        if name.startswith(b":"):
            shown = name[:40].decode("ascii", "replace")
            if regular:
                raise HeaderError(shown, "pseudo-header after regular header fields")
            if name not in allowed_pseudo:
                raise HeaderError(shown, "pseudo-header is not allowed here")
            if name in pseudo:
                raise HeaderError(shown, "appears twice")
            if _BAD_VALUE_RE.search(value):
                raise HeaderError(shown, "value contains NUL, CR or LF")
            pseudo[name] = value
            continue
        _check_field(name, value)
        if name in CONNECTION_SPECIFIC:
            raise HeaderError(name.decode("ascii"), "is a connection-specific field, forbidden in HTTP/2")
        if name == b"te" and value.lower() != b"trailers":
            raise HeaderError("te", "only 'trailers' is allowed in HTTP/2")
        regular.setdefault(name, []).append(value)
    return pseudo, regular


_REQUEST_PSEUDO = frozenset({b":method", b":authority", b":scheme", b":path", b":protocol"})
_RESPONSE_PSEUDO = frozenset({b":status"})


def _one(regular: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = regular.get(name)
    if not values:
        return None
    return b",".join(values) if name in (b"baggage", b"forwarded") else values[0]


def validate_connect(headers: Iterable[Header], allow_hostname_authority: bool = False) -> ConnectRequest | Rejection:
    """Decide whether a request header block is an acceptable HBONE CONNECT.

    Anything wrong with the request line (method, :authority, stray pseudo-headers, malformed fields)
    is a 400, as ztunnel answers; optional informational headers that do not parse are dropped.
    """
    try:
        pseudo, regular = _split(headers, _REQUEST_PSEUDO)
    except HeaderError as exc:
        return Rejection(STATUS_BAD_REQUEST, "malformed_headers", str(exc))
    method = pseudo.get(b":method")
    if method is None:
        return Rejection(STATUS_BAD_REQUEST, "no_method", "request has no :method")
    if method != b"CONNECT":
        shown = method[:20].decode("ascii", "replace")
        return Rejection(STATUS_BAD_REQUEST, "method", f"method {shown!r} is not CONNECT")
    if b":protocol" in pseudo:
        return Rejection(STATUS_BAD_REQUEST, "extended_connect", "extended CONNECT (:protocol) is not supported")
    if b":scheme" in pseudo or b":path" in pseudo:
        return Rejection(STATUS_BAD_REQUEST, "malformed_headers", "CONNECT must not carry :scheme or :path")
    raw_authority = pseudo.get(b":authority")
    if raw_authority is None:
        return Rejection(STATUS_BAD_REQUEST, "no_authority", "CONNECT has no :authority")
    host = regular.get(b"host")
    if host and (len(host) > 1 or host[0] != raw_authority):
        return Rejection(STATUS_BAD_REQUEST, "malformed_headers", "host differs from :authority")
    try:
        authority = parse_authority(raw_authority, allow_hostname=allow_hostname_authority)
    except HeaderError as exc:
        return Rejection(STATUS_BAD_REQUEST, "bad_authority", str(exc))

    forwarded = baggage = None
    forwarded_raw = None
    raw = _one(regular, b"forwarded")
    if raw is not None:
        forwarded_raw = raw.decode("ascii", "replace")
        try:
            forwarded = parse_forwarded(raw)
        except HeaderError:
            forwarded = None
    raw = _one(regular, b"baggage")
    if raw is not None:
        try:
            baggage = parse_baggage(raw)
        except HeaderError:
            baggage = None
    raw = _one(regular, b"traceparent")
    received = False
    traceparent = None
    if raw is not None:
        try:
            traceparent = parse_traceparent(raw)
            received = True
        except HeaderError:
            traceparent = None
    if traceparent is None:
        traceparent = TraceParent.generate()
    network = _one(regular, b"x-forwarded-network")
    return ConnectRequest(
        authority=authority,
        forwarded=forwarded,
        forwarded_raw=forwarded_raw,
        baggage=baggage,
        traceparent=traceparent,
        traceparent_received=received,
        forwarded_network=network.decode("ascii", "replace") if network is not None else None,
    )


def build_connect_headers(authority: Authority | str, *, forwarded: str | None = None,
                          baggage: Baggage | str | None = None, traceparent: TraceParent | str | None = None,
                          extra: Iterable[tuple[str, str]] = ()) -> list[Header]:
    """The CONNECT header block a client sends, in ztunnel's order."""
    text = str(authority)
    parse_authority(text, allow_hostname=True)  # never send what a server would have to refuse
    out: list[Header] = [(b":method", b"CONNECT"), (b":authority", text.encode("ascii"))]
    if baggage is not None and str(baggage):
        out.append((b"baggage", str(baggage).encode("ascii")))
    if forwarded:
        out.append((b"forwarded", forwarded.encode("ascii")))
    if traceparent is not None:
        out.append((b"traceparent", str(traceparent).encode("ascii")))
    for name, value in extra:
        n, v = name.lower().encode("ascii"), value.encode("ascii")
        _check_field(n, v)
        out.append((n, v))
    return out


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    status: int
    headers: tuple[Header, ...]

    def get(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


def validate_response(headers: Iterable[Header]) -> ConnectResponse:
    """A response header block must carry exactly one three-digit :status; raises HeaderError."""
    pseudo, regular = _split(headers, _RESPONSE_PSEUDO)
    status = pseudo.get(b":status")
    if status is None:
        raise HeaderError(":status", "is missing from the response")
    if not _STATUS_RE.match(status):
        raise HeaderError(":status", f"{status[:10]!r} is not a three-digit status")
    flat = tuple((n, v) for n, values in regular.items() for v in values)
    return ConnectResponse(int(status), flat)


def response_headers(status: int, extra: Iterable[Header] = ()) -> list[Header]:
    if not 100 <= status <= 599:
        raise ValueError(f"status {status} is outside 100..599")
    return [(b":status", str(status).encode("ascii")), *extra]

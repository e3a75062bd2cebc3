"""The HBONE request headers: ``:authority``, ``forwarded``, ``baggage``, ``traceparent``.

Pure parsing and formatting, no I/O. Parsers of what a peer sent are strict and never raise anything but
:class:`HeaderError` (with the header named), because their input is hostile by default. Headers that
only inform (``forwarded``, ``baggage``) degrade to "absent" when malformed instead of failing a tunnel;
``:authority`` decides where bytes go, so a bad one is always a 400.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from mesh.hbone.errors import HeaderError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_AUTHORITY_LENGTH = 262  # "[" + 45-char IPv6 with zone-less text + "]:" + 5 digits, or a DNS name + port
MAX_BAGGAGE_LENGTH = 8192  # W3C baggage: at least 8192 bytes must be supported; we accept no more
MAX_BAGGAGE_MEMBERS = 180
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[a-zA-Z0-9](?:[-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?"
                          r"(?:\.[a-zA-Z0-9](?:[-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*\.?$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-zA-Z]+$")
_BAGGAGE_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def _text(value: bytes | str, header: str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError as exc:
            raise HeaderError(header, "is not ASCII") from exc
    return value


@dataclass(frozen=True, slots=True)
class Authority:
    """Where a tunnel goes: ``ip:port`` normally, ``hostname:port`` only where a policy allows it."""

    host: str
    port: int
    ip: IPAddress | None

    def __str__(self) -> str:
        if self.ip is not None and self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def from_address(cls, ip: str | IPAddress, port: int) -> Authority:
        addr = ipaddress.ip_address(ip)
        _check_port(port, ":authority")
        return cls(str(addr), port, addr)


def _check_port(port: int, header: str) -> int:
    if not 1 <= port <= 65535:
        raise HeaderError(header, f"port {port} is outside 1..65535")
    return port


def parse_authority(value: bytes | str, allow_hostname: bool = False) -> Authority:
    """``1.2.3.4:80`` or ``[2001:db8::1]:80`` (and ``name:80`` when ``allow_hostname``)."""
    text = _text(value, ":authority")
    if not text:
        raise HeaderError(":authority", "is empty")
    if len(text) > MAX_AUTHORITY_LENGTH:
        raise HeaderError(":authority", f"is longer than {MAX_AUTHORITY_LENGTH} characters")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise HeaderError(":authority", f"{text!r} is not [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ip: IPAddress | None = ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise HeaderError(":authority", f"{host!r} is not an IPv6 address") from exc
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise HeaderError(":authority", f"{text!r} has no port (expected ip:port)")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            ip = None
            if ":" in host:
                raise HeaderError(":authority", f"{text!r}: an IPv6 address must be in brackets") from None
            if not allow_hostname:
                raise HeaderError(":authority", f"{host!r} is not an IP address") from None
            if not _HOSTNAME_RE.match(host):
                raise HeaderError(":authority", f"{host!r} is neither an IP address nor a host name") from None
    if not _PORT_RE.match(port_text):
        raise HeaderError(":authority", f"port {port_text!r} is not a number")
    port = _check_port(int(port_text), ":authority")
    return Authority(str(ip) if ip is not None else host.lower(), port, ip)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The first element of a ``forwarded`` header: the original client and, if service-addressed, the host."""

    for_ip: IPAddress | None
    for_port: int | None
    host: str | None

    def __str__(self) -> str:
        return format_forwarded(self.for_ip, self.for_port, self.host) if self.for_ip else ""


def _unquote_value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    if not _TOKEN_RE.match(value):
        raise HeaderError("forwarded", f"value {value!r} is neither a token nor a quoted string")
    return value


def _parse_node(node: str) -> tuple[IPAddress | None, int | None]:
    if node.lower() == "unknown" or node.startswith("_"):
        return None, None
    if node.startswith("["):
        close = node.find("]")
        if close < 0:
            raise HeaderError("forwarded", f"for={node!r} has an unclosed bracket")
        host, rest = node[1:close], node[close + 1 :]
    else:
        host, _, port_text = node.partition(":")
        rest = f":{port_text}" if port_text else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise HeaderError("forwarded", f"for={node!r} is not an IP address") from exc
    if not rest:
        return ip, None
    if not rest.startswith(":") or not _PORT_RE.match(rest[1:]):
        raise HeaderError("forwarded", f"for={node!r} has a bad port")
    return ip, _check_port(int(rest[1:]), "forwarded")


def parse_forwarded(value: bytes | str) -> Forwarded:
    """RFC 7239, first element only (the hop nearest the original client); raises HeaderError."""
    text = _text(value, "forwarded")
    if len(text) > MAX_BAGGAGE_LENGTH:
        raise HeaderError("forwarded", "is too long")
    first = text.split(",", 1)[0].strip()
    if not first:
        raise HeaderError("forwarded", "is empty")
    pairs: dict[str, str] = {}
    for raw in first.split(";"):
        name, sep, val = raw.strip().partition("=")
        if not sep or not name or not _TOKEN_RE.match(name):
            raise HeaderError("forwarded", f"pair {raw.strip()!r} is not name=value")
        key = name.lower()
        if key in pairs:
            raise HeaderError("forwarded", f"parameter {key!r} appears twice")
        pairs[key] = _unquote_value(val.strip())
    for_ip, for_port = _parse_node(pairs["for"]) if "for" in pairs else (None, None)
    host = pairs.get("host")
    if host is not None and not re.match(r"^[a-zA-Z0-9.\-:\[\]]{1,300}$", host):
        raise HeaderError("forwarded", f"host={host!r} is not a host name")
    return Forwarded(for_ip, for_port, host)


def format_forwarded(ip: str | IPAddress | None, port: int | None, host: str | None = None) -> str:
    """``for="1.2.3.4:5678"`` (ztunnel's form), with ``;host=...`` when the target was a service name."""
    if ip is None:
        node = "unknown"
    else:
        addr = ipaddress.ip_address(ip)
        text = f"[{addr}]" if addr.version == 6 else str(addr)
        node = f"{text}:{port}" if port is not None else text
    out = f'for="{node}"'
    if host:
        if not re.match(r"^[a-zA-Z0-9.\-:\[\]]{1,300}$", host):
            raise HeaderError("forwarded", f"host={host!r} is not a host name")
        out += f";host={host}"
    return out


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C ``traceparent``: one per HBONE connection-stream, used to correlate the two ends' logs."""

    trace_id: str
    parent_id: str
    flags: str = "00"
    version: str = "00"

    def __str__(self) -> str:
        return f"{self.version}-{self.trace_id}-{self.parent_id}-{self.flags}"

    @classmethod
    def generate(cls) -> TraceParent:
        while True:
            trace, span = secrets.token_hex(16), secrets.token_hex(8)
            if int(trace, 16) and int(span, 16):
                return cls(trace, span)

    def child(self) -> TraceParent:
        """Same trace, new span: what the server logs as its own span for this tunnel."""
        while True:
            span = secrets.token_hex(8)
            if int(span, 16):
                return TraceParent(self.trace_id, span, self.flags, "00")


def parse_traceparent(value: bytes | str) -> TraceParent:
    """Strict W3C Trace Context level 1 (future versions accepted by their first four fields)."""
    text = _text(value, "traceparent").strip()
    m = _TRACEPARENT_RE.match(text)
    if not m:
        raise HeaderError("traceparent", f"{text[:80]!r} is not version-traceid-parentid-flags in lowercase hex")
    version, trace, parent, flags, extra = m.groups()
    if version == "ff":
        raise HeaderError("traceparent", "version ff is invalid")
    if version == "00" and extra:
        raise HeaderError("traceparent", "version 00 has exactly four fields")
    if not int(trace, 16):
        raise HeaderError("traceparent", "trace id is all zeros")
    if not int(parent, 16):
        raise HeaderError("traceparent", "parent id is all zeros")
    return TraceParent(trace, parent, flags, version)


@dataclass(frozen=True)
class Baggage:
    """W3C baggage members (ztunnel sends ``k8s.*`` / ``service.*`` keys); properties are dropped."""

    members: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_baggage(self.members)

    def get(self, key: str) -> str | None:
        return self.members.get(key)


def parse_baggage(value: bytes | str) -> Baggage:
    text = _text(value, "baggage")
    if len(text) > MAX_BAGGAGE_LENGTH:
        raise HeaderError("baggage", f"is longer than {MAX_BAGGAGE_LENGTH} bytes")
    members: dict[str, str] = {}
    items = [i for i in text.split(",") if i.strip()]
    if len(items) > MAX_BAGGAGE_MEMBERS:
        raise HeaderError("baggage", f"has more than {MAX_BAGGAGE_MEMBERS} members")
    for item in items:
        member = item.split(";", 1)[0].strip()
        key, sep, val = member.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or not _TOKEN_RE.match(key):
            raise HeaderError("baggage", f"member {member[:80]!r} is not key=value")
        if any(c in val for c in ' ",;\\') or any(ord(c) < 0x21 or ord(c) > 0x7E for c in val):
            raise HeaderError("baggage", f"value of {key!r} has characters that must be percent-encoded")
        members[key] = unquote(val, errors="strict") if "%" in val else val
    return Baggage(members)


def format_baggage(members: dict[str, str]) -> str:
    parts = []
    for key, val in members.items():
        if not _TOKEN_RE.match(key):
            raise HeaderError("baggage", f"key {key!r} is not a token")
        parts.append(f"{key}={quote(str(val), safe=_BAGGAGE_SAFE)}")
    out = ",".join(parts)
    if len(out) > MAX_BAGGAGE_LENGTH:
        raise HeaderError("baggage", f"would be longer than {MAX_BAGGAGE_LENGTH} bytes")
    return out


def workload_baggage(*, cluster: str | None = None, namespace: str | None = None, workload: str | None = None,
                     workload_type: str = "deployment", service: str | None = None,
                     revision: str | None = None, region: str | None = None, zone: str | None = None) -> Baggage:
    """The members ztunnel puts in ``baggage`` for a source workload (unset ones are omitted)."""
    if workload_type not in ("deployment", "pod", "job", "cronjob"):
        raise HeaderError("baggage", f"workload_type {workload_type!r} is not deployment|pod|job|cronjob")
    members: dict[str, str] = {}
    for key, val in (("k8s.cluster.name", cluster), ("k8s.namespace.name", namespace),
                     (f"k8s.{workload_type}.name", workload), ("service.name", service),
                     ("service.version", revision), ("cloud.region", region),
                     ("cloud.availability_zone", zone)):
        if val:
            members[key] = val
    return Baggage(members)

"""What the waypoint knows about one downstream connection before the first request on it.

It comes from the HBONE tunnel that carried it: the peer's SPIFFE identity (the original client, proved by
mTLS), the client's address from `forwarded`, and the original destination from the CONNECT authority.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Downstream limits; tests shrink the timers. Each default says which Envoy/Istio default it follows."""

    max_request_headers: int = 60 * 1024  # Envoy max_request_headers_kb 60: larger heads get 431
    request_headers_timeout: float = 10.0  # from a request's first byte to its complete head: else 408
    stream_idle_timeout: float = 300.0  # Envoy's 5 min: a request body that stalls this long gets 408 SI
    idle_timeout: float = 3600.0  # Envoy HCM idle timeout 1h: a connection without requests is closed
    detection_timeout: float = 1.0  # silence this long at the start: the stream is TCP (server-first)
    h2_max_concurrent_streams: int = 1024
    h2_stream_window: int = 1024 * 1024
    h2_connection_window: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("request_headers_timeout", "stream_idle_timeout", "idle_timeout", "detection_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_request_headers < 1024:
            raise ValueError(f"max_request_headers must be at least 1024, got {self.max_request_headers}")


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """One downstream connection (one HBONE CONNECT stream into the waypoint)."""

    peer_identity: str | None  # spiffe://td/ns/x/sa/y of the HBONE peer, None without mTLS (tests)
    source: tuple[str, int] | None  # the original client (forwarded: for=), else the HBONE peer
    destination: tuple[str, int]  # the CONNECT authority: Service VIP (or pod IP) and port
    local: tuple[str, int]  # the waypoint's own HBONE address
    connect_traceparent: str | None = None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def source_ip(self) -> str | None:
        return self.source[0] if self.source else None

    @property
    def destination_text(self) -> str:
        host, port = self.destination
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

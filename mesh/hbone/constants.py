"""Wire constants and default limits of HBONE, shared by the node agent and the waypoint.

The numbers follow ztunnel's defaults so that a pooled connection between our agent and a real ztunnel
behaves the same in both directions (windows, frame size, ping cadence, stream caps).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The well-known HBONE port, inside every pod's network namespace.
HBONE_PORT = 15008
#: ``SO_MARK`` on every socket the mesh itself opens, so the pod's redirection rules skip it.
INPOD_MARK = 0x539
#: The only ALPN protocol HBONE speaks.
ALPN_H2 = "h2"

MIB = 1024 * 1024

#: HTTP/2 stream receive window; smaller than the connection window so one slow stream cannot stall
#: the others (a stream can never use up the whole connection window).
STREAM_WINDOW = 4 * MIB
CONNECTION_WINDOW = 16 * MIB
#: Largest DATA frame we accept (and send when the peer allows it): big frames amortise per-frame costs.
MAX_FRAME_SIZE = 1 * MIB
#: Header list limits: the client only ever receives a short response, the server a short CONNECT.
CLIENT_MAX_HEADER_LIST = 16 * 1024
SERVER_MAX_HEADER_LIST = 64 * 1024
SERVER_MAX_CONCURRENT_STREAMS = 200
#: The pool opens another connection when one carries this many streams (or the peer's lower limit).
POOL_MAX_STREAMS_PER_CONNECTION = 100
#: A pooled connection without streams for this long is closed.
POOL_IDLE_TIMEOUT = 300.0
#: Both ends ping this often; a connection whose ping is unanswered for PING_TIMEOUT is dropped.
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
TLS_HANDSHAKE_TIMEOUT = 10.0
#: From TCP accept (or from the last stream closing on a fresh connection) to a complete CONNECT header
#: block: a client that opens connections and never asks for anything is cut off (slowloris).
CONNECT_HEADER_TIMEOUT = 10.0
#: Dialling a peer's 15008, or the server dialling its upstream.
CONNECT_TIMEOUT = 10.0
#: A server connection that carried streams and then went quiet is closed after this long.
SERVER_IDLE_TIMEOUT = 600.0
#: How long a graceful shutdown waits for in-flight streams after sending GOAWAY.
DRAIN_TIMEOUT = 30.0
#: The TLS 1.3 suites HBONE allows (IANA names, as OpenSSL reports them).
TLS13_CIPHERSUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
#: Most bytes a tunnel buffers for a slow consumer beyond what flow control already bounds.
TUNNEL_WRITE_HIGH_WATER = 1 * MIB
#: Write-buffer high water of the TLS transport before tunnels stop feeding it.
TRANSPORT_HIGH_WATER = 4 * MIB


@dataclass(frozen=True)
class HboneLimits:
    """Every tunable of a connection in one place; tests shrink the timers, production keeps defaults."""

    stream_window: int = STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    max_frame_size: int = MAX_FRAME_SIZE
    max_header_list_size: int = SERVER_MAX_HEADER_LIST
    max_concurrent_streams: int = SERVER_MAX_CONCURRENT_STREAMS
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    connect_header_timeout: float = CONNECT_HEADER_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    idle_timeout: float = SERVER_IDLE_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    transport_high_water: int = TRANSPORT_HIGH_WATER

    def __post_init__(self) -> None:
        if not 65535 <= self.stream_window <= 2**31 - 1:
            raise ValueError(f"stream_window must be within 65535..2^31-1, got {self.stream_window}")
        if not self.stream_window <= self.connection_window <= 2**31 - 1:
            raise ValueError(
                f"connection_window must be >= stream_window and < 2^31, got {self.connection_window}")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError(f"max_frame_size must be within 16384..16777215, got {self.max_frame_size}")
        if self.max_header_list_size < 1024:
            raise ValueError(f"max_header_list_size must be at least 1024, got {self.max_header_list_size}")
        if self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be positive, got {self.max_concurrent_streams}")
        for name in ("ping_interval", "ping_timeout", "tls_handshake_timeout", "connect_header_timeout",
                     "connect_timeout", "idle_timeout", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


SERVER_LIMITS = HboneLimits()
CLIENT_LIMITS = HboneLimits(max_header_list_size=CLIENT_MAX_HEADER_LIST,
                            max_concurrent_streams=POOL_MAX_STREAMS_PER_CONNECTION,
                            idle_timeout=POOL_IDLE_TIMEOUT)

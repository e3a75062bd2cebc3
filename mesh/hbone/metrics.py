"""Counters of the tunnel layer itself (handshakes, streams, protocol errors, bytes).

These are about HBONE health, labelled only by ``direction`` (``inbound`` = server, ``outbound`` =
client) and a reason token; the Istio-compatible ``istio_tcp_*`` series with workload labels belong to
the agent, which gets the peer identity and byte counts of each tunnel through the server and relay APIs.
A registry is injected so tests and several servers in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class HboneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "nodemesh_hbone") -> None:
        reg = registry if registry is not None else REGISTRY
        self.registry = reg
        self.connections_opened = Counter(
            f"{prefix}_connections_opened", "HBONE connections whose TLS handshake and identity check passed",
            ["direction"], registry=reg)
        self.connections_closed = Counter(
            f"{prefix}_connections_closed", "HBONE connections closed, by reason", ["direction", "reason"],
            registry=reg)
        self.handshake_failures = Counter(
            f"{prefix}_handshake_failures", "TLS handshakes or peer identity checks that failed, by reason",
            ["direction", "reason"], registry=reg)
        self.protocol_errors = Counter(
            f"{prefix}_protocol_errors", "HTTP/2 violations and timeouts that ended a connection (GOAWAY)",
            ["direction", "reason"], registry=reg)
        self.streams = Counter(
            f"{prefix}_streams", "CONNECT streams by outcome (HTTP status, or reset)", ["direction", "status"],
            registry=reg)
        self.stream_rejections = Counter(
            f"{prefix}_stream_rejections", "CONNECT requests refused, by reason", ["direction", "reason"],
            registry=reg)
        self.bytes = Counter(
            f"{prefix}_bytes", "Payload bytes relayed between TCP and tunnels (way: to_tunnel, from_tunnel)",
            ["direction", "way"], registry=reg)
        self.active_connections = Gauge(
            f"{prefix}_active_connections", "Open HBONE connections", ["direction"], registry=reg)
        self.active_streams = Gauge(
            f"{prefix}_active_streams", "Open HBONE streams", ["direction"], registry=reg)


_default: HboneMetrics | None = None


def default_metrics() -> HboneMetrics:
    """One set on the global registry for callers that do not inject their own."""
    global _default
    if _default is None:
        _default = HboneMetrics()
    return _default

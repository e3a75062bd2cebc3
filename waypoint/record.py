"""Everything the waypoint observed about one request: the single record that feeds metrics, the access
log and the trace span, so the three can never disagree about a response code or a flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from waypoint.flags import ResponseFlag, render_flags


@dataclass(frozen=True, slots=True)
class Peer:
    """Telemetry labels of one side (Istio's `source_*` / `destination_*`); `unknown` where not known."""

    workload: str = "unknown"
    namespace: str = "unknown"
    principal: str = "unknown"
    app: str = "unknown"
    version: str = "unknown"
    canonical_service: str = "unknown"
    canonical_revision: str = "latest"
    cluster: str = "unknown"


UNKNOWN_PEER = Peer()


@dataclass(slots=True)
class RequestRecord:
    start_time: float  # wall clock, seconds since the epoch
    start: float  # loop clock
    method: str = "-"
    path: str = "-"
    protocol: str = "HTTP/1.1"
    authority: str = "-"
    user_agent: str | None = None
    forwarded_for: str | None = None
    request_id: str | None = None
    response_code: int = 0
    flags: set[ResponseFlag] = field(default_factory=set)
    details: str = "-"
    termination_details: str = "-"
    transport_failure: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    duration_ms: int = 0
    upstream_service_time: str | None = None
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    upstream_local_address: str | None = None
    downstream_local_address: str | None = None
    downstream_remote_address: str | None = None
    route_name: str | None = None
    grpc: bool = False
    grpc_status: str = ""
    source: Peer = UNKNOWN_PEER
    destination: Peer = UNKNOWN_PEER
    destination_service: str = "unknown"
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    mutual_tls: bool = False
    attempts: int = 0
    traceparent: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    sampled: bool = False

    @property
    def flag_text(self) -> str:
        return render_flags(self.flags)

    @property
    def request_protocol(self) -> str:
        return "grpc" if self.grpc else "http"

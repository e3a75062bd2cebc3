"""Istio's standard request metrics as the waypoint reports them (`reporter="waypoint"`).

Names, labels and buckets are Istio's and Envoy's, so existing dashboards and alerts work once they
include `reporter="waypoint"`: one fully labelled series per request, with both the source (the client,
from its HBONE identity and address) and the destination (the endpoint that answered). Label children
are cached per label set: building them is the expensive part of a prometheus_client update.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from waypoint.record import RequestRecord

#: Envoy's default histogram buckets (Istio uses them for every request histogram).
ENVOY_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
                 1800000, 3600000)

LABELS = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)


def label_values(rec: RequestRecord, reporter: str = "waypoint") -> tuple[str, ...]:
    s, d = rec.source, rec.destination
    return (
        reporter,
        s.workload, s.namespace, s.principal, s.app, s.version, s.canonical_service, s.canonical_revision,
        s.cluster,
        d.workload, d.namespace, d.principal, d.app, d.version, rec.destination_service,
        rec.destination_service_name, rec.destination_service_namespace, d.canonical_service,
        d.canonical_revision, d.cluster,
        rec.request_protocol, str(rec.response_code), rec.grpc_status, rec.flag_text,
        "mutual_tls" if rec.mutual_tls else "none",
    )


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("istio_requests", "Requests handled by the waypoint.", LABELS, registry=r)
        self.duration = Histogram("istio_request_duration_milliseconds", "Request duration (ms).", LABELS,
                                  buckets=ENVOY_BUCKETS, registry=r)
        self.request_bytes = Histogram("istio_request_bytes", "Request size (bytes received downstream).", LABELS,
                                       buckets=ENVOY_BUCKETS, registry=r)
        self.response_bytes = Histogram("istio_response_bytes", "Response size (bytes sent downstream).", LABELS,
                                        buckets=ENVOY_BUCKETS, registry=r)
        self.tcp_opened = Counter("istio_tcp_connections_opened", "TCP connections forwarded at L4.", LABELS,
                                  registry=r)
        self.tcp_closed = Counter("istio_tcp_connections_closed", "TCP connections closed.", LABELS, registry=r)
        self.tcp_sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the client (L4).", LABELS, registry=r)
        self.tcp_received = Counter("istio_tcp_received_bytes", "Bytes received from the client (L4).", LABELS,
                                    registry=r)
        self._children: dict[tuple[str, ...], tuple[object, object, object, object]] = {}

    def record(self, rec: RequestRecord) -> None:
        values = label_values(rec)
        children = self._children.get(values)
        if children is None:
            children = (self.requests.labels(*values), self.duration.labels(*values),
                        self.request_bytes.labels(*values), self.response_bytes.labels(*values))
            if len(self._children) < 10000:  # bounded: label sets come from a finite mesh
                self._children[values] = children
        total, duration, req_bytes, resp_bytes = children
        total.inc()  # type: ignore[attr-defined]
        duration.observe(rec.duration_ms)  # type: ignore[attr-defined]
        req_bytes.observe(rec.bytes_received)  # type: ignore[attr-defined]
        resp_bytes.observe(rec.bytes_sent)  # type: ignore[attr-defined]

    def tcp_open(self, rec: RequestRecord) -> None:
        self.tcp_opened.labels(*label_values(rec)).inc()

    def tcp_close(self, rec: RequestRecord, sent: int, received: int) -> None:
        values = label_values(rec)
        self.tcp_closed.labels(*values).inc()
        self.tcp_sent.labels(*values).inc(sent)
        self.tcp_received.labels(*values).inc(received)

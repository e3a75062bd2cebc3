"""The agent's Istio-compatible TCP metrics.

Names and labels are ztunnel's (reference ztunnel.md §6), so the dashboards and alerts users already
have keep working: `istio_tcp_connections_opened_total`, `..._closed_total`, `istio_tcp_sent_bytes_total`,
`istio_tcp_received_bytes_total`, with `reporter` = source|destination and the source/destination workload,
namespace, principal and service labels. Values that are not known are rendered `unknown`, as ztunnel does.

Byte counters follow Istio's convention for both reporters: `received` is what the destination received
from the source (request direction), `sent` is what it sent back (istio/istio#32399).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

UNKNOWN = "unknown"

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


@dataclass
class Peer:
    """What is known of one end of a connection, for labels and logs."""

    workload: str = ""
    namespace: str = ""
    principal: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""
    cluster: str = "Kubernetes"


@dataclass
class ConnLabels:
    """The label set of one connection, filled in as the proxy learns more (e.g. the peer identity)."""

    reporter: str
    source: Peer = field(default_factory=Peer)
    destination: Peer = field(default_factory=Peer)
    service_host: str = ""
    service_namespace: str = ""
    service_name: str = ""
    response_flags: str = "-"
    mtls: bool = False

    def values(self) -> tuple[str, ...]:
        s, d = self.source, self.destination

        def v(x: str) -> str:
            return x or UNKNOWN

        return (
            self.reporter,
            v(s.workload), v(s.canonical_service or s.workload), v(s.canonical_revision or "latest"),
            v(s.namespace), v(s.principal), v(s.app), v(s.version), v(s.cluster),
            v(self.service_host), v(self.service_namespace), v(self.service_name),
            v(d.workload), v(d.canonical_service or d.workload), v(d.canonical_revision or "latest"),
            v(d.namespace), v(d.principal), v(d.app), v(d.version), v(d.cluster),
            "tcp", self.response_flags or "-", "mutual_tls" if self.mtls else UNKNOWN,
        )


class TcpMetrics:
    """One registry per agent, so several agents (or tests) in one process never share counters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r)
        self.failed = Counter("istio_tcp_connections_failed", "TCP connections that failed", TCP_LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the source of the connection", TCP_LABELS,
                            registry=r)
        self.received = Counter("istio_tcp_received_bytes", "Bytes received from the source of the connection",
                                TCP_LABELS, registry=r)
        self.sockets_open = Gauge("istio_tcp_sockets_open", "Open proxied sockets", ["reporter"], registry=r)
        self.build = Info("istio_build", "Build information", registry=r)
        self.build.info({"component": "ztunnel", "tag": "nodemesh-0.1.0"})

    def open(self, labels: ConnLabels) -> None:
        self.opened.labels(*labels.values()).inc()
        self.sockets_open.labels(labels.reporter).inc()

    def close(self, labels: ConnLabels, received: int, sent: int, failed: bool = False) -> None:
        """Count a finished connection: `received` from the source, `sent` back to it."""
        values = labels.values()
        self.closed.labels(*values).inc()
        if failed:
            self.failed.labels(*values).inc()
        if received:
            self.received.labels(*values).inc(received)
        if sent:
            self.sent.labels(*values).inc(sent)
        self.sockets_open.labels(labels.reporter).dec()

    def refused(self, labels: ConnLabels) -> None:
        """A connection refused before any byte moved (policy denial, no upstream): opened, closed, failed."""
        values = labels.values()
        self.opened.labels(*values).inc()
        self.closed.labels(*values).inc()
        self.failed.labels(*values).inc()

"""The CA's Prometheus metrics, on a registry of its own so several CAs can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class CAMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.issued = Counter(
            "nodemesh_ca_certificates_issued", "Workload certificates signed.", ["node"], registry=self.registry
        )
        self.denied = Counter(
            "nodemesh_ca_certificates_denied",
            "Signing requests refused, by reason (not_on_node, malformed_csr, san_count, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.intermediate_expiry = Gauge(
            "nodemesh_ca_intermediate_expiry_timestamp_seconds",
            "When the signing intermediate certificate expires (Unix time).",
            registry=self.registry,
        )

    def issued_count(self) -> float:
        return sum(s.value for m in self.issued.collect() for s in m.samples if s.name.endswith("_total"))

    def denied_count(self, reason: str | None = None) -> float:
        return sum(
            s.value
            for m in self.denied.collect()
            for s in m.samples
            if s.name.endswith("_total") and (reason is None or s.labels.get("reason") == reason)
        )

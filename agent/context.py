"""What every pod proxy of one agent shares: config, certificates, policy, metrics, logs, LB state.

A plain holder so the per-pod code takes one argument and tests can build one with real parts (a CA in
memory, a store fed by a local config) without running a whole agent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from agent.accesslog import AccessLog
from agent.lb import EndpointStats
from agent.metrics import Peer, TcpMetrics
from mesh.certmanager import CertificateManager
from mesh.config import ConfigStore, Workload
from mesh.identity import SpiffeId, TrustBundle

log = logging.getLogger("nodemesh.agent")


@dataclass
class AgentContext:
    node: str
    store: ConfigStore
    certs: CertificateManager
    bundle: TrustBundle
    trust_domain: str = "cluster.local"
    metrics: TcpMetrics = field(default_factory=TcpMetrics)
    access_log: AccessLog = field(default_factory=AccessLog)
    endpoints: EndpointStats = field(default_factory=EndpointStats)
    connect_timeout: float = 10.0


def peer_of(w: Workload | None, principal: str = "") -> Peer:
    """Metric/log labels of a workload (or only a principal, for a peer the config does not know)."""
    if w is None:
        return Peer(principal=principal)
    return Peer(
        workload=w.workload_name or w.name,
        namespace=w.namespace,
        principal=principal,
        canonical_service=w.canonical_name or w.labels.get("app", "") or w.name,
        canonical_revision=w.canonical_revision or w.labels.get("version", ""),
        app=w.labels.get("app", ""),
        version=w.labels.get("version", ""),
        cluster=w.cluster_id or "Kubernetes",
    )


def spiffe_of(w: Workload) -> SpiffeId:
    return SpiffeId.parse(w.identity)

"""Metrics, access log and endpoint choice: what operators and dashboards see of the agent."""

from __future__ import annotations

import json
import logging
import random

import pytest
from prometheus_client import generate_latest

from agent.accesslog import AccessLog, AccessRecord
from agent.lb import EndpointStats, pick
from agent.metrics import TCP_LABELS, ConnLabels, Peer, TcpMetrics


def sample(m: TcpMetrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return v or 0.0


def test_metric_names_and_istio_label_set():
    m = TcpMetrics()
    labels = ConnLabels(
        reporter="destination",
        source=Peer(workload="client", namespace="default", principal="spiffe://cluster.local/ns/default/sa/sleep"),
        destination=Peer(workload="server", namespace="default",
                         principal="spiffe://cluster.local/ns/default/sa/httpbin"),
        service_host="server.default.svc.cluster.local", service_namespace="default", service_name="server",
        mtls=True,
    )
    m.open(labels)
    m.close(labels, received=100, sent=250)
    text = generate_latest(m.registry).decode()
    for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                 "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"):
        assert name in text
    want = dict(zip(TCP_LABELS, labels.values(), strict=True))
    assert want["connection_security_policy"] == "mutual_tls"
    assert want["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert want["source_app"] == "unknown"  # unknown values are rendered `unknown`, as ztunnel does
    assert sample(m, "istio_tcp_connections_opened_total", **want) == 1
    assert sample(m, "istio_tcp_received_bytes_total", **want) == 100
    assert sample(m, "istio_tcp_sent_bytes_total", **want) == 250
    assert sample(m, "istio_tcp_sockets_open", reporter="destination") == 0


def test_a_refused_connection_is_counted_with_its_flag():
    m = TcpMetrics()
    labels = ConnLabels(reporter="destination", response_flags="DENY")
    m.refused(labels)
    want = dict(zip(TCP_LABELS, labels.values(), strict=True))
    assert want["response_flags"] == "DENY" and want["connection_security_policy"] == "unknown"
    assert sample(m, "istio_tcp_connections_opened_total", **want) == 1
    assert sample(m, "istio_tcp_connections_closed_total", **want) == 1
    assert sample(m, "istio_tcp_connections_failed_total", **want) == 1


def test_two_agents_in_one_process_do_not_share_counters():
    a, b = TcpMetrics(), TcpMetrics()
    a.open(ConnLabels(reporter="source"))
    assert sample(b, "istio_tcp_sockets_open", reporter="source") == 0


def test_access_log_text_has_ztunnel_fields_in_order(caplog):
    rec = AccessRecord(direction="inbound", src_addr="10.244.1.2:5000", dst_addr="10.244.2.2:8080",
                       src_workload="client", src_namespace="default",
                       src_identity="spiffe://cluster.local/ns/default/sa/sleep",
                       dst_hbone_addr="10.244.2.2:8080", dst_workload="server", dst_namespace="default",
                       dst_identity="spiffe://cluster.local/ns/default/sa/httpbin", bytes_sent=5, bytes_recv=7)
    line = AccessLog("text").format(rec)
    keys = [part.split("=")[0] for part in line.removeprefix("connection complete ").split(" ")]
    assert keys == ["src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr", "dst.hbone_addr",
                    "dst.workload", "dst.namespace", "dst.identity", "direction", "bytes_sent", "bytes_recv",
                    "duration"]
    assert 'src.identity="spiffe://cluster.local/ns/default/sa/sleep"' in line
    with caplog.at_level(logging.INFO, logger="access"):
        AccessLog("text").write(AccessRecord(direction="outbound", src_addr="a", dst_addr="b", error="denied"))
    assert caplog.records[-1].levelno == logging.ERROR and 'error="denied"' in caplog.records[-1].getMessage()


def test_access_log_json_is_one_object_per_line():
    rec = AccessRecord(direction="outbound", src_addr="1.2.3.4:1", dst_addr="5.6.7.8:80", bytes_sent=1)
    obj = json.loads(AccessLog("json").format(rec))
    assert obj["direction"] == "outbound" and obj["bytes_sent"] == 1 and "src.identity" not in obj
    with pytest.raises(ValueError, match="text' or 'json"):
        AccessLog("xml")


def test_power_of_two_never_picks_the_busier_of_the_two_drawn():
    stats = EndpointStats()
    for _ in range(5):
        stats.acquire("busy")
    rng = random.Random(7)
    picks = [pick(["busy", "idle"], stats, rng=rng) for _ in range(200)]
    assert set(picks) == {"idle"}


def test_power_of_two_spreads_over_equal_endpoints():
    stats = EndpointStats()
    rng = random.Random(1)
    counts = {k: 0 for k in "abcd"}
    for _ in range(400):
        k = pick(list(counts), stats, rng=rng)
        counts[k] += 1
        stats.acquire(k)  # connections stay open: least-connections keeps the spread even
    # P2C keeps the gap small (pure random choice over 400 draws typically leaves it near 20).
    assert max(counts.values()) - min(counts.values()) <= 4


def test_failed_endpoints_are_skipped_until_their_penalty_ends():
    now = [0.0]
    stats = EndpointStats(clock=lambda: now[0], penalty_s=5)
    stats.mark_failed("dead")
    rng = random.Random(3)
    assert {pick(["dead", "ok"], stats, rng=rng) for _ in range(50)} == {"ok"}
    # With nothing else left the penalised one is still tried rather than failing outright.
    assert pick(["dead"], stats, rng=rng) == "dead"
    assert pick(["dead", "ok"], stats, exclude={"ok"}, rng=rng) == "dead"
    now[0] = 6
    assert "dead" in {pick(["dead", "ok"], stats, rng=rng) for _ in range(50)}
    assert pick([], stats) is None

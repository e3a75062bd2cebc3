"""The agent's certificate manager: renewal schedule (sans-IO), and rotation against a real CA over mTLS."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta

import pytest

from mesh.ca import CertificateAuthority
from mesh.ca.client import CAClient
from mesh.ca.placement import MemoryPlacement
from mesh.ca.server import CAServer
from mesh.certmanager import CertificateManager, CertUnavailable
from mesh.identity import SpiffeId
from mesh.identity.rotation import IdentitySlot, backoff_delay

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
HTTPBIN = SpiffeId(TD, "default", "httpbin")
NOT_HERE = SpiffeId(TD, "prod", "billing")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


# ---- sans-IO schedule ----------------------------------------------------------------------------------


def test_backoff_starts_at_half_a_second_doubles_and_caps_at_150():
    assert [backoff_delay(n) for n in range(1, 11)] == [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150]
    assert backoff_delay(1000) == 150
    assert backoff_delay(0) == 0


def test_slot_renews_at_half_life(ca):
    cert = ca.issue_workload(SLEEP, ttl=timedelta(hours=24))
    slot = IdentitySlot(SLEEP)
    delay = slot.on_success(cert, cert.not_before)
    assert delay == pytest.approx(12 * 3600)
    assert slot.usable(cert.not_before + timedelta(hours=13)) is cert


def test_slot_keeps_old_certificate_through_failures_until_expiry(ca):
    cert = ca.issue_workload(SLEEP, ttl=timedelta(seconds=100))
    slot = IdentitySlot(SLEEP)
    slot.on_success(cert, cert.not_before)
    at = cert.refresh_at
    delays = []
    for _ in range(4):
        delays.append(slot.on_failure("CA unreachable", at))
        assert slot.usable(at) is cert  # still valid: still served
        at += timedelta(seconds=delays[-1])
    assert delays == [0.5, 1, 2, 4]
    # Near expiry the wait is cut so expiry is noticed on time.
    near_end = cert.not_after - timedelta(seconds=3)
    assert slot.on_failure("CA unreachable", near_end) == pytest.approx(3)
    after = cert.not_after + timedelta(seconds=1)
    slot.on_failure("CA unreachable", after)
    assert slot.cert is None and slot.usable(after) is None
    assert slot.last_error == "CA unreachable"
    new = ca.issue_workload(SLEEP, ttl=timedelta(seconds=100))
    slot.on_success(new, new.not_before)
    assert slot.failures == 0 and slot.usable(new.not_before) is new


# ---- against the real CA -----------------------------------------------------------------------------


async def _start(ca, ttl, port=0):
    srv = CAServer(ca, MemoryPlacement({"node-a": [SLEEP, HTTPBIN]}), ttl=ttl)
    await srv.start("127.0.0.1", port)
    return srv


@pytest.fixture
async def short_lived(ca):
    """A CA serving 6-second certificates, a node-a client and a manager fetching through it."""
    srv = await _start(ca, ttl=6)
    client = CAClient(f"https://127.0.0.1:{srv.port}", ca.issue_node("node-a"), timeout=5)
    manager = CertificateManager(client.fetch)
    try:
        yield srv, client, manager
    finally:
        await manager.aclose()
        await client.aclose()
        await srv.stop()


async def _wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(step)
    return predicate()


async def test_rotation_renews_before_expiry_with_no_gap(short_lived):
    _, _, manager = short_lived
    first = await manager.get(SLEEP, timeout=10)
    seen = {first.serial_number: first}
    gaps = []
    # Sample for at least two renewal periods (half of 6 s each), bounded in count and time.
    deadline = time.monotonic() + 30
    while len(seen) < 3 and time.monotonic() < deadline:
        cert = manager.current(SLEEP)
        if cert is None or not cert.is_valid():
            gaps.append(time.monotonic())
        else:
            seen.setdefault(cert.serial_number, cert)
        await asyncio.sleep(0.05)
    assert not gaps, "an identity was without a valid certificate during rotation"
    assert len(seen) >= 3, "the certificate was not renewed twice"
    certs = sorted(seen.values(), key=lambda c: c.not_before)
    for older, newer in itertools.pairwise(certs):
        assert newer.not_before < older.not_after  # each successor existed before its predecessor expired
    gauge = manager.registry.get_sample_value("nodemesh_identity_cert_expiry_timestamp_seconds",
                                              {"identity": str(SLEEP)})
    assert gauge == pytest.approx(manager.current(SLEEP).not_after.timestamp())


async def test_ca_outage_survived_while_old_cert_valid_and_recovered(ca):
    srv = await _start(ca, ttl=8)
    port = srv.port
    client = CAClient(f"https://127.0.0.1:{port}", ca.issue_node("node-a"), timeout=2)
    manager = CertificateManager(client.fetch)
    try:
        first = await manager.get(SLEEP, timeout=10)
        await srv.stop()  # outage before the renewal at half-life (4 s)
        failed = await _wait_for(
            lambda: (manager.registry.get_sample_value("nodemesh_identity_cert_fetches_total",
                                                       {"result": "failure"}) or 0) >= 2, 15)
        assert failed, "renewal was never attempted during the outage"
        held = manager.current(SLEEP)
        assert held is not None and held.serial_number == first.serial_number and held.is_valid()
        assert (await manager.get(SLEEP, timeout=5)).serial_number == first.serial_number
        srv = await _start(ca, ttl=8, port=port)  # the CA comes back
        renewed = await _wait_for(
            lambda: (c := manager.current(SLEEP)) is not None and c.serial_number != first.serial_number, 20)
        assert renewed, "no new certificate after the CA came back"
        assert manager.current(SLEEP).is_valid()
    finally:
        await manager.aclose()
        await client.aclose()
        await srv.stop()


async def test_outage_past_expiry_drops_the_cert_then_recovers(ca):
    srv = await _start(ca, ttl=2)
    port = srv.port
    client = CAClient(f"https://127.0.0.1:{port}", ca.issue_node("node-a"), timeout=2)
    manager = CertificateManager(client.fetch, max_backoff=1.0)
    try:
        first = await manager.get(SLEEP, timeout=10)
        await srv.stop()
        assert await _wait_for(lambda: manager.current(SLEEP) is None, 15), "an expired certificate was still served"
        assert manager.registry.get_sample_value("nodemesh_identity_cert_expiry_timestamp_seconds",
                                                 {"identity": str(SLEEP)}) is None
        with pytest.raises(CertUnavailable) as err:
            await manager.get(SLEEP, timeout=10)
        assert "unreachable" in str(err.value)
        srv = await _start(ca, ttl=30, port=port)
        again = await manager.get(SLEEP, timeout=15)
        assert again.serial_number != first.serial_number and again.is_valid()
    finally:
        await manager.aclose()
        await client.aclose()
        await srv.stop()


async def test_get_reports_the_ca_denial(short_lived):
    _, _, manager = short_lived
    with pytest.raises(CertUnavailable) as err:
        await manager.get(NOT_HERE, timeout=10)
    assert "not_on_node" in err.value.reason
    assert err.value.identity == NOT_HERE


async def test_concurrent_gets_share_one_fetch(ca):
    calls = []

    async def fetch(identity):
        calls.append(identity)
        await asyncio.sleep(0.05)
        return ca.issue_workload(identity, ttl=60)

    async with CertificateManager(fetch) as manager:
        certs = await asyncio.gather(*(manager.get(SLEEP, timeout=10) for _ in range(20)))
    assert len({c.serial_number for c in certs}) == 1
    assert calls == [SLEEP]


async def test_connection_need_jumps_the_background_queue(ca):
    """Background fetches wait their turn; a connection's need for an identity is served at once."""
    gate = asyncio.Event()
    started = []

    async def fetch(identity):
        started.append(identity)
        if identity.namespace == "slow":
            await gate.wait()
        return ca.issue_workload(identity, ttl=60)

    manager = CertificateManager(fetch, background_concurrency=1)
    try:
        for i in range(3):
            manager.track(SpiffeId(TD, "slow", f"sa-{i}"))
        await _wait_for(lambda: len(started) >= 1, 5)
        cert = await manager.get(SLEEP, timeout=10)  # while the one background slot is stuck
        assert cert.identity == SLEEP
        assert sum(1 for s in started if s.namespace == "slow") == 1  # the queue did not move
        gate.set()
        done = await _wait_for(lambda: all(manager.current(SpiffeId(TD, "slow", f"sa-{i}")) for i in range(3)), 10)
        assert done
    finally:
        gate.set()
        await manager.aclose()


async def test_tracked_identity_is_fetched_in_background_and_untrack_forgets_it(ca):
    async def fetch(identity):
        return ca.issue_workload(identity, ttl=60)

    async with CertificateManager(fetch) as manager:
        manager.track(HTTPBIN)
        assert await _wait_for(lambda: manager.current(HTTPBIN), 10)
        assert manager.registry.get_sample_value("nodemesh_identity_cert_expiry_timestamp_seconds",
                                                 {"identity": str(HTTPBIN)}) is not None
        manager.untrack(HTTPBIN)
        assert manager.current(HTTPBIN) is None and manager.tracked() == set()
        assert manager.registry.get_sample_value("nodemesh_identity_cert_expiry_timestamp_seconds",
                                                 {"identity": str(HTTPBIN)}) is None


async def test_fetcher_returning_the_wrong_identity_is_not_served(ca):
    async def fetch(identity):
        return ca.issue_workload(HTTPBIN, ttl=60)  # a confused fetcher

    async with CertificateManager(fetch) as manager:
        with pytest.raises(CertUnavailable):
            await manager.get(SLEEP, timeout=10)
        assert manager.current(SLEEP) is None

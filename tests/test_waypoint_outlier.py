"""Outlier detection with an injected clock: ejection, its growing duration, the max-ejection cap,
automatic return; and that a balancer never picks an ejected host."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.lb import Endpoint, LbContext, LeastRequest, RoundRobin
from waypoint.resilience.outlier import OutlierConfig, OutlierDetector, Result
from waypoint.resilience.retry import PerTryTimeout, ResetReason, UpstreamReset, UpstreamResponse


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(hosts, **cfg):
    clock = Clock()
    d = OutlierDetector(OutlierConfig(**cfg), clock)
    d.set_hosts(hosts)
    return d, clock


HOSTS = [f"10.0.0.{i}:80" for i in range(10)]


def test_five_consecutive_5xx_eject_and_a_success_resets_the_count():
    d, _ = detector(HOSTS)
    for _ in range(4):
        d.record_response(HOSTS[0], 500)
    d.record_response(HOSTS[0], 200)
    for _ in range(4):
        assert d.record_response(HOSTS[0], 503) is None
    ejection = d.record_response(HOSTS[0], 503)
    assert ejection is not None and ejection.duration == 30.0 and ejection.reason == "consecutive_5xx"
    assert d.is_ejected(HOSTS[0]) and d.ejected() == {HOSTS[0]}


def test_ejected_host_returns_when_its_time_is_up_and_the_next_ejection_is_longer():
    d, clock = detector(HOSTS, base_ejection_time=30.0)
    for _ in range(5):
        d.record_response(HOSTS[1], 502)
    clock.now += 29.9
    assert d.is_ejected(HOSTS[1])
    clock.now += 0.1
    assert not d.is_ejected(HOSTS[1])
    for _ in range(5):
        d.record_response(HOSTS[1], 502)
    assert d.ejection_ends(HOSTS[1]) == clock.now + 60.0  # base x times ejected in a row


def test_healthy_sweeps_lower_the_multiplier():
    d, clock = detector(HOSTS, base_ejection_time=10.0, interval=5.0)
    for _ in range(5):
        d.record_response(HOSTS[2], 500)
    clock.now += 10.0
    d.tick()
    assert d.multiplier(HOSTS[2]) == 1
    clock.now += 5.0
    d.tick()
    assert d.multiplier(HOSTS[2]) == 0
    for _ in range(5):
        d.record_response(HOSTS[2], 500)
    assert d.ejection_ends(HOSTS[2]) == clock.now + 10.0


def test_ejection_time_is_capped_by_max_ejection_time():
    d, clock = detector(HOSTS, base_ejection_time=100.0, max_ejection_time=250.0)
    durations = []
    for _ in range(5):
        for _ in range(5):
            ev = d.record_response(HOSTS[3], 500)
        durations.append(ev.duration)
        clock.now += ev.duration
    assert durations == [100.0, 200.0, 250.0, 250.0, 250.0]


def test_gateway_errors_eject_when_configured_and_local_failures_count_in_default_mode():
    d, _ = detector(HOSTS, consecutive_gateway_errors=2, consecutive_5xx=0)
    d.record_outcome(HOSTS[4], UpstreamReset(ResetReason.REMOTE_CONNECTION_FAILURE))
    assert d.record_outcome(HOSTS[4], PerTryTimeout()) is not None  # 503 then 504
    d2, _ = detector(HOSTS, consecutive_gateway_errors=2, consecutive_5xx=0)
    d2.record_response(HOSTS[4], 500)
    assert d2.record_response(HOSTS[4], 500) is None  # 500 is not a gateway error


def test_split_mode_counts_local_origin_failures_separately():
    d, _ = detector(HOSTS, split_external_local_origin_errors=True, consecutive_local_origin_failures=2)
    d.record_local(HOSTS[5], Result.LOCAL_CONNECT_FAILED)
    d.record_local(HOSTS[5], Result.SUCCESS)
    d.record_local(HOSTS[5], Result.LOCAL_CONNECT_FAILED)
    assert d.record_local(HOSTS[5], Result.LOCAL_TIMEOUT).reason == "consecutive_local_origin_failure"


def test_default_ten_percent_never_ejects_from_a_small_cluster():
    d, _ = detector(HOSTS[:3])
    for _ in range(50):
        d.record_response(HOSTS[0], 500)
    assert d.ejected() == set() and d.overflowed > 0


def test_panic_threshold_balances_across_all_when_too_few_are_healthy():
    d, _ = detector(HOSTS[:2], max_ejection_percent=100.0, min_health_percent=60.0)
    for _ in range(5):
        d.record_response(HOSTS[0], 500)
    assert d.healthy(HOSTS[:2]) == HOSTS[:2]


events = st.lists(
    st.tuples(st.integers(0, 9), st.sampled_from([200, 500, 502, 503, 504]), st.floats(0, 20)),
    min_size=1, max_size=300,
)


@settings(max_examples=120, deadline=None)
@given(events, st.sampled_from([10.0, 20.0, 34.0, 50.0, 100.0]), st.integers(0, 2**32))
def test_max_ejection_percent_is_never_exceeded_and_ejected_hosts_are_never_picked(evs, max_pct, seed):
    d, clock = detector(HOSTS, max_ejection_percent=max_pct, consecutive_5xx=2, consecutive_gateway_errors=2,
                        base_ejection_time=15.0)
    endpoints = [Endpoint(h) for h in HOSTS]
    rng = random.Random(seed)
    balancers = [LeastRequest(rng), RoundRobin(rng)]
    for host_idx, status, advance in evs:
        clock.now += advance
        d.record_response(HOSTS[host_idx], status)
        ejected = d.ejected()
        assert 100.0 * len(ejected) / len(HOSTS) <= max_pct
        healthy = [e for e in endpoints if e.address not in ejected]
        for lb in balancers:
            chosen = lb.choose(healthy, LbContext())
            assert chosen is not None and chosen.address not in ejected
            ends = d.ejection_ends(chosen.address)
            assert ends is None


def test_an_ejected_endpoint_receives_nothing_until_its_ejection_ends():
    d, clock = detector(HOSTS[:4], max_ejection_percent=50.0, base_ejection_time=30.0)
    endpoints = [Endpoint(h) for h in HOSTS[:4]]
    lb = RoundRobin(random.Random(4))
    for _ in range(5):
        d.record_outcome(HOSTS[0], UpstreamResponse(503))
    picks_during = []
    for _ in range(300):
        clock.now += 0.09  # 27s: still inside the 30s ejection
        healthy = [e for e in endpoints if not d.is_ejected(e.address)]
        picks_during.append(lb.choose(healthy, LbContext()).address)
    assert HOSTS[0] not in picks_during
    clock.now += 3.0
    healthy = [e for e in endpoints if not d.is_ejected(e.address)]
    assert HOSTS[0] in {lb.choose(healthy, LbContext()).address for _ in range(8)}

"""Circuit breaking: overflow answers 503 UO with x-envoy-overloaded, permits come back exactly once."""

from __future__ import annotations

import yaml

from waypoint.config import ConfigStore
from waypoint.flags import LocalReply, ResponseFlag
from waypoint.resilience.circuit import UNLIMITED, CircuitBreaker, Permit, Resource
from waypoint.resilience.retry import RetryPolicy, RetryState, UpstreamResponse


def breaker_from_dr(pool: str) -> CircuitBreaker:
    store = ConfigStore()
    result = store.apply(yaml.safe_load(f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin, namespace: default}}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool: {pool}
"""))
    assert result.accepted, result.message
    policy = store.snapshot().cluster_policy("httpbin.default.svc.cluster.local", 8000)
    return CircuitBreaker(policy.thresholds)


def test_overflow_gives_503_uo_with_overloaded_header():
    cb = breaker_from_dr("{tcp: {maxConnections: 1}, http: {http2MaxRequests: 2, http1MaxPendingRequests: 1}}")
    first, second = cb.admit_request(), cb.admit_request()
    assert isinstance(first, Permit) and isinstance(second, Permit)
    third = cb.admit_request()
    assert isinstance(third, LocalReply)
    assert third.status == 503 and ResponseFlag.UPSTREAM_OVERFLOW in third.flags
    assert ("x-envoy-overloaded", "true") in third.headers
    assert third.body.endswith(b"reset reason: overflow")
    assert cb.overflows["upstream_rq_pending_overflow"] == 1
    first.release()
    first.release()  # releasing twice gives back one slot only
    assert cb.in_use(Resource.REQUESTS) == 1
    assert isinstance(cb.admit_request(), Permit)
    assert isinstance(cb.admit_request(), LocalReply)


def test_pending_and_connection_limits():
    cb = breaker_from_dr("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}")
    conn = cb.try_acquire(Resource.CONNECTIONS)
    assert conn is not None and cb.try_acquire(Resource.CONNECTIONS) is None
    assert cb.overflows["upstream_cx_overflow"] == 1
    with cb.admit_pending() as waiting:
        assert isinstance(waiting, Permit)
        assert isinstance(cb.admit_pending(), LocalReply)
    assert cb.in_use(Resource.PENDING_REQUESTS) == 0


def test_istio_defaults_never_overflow():
    cb = CircuitBreaker()
    assert cb.limit(Resource.REQUESTS) == UNLIMITED
    permits = [cb.admit_request() for _ in range(10_000)]
    assert all(isinstance(p, Permit) for p in permits)


def test_max_retries_caps_concurrent_retries_and_marks_uo():
    cb = breaker_from_dr("{http: {maxRetries: 1}}")
    held = []

    def admit() -> bool:
        permit = cb.admit_retry()
        if permit is not None:
            held.append(permit)
        return permit is not None

    first = RetryState(RetryPolicy(num_retries=3, retry_on=frozenset({"5xx"})), now=0.0)
    first.begin_attempt(0.0)
    assert not hasattr(first.on_outcome(UpstreamResponse(503), 0.0, admit_retry=admit), "response")
    second = RetryState(RetryPolicy(num_retries=3, retry_on=frozenset({"5xx"})), now=0.0)
    second.begin_attempt(0.0)
    done = second.on_outcome(UpstreamResponse(503), 0.0, admit_retry=admit)
    assert done.response.status == 503 and ResponseFlag.UPSTREAM_OVERFLOW in done.flags
    assert cb.overflows["upstream_rq_retry_overflow"] == 1


def test_max_requests_per_connection():
    cb = breaker_from_dr("{http: {maxRequestsPerConnection: 1}}")
    assert cb.connection_reusable(0) and not cb.connection_reusable(1)
    assert CircuitBreaker().connection_reusable(10**6)

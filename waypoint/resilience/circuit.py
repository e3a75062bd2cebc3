"""Circuit breaking: per-cluster resource counters with Envoy's overflow behaviour.

Envoy keeps, per upstream cluster and per proxy (not coordinated across waypoint replicas), four gauges
with a ceiling each: connections, pending requests (waiting for a connection), active requests and
active retries. A request that would push requests or pending requests over the ceiling is not queued:
it is answered at once with 503, flag UO and `x-envoy-overloaded: true`, which tells clients that the
mesh shed the load rather than the service failing. Istio writes 2^32-1 for every ceiling unless the
DestinationRule sets one, so by default nothing ever overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from waypoint.flags import LocalReply, overflow

UNLIMITED = 2**32 - 1


@dataclass(frozen=True)
class CircuitBreakerThresholds:
    """DestinationRule `connectionPool` ceilings (Istio defaults: effectively unlimited)."""

    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0: unlimited; 1 disables keep-alive
    max_concurrent_streams: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending_requests", "max_requests", "max_retries",
                     "max_requests_per_connection"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


class Resource(StrEnum):
    CONNECTIONS = "connections"
    PENDING_REQUESTS = "pending_requests"
    REQUESTS = "requests"
    RETRIES = "retries"


# Envoy's overflow counters, named as in `upstream_rq_pending_overflow` etc.
_OVERFLOW_STAT = {
    Resource.CONNECTIONS: "upstream_cx_overflow",
    Resource.PENDING_REQUESTS: "upstream_rq_pending_overflow",
    Resource.REQUESTS: "upstream_rq_pending_overflow",
    Resource.RETRIES: "upstream_rq_retry_overflow",
}


class Permit:
    """One unit of a resource held; `release()` gives it back, exactly once however often it is called."""

    __slots__ = ("_breaker", "_released", "resource")

    def __init__(self, breaker: CircuitBreaker, resource: Resource) -> None:
        self._breaker = breaker
        self.resource = resource
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._breaker._in_use[self.resource] -= 1

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CircuitBreaker:
    """The counters of one upstream cluster. Not thread-safe: one event loop owns it."""

    def __init__(self, thresholds: CircuitBreakerThresholds | None = None) -> None:
        self.thresholds = thresholds or CircuitBreakerThresholds()
        self._in_use = dict.fromkeys(Resource, 0)
        self.overflows = dict.fromkeys(_OVERFLOW_STAT.values(), 0)

    def limit(self, resource: Resource) -> int:
        t = self.thresholds
        return {
            Resource.CONNECTIONS: t.max_connections,
            Resource.PENDING_REQUESTS: t.max_pending_requests,
            Resource.REQUESTS: t.max_requests,
            Resource.RETRIES: t.max_retries,
        }[resource]

    def in_use(self, resource: Resource) -> int:
        return self._in_use[resource]

    def can_create(self, resource: Resource) -> bool:
        return self._in_use[resource] < self.limit(resource)

    def try_acquire(self, resource: Resource) -> Permit | None:
        """A permit, or None (and the overflow counted) when the resource is at its ceiling."""
        if not self.can_create(resource):
            self.overflows[_OVERFLOW_STAT[resource]] += 1
            return None
        self._in_use[resource] += 1
        return Permit(self, resource)

    def admit_request(self) -> Permit | LocalReply:
        """Admission of a request to this cluster: a REQUESTS permit, or the 503 UO overflow reply."""
        permit = self.try_acquire(Resource.REQUESTS)
        return permit if permit is not None else overflow()

    def admit_pending(self) -> Permit | LocalReply:
        """A request that must wait for a connection: a PENDING_REQUESTS permit, or 503 UO."""
        permit = self.try_acquire(Resource.PENDING_REQUESTS)
        return permit if permit is not None else overflow()

    def admit_retry(self) -> Permit | None:
        """For `RetryState.on_outcome(admit_retry=...)`: hold the permit for the retry's duration."""
        return self.try_acquire(Resource.RETRIES)

    def connection_reusable(self, requests_served: int) -> bool:
        """Whether a connection that served this many requests may take another (maxRequestsPerConnection)."""
        limit = self.thresholds.max_requests_per_connection
        return limit == 0 or requests_served < limit

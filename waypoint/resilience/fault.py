"""Fault injection decisions (Istio `fault`, Envoy's fault filter), sampled per request.

Users test their resilience with these, so the sampling must be what Envoy does: delay and abort are
drawn independently for every request, with the percentage as a fraction of a million (Istio encodes
`percentage.value` as numerator value*10000 over MILLION); an absent percentage injects nothing (the
documentation once said otherwise and was corrected); the delay comes first and the abort is checked
after it. An abort is a local reply, body `fault filter abort`, flag FI, and is not retried at this hop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from waypoint.flags import FAULT_ABORT_BODY, LocalReply, ResponseFlag

MILLION = 1_000_000


def percent_to_millionths(percent: float) -> int:
    """Istio's encoding of `percentage.value` (0-100, double) as an Envoy FractionalPercent numerator."""
    return round(percent * 10_000)


def sampled(percent: float | None, rng: random.Random) -> bool:
    """One independent draw: true with probability percent/100. None (no percentage) is never true."""
    if percent is None:
        return False
    numerator = percent_to_millionths(percent)
    if numerator <= 0:
        return False
    return rng.randrange(MILLION) < numerator


@dataclass(frozen=True)
class DelayFault:
    fixed_delay: float
    percentage: float | None


@dataclass(frozen=True)
class AbortFault:
    """Exactly one of `http_status` and `grpc_status` is set."""

    http_status: int | None
    grpc_status: int | None
    percentage: float | None


@dataclass(frozen=True)
class FaultPolicy:
    delay: DelayFault | None = None
    abort: AbortFault | None = None


@dataclass(frozen=True)
class FaultDecision:
    """For one request: wait `delay` seconds (if set), then answer `abort` (if set) instead of routing.

    `flags` is what the access log shows: DI when delayed, FI when aborted.
    """

    delay: float | None = None
    abort: LocalReply | None = None

    @property
    def flags(self) -> frozenset[ResponseFlag]:
        out = set()
        if self.delay is not None:
            out.add(ResponseFlag.DELAY_INJECTED)
        if self.abort is not None:
            out.add(ResponseFlag.FAULT_INJECTED)
        return frozenset(out)

    @property
    def injected(self) -> bool:
        return self.delay is not None or self.abort is not None


NO_FAULT = FaultDecision()


def decide_fault(policy: FaultPolicy | None, rng: random.Random) -> FaultDecision:
    """Sample `policy` for one request. Pass a seeded `rng` in tests for reproducible draws."""
    if policy is None:
        return NO_FAULT
    delay = None
    if policy.delay is not None and sampled(policy.delay.percentage, rng):
        delay = policy.delay.fixed_delay
    abort = None
    if policy.abort is not None and sampled(policy.abort.percentage, rng):
        abort = abort_reply(policy.abort)
    if delay is None and abort is None:
        return NO_FAULT
    return FaultDecision(delay, abort)


def abort_reply(fault: AbortFault) -> LocalReply:
    flags = frozenset({ResponseFlag.FAULT_INJECTED})
    if fault.grpc_status is not None:
        # Envoy answers a gRPC abort as trailers-only HTTP 200 carrying the configured grpc-status.
        return LocalReply(200, FAULT_ABORT_BODY, (), flags, "fault_filter_abort", grpc_status=fault.grpc_status)
    return LocalReply(fault.http_status or 503, FAULT_ABORT_BODY, (), flags, "fault_filter_abort")

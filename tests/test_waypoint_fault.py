"""Fault injection as users configure it in a VirtualService: sampled per request with fixed seeds."""

from __future__ import annotations

import random

import yaml

from waypoint.config import ConfigStore
from waypoint.config.model import ServiceRef
from waypoint.flags import ResponseFlag
from waypoint.resilience.fault import AbortFault, DelayFault, FaultPolicy, decide_fault, percent_to_millionths


def vs_fault(fault: str):
    store = ConfigStore()
    result = store.apply(yaml.safe_load(f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings]
  http:
  - fault: {fault}
    route: [{{destination: {{host: ratings}}}}]
"""))
    assert result.accepted, result.message
    return store.snapshot().route_table(ServiceRef("default", "ratings")).entries[0].action.fault


def test_fifty_percent_abort_is_within_bounds_and_carries_fi():
    fault = vs_fault("{abort: {httpStatus: 503, percentage: {value: 50}}}")
    rng = random.Random(424242)
    aborted = []
    for _ in range(1000):
        decision = decide_fault(fault, rng)
        if decision.abort is not None:
            aborted.append(decision)
    # Binomial(1000, 0.5): sd ~ 15.8; +-4 sd.
    assert 437 <= len(aborted) <= 563
    reply = aborted[0].abort
    assert reply.status == 503 and reply.body == b"fault filter abort"
    assert ResponseFlag.FAULT_INJECTED in reply.flags and reply.details == "fault_filter_abort"
    assert aborted[0].flags == {ResponseFlag.FAULT_INJECTED}


def test_absent_percentage_injects_nothing():
    fault = vs_fault("{abort: {httpStatus: 500}, delay: {fixedDelay: 2s}}")
    rng = random.Random(1)
    assert not any(decide_fault(fault, rng).injected for _ in range(500))


def test_delay_then_abort_are_independent_draws():
    fault = FaultPolicy(DelayFault(1.5, 50.0), AbortFault(418, None, 50.0))
    rng = random.Random(99)
    combos = {(d.delay is not None, d.abort is not None) for d in (decide_fault(fault, rng) for _ in range(400))}
    assert combos == {(False, False), (False, True), (True, False), (True, True)}
    both = next(d for d in (decide_fault(fault, rng) for _ in range(400)) if d.delay and d.abort)
    assert both.delay == 1.5 and both.abort.status == 418
    assert both.flags == {ResponseFlag.DELAY_INJECTED, ResponseFlag.FAULT_INJECTED}


def test_full_percentage_always_and_zero_never():
    rng = random.Random(0)
    always = FaultPolicy(None, AbortFault(503, None, 100.0))
    never = FaultPolicy(DelayFault(1.0, 0.0), None)
    assert all(decide_fault(always, rng).abort for _ in range(200))
    assert not any(decide_fault(never, rng).injected for _ in range(200))


def test_grpc_abort_is_trailers_only_with_the_grpc_status():
    fault = vs_fault("{abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}")
    reply = decide_fault(fault, random.Random(0)).abort
    headers = dict(reply.grpc_headers())
    assert headers[":status"] == "200" and headers["grpc-status"] == "14"
    assert headers["grpc-message"] == "fault filter abort"


def test_percentage_uses_istios_millionths_encoding():
    assert percent_to_millionths(0.0001) == 1
    assert percent_to_millionths(12.5) == 125_000
    assert percent_to_millionths(100) == 1_000_000

"""Retries, timeouts, fault injection, circuit breaking and outlier detection, with Envoy's semantics.

Pure state machines: the asyncio shell feeds them outcomes and the time, and does what they answer.
"""

from waypoint.resilience.backoff import JitteredBackoff
from waypoint.resilience.circuit import CircuitBreaker, CircuitBreakerThresholds, Permit, Resource
from waypoint.resilience.fault import AbortFault, DelayFault, FaultDecision, FaultPolicy, decide_fault
from waypoint.resilience.outlier import OutlierConfig, OutlierDetector
from waypoint.resilience.retry import (
    DEFAULT_RETRY_POLICY,
    AttemptPlan,
    Finish,
    PerTryTimeout,
    ResetReason,
    Retry,
    RetryPolicy,
    RetryState,
    UpstreamReset,
    UpstreamResponse,
    parse_retry_on,
)

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "AbortFault",
    "AttemptPlan",
    "CircuitBreaker",
    "CircuitBreakerThresholds",
    "DelayFault",
    "FaultDecision",
    "FaultPolicy",
    "Finish",
    "JitteredBackoff",
    "OutlierConfig",
    "OutlierDetector",
    "PerTryTimeout",
    "Permit",
    "ResetReason",
    "Resource",
    "Retry",
    "RetryPolicy",
    "RetryState",
    "UpstreamReset",
    "UpstreamResponse",
    "decide_fault",
    "parse_retry_on",
]

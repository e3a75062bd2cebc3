"""Retries with Envoy's semantics: what is retried under which retryOn, exact attempt counting, per-try
and route timeouts, backoff bounds, and the flags and replies a user sees at the end."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.flags import ResponseFlag
from waypoint.resilience.backoff import JitteredBackoff
from waypoint.resilience.retry import (
    DEFAULT_RETRY_POLICY,
    Finish,
    PerTryTimeout,
    ResetReason,
    Retry,
    RetryPolicy,
    RetryState,
    UpstreamReset,
    UpstreamResponse,
    parse_retry_on,
    would_retry,
)
from waypoint.routing import Headers


def policy(retry_on: str, n: int = 2, **kw) -> RetryPolicy:
    on, codes = parse_retry_on(retry_on)
    return RetryPolicy(num_retries=n, retry_on=on, retriable_status_codes=codes, **kw)


R503 = UpstreamResponse(503)
CONNECT_FAIL = UpstreamReset(ResetReason.REMOTE_CONNECTION_FAILURE)
REMOTE_RESET = UpstreamReset(ResetReason.REMOTE_RESET)
REFUSED = UpstreamReset(ResetReason.REMOTE_REFUSED_STREAM)


@pytest.mark.parametrize(
    ("retry_on", "outcome", "retried"),
    [
        # Istio's default: connection failures and refused streams, gRPC unavailable/cancelled; not 503.
        (None, CONNECT_FAIL, True),
        (None, REFUSED, True),
        (None, R503, False),
        (None, REMOTE_RESET, False),
        (None, PerTryTimeout(), False),
        (None, UpstreamResponse(200, (("grpc-status", "14"),)), True),
        (None, UpstreamResponse(200, (("grpc-status", "1"),)), True),
        (None, UpstreamResponse(200, (("grpc-status", "13"),)), False),
        ("5xx", R503, True),
        ("5xx", UpstreamResponse(500), True),
        ("5xx", UpstreamResponse(404), False),
        ("5xx", REMOTE_RESET, True),
        ("5xx", PerTryTimeout(), True),
        ("gateway-error", UpstreamResponse(500), False),
        ("gateway-error", UpstreamResponse(504), True),
        ("reset", REMOTE_RESET, True),
        ("reset", R503, False),
        ("503", R503, True),
        ("503", REMOTE_RESET, False),  # a reset is not a real 503
        ("retriable-4xx", UpstreamResponse(409), True),
        ("retriable-4xx", UpstreamResponse(400), False),
        ("connect-failure", UpstreamReset(ResetReason.CONNECTION_TIMEOUT), True),
        ("connect-failure", REMOTE_RESET, False),
        ("reset-before-request", UpstreamReset(ResetReason.REMOTE_RESET, request_sent=False), True),
        ("reset-before-request", UpstreamReset(ResetReason.REMOTE_RESET, request_sent=True), False),
        ("5xx", UpstreamReset(ResetReason.OVERFLOW), False),  # overflow is never retried
        ("5xx", UpstreamResponse(503, (("x-envoy-overloaded", "true"),)), False),
        ("resource-exhausted", UpstreamResponse(200, (("grpc-status", "8"),)), True),
    ],
)
def test_which_outcomes_are_retriable(retry_on, outcome, retried):
    p = DEFAULT_RETRY_POLICY if retry_on is None else policy(retry_on)
    assert would_retry(p, outcome) is retried


def test_parse_retry_on_moves_codes_and_rejects_unknown_names():
    on, codes = parse_retry_on("connect-failure, 503,504")
    assert codes == {503, 504} and "retriable-status-codes" in on and "connect-failure" in on
    with pytest.raises(ValueError, match="'5xxx' is not a retry condition"):
        parse_retry_on("5xxx")


def run(state: RetryState, outcomes, now: float = 0.0):
    """Drive the state machine; returns (Finish, attempts started, headers of each attempt)."""
    seen = []
    for outcome in outcomes:
        plan = state.begin_attempt(now)
        seen.append(dict(plan.headers))
        step = state.on_outcome(outcome, now)
        if isinstance(step, Finish):
            return step, plan.attempt, seen
        assert isinstance(step, Retry)
        now += step.backoff
    raise AssertionError("ran out of outcomes")


def test_attempts_are_counted_exactly_and_exhaustion_gives_urx():
    state = RetryState(policy("5xx", n=3), now=0.0, rng=random.Random(1))
    done, attempts, headers = run(state, [R503] * 10)
    assert attempts == 4  # 1 + 3 retries
    assert [h["x-envoy-attempt-count"] for h in headers] == ["1", "2", "3", "4"]
    assert done.response == R503 and ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED in done.flags
    assert done.attempts == 4


def test_success_after_retry_stops_without_flags():
    state = RetryState(policy("5xx", n=3), now=0.0, rng=random.Random(1))
    done, attempts, _ = run(state, [R503, UpstreamResponse(200)])
    assert attempts == 2 and done.response.status == 200 and not done.flags


def test_non_retriable_outcome_ends_at_once():
    state = RetryState(DEFAULT_RETRY_POLICY, now=0.0)
    done, attempts, _ = run(state, [R503])
    assert attempts == 1 and done.response.status == 503 and not done.flags


def test_no_policy_means_a_single_attempt():
    state = RetryState(None, now=0.0)
    done, attempts, _ = run(state, [CONNECT_FAIL])
    assert attempts == 1
    assert done.reply.status == 503 and ResponseFlag.UPSTREAM_CONNECTION_FAILURE in done.reply.flags


def test_per_try_timeout_not_retried_by_default_policy_gives_504_ut():
    p = RetryPolicy(num_retries=2, retry_on=DEFAULT_RETRY_POLICY.retry_on, per_try_timeout=0.5)
    state = RetryState(p, now=0.0)
    plan = state.begin_attempt(0.0)
    assert plan.per_try_timeout == 0.5 and dict(plan.headers)["x-envoy-expected-rq-timeout-ms"] == "500"
    done = state.on_outcome(PerTryTimeout(), 0.5)
    assert isinstance(done, Finish)
    assert done.reply.status == 504 and done.reply.body == b"upstream request timeout"
    assert ResponseFlag.UPSTREAM_REQUEST_TIMEOUT in done.reply.flags
    assert done.reply.details == "upstream_per_try_timeout"


def test_per_try_timeouts_retried_under_5xx_until_exhausted():
    state = RetryState(policy("5xx", n=2, per_try_timeout=0.1), now=0.0, rng=random.Random(2))
    done, attempts, _ = run(state, [PerTryTimeout()] * 5)
    assert attempts == 3
    assert done.reply.status == 504
    assert {ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED} <= done.reply.flags


def test_route_timeout_stops_retries_with_504():
    state = RetryState(policy("5xx", n=10), now=0.0, route_timeout=1.0, rng=random.Random(3))
    state.begin_attempt(0.0)
    step = state.on_outcome(R503, 0.4)
    assert isinstance(step, Retry)
    state.begin_attempt(0.4 + step.backoff)
    done = state.on_outcome(R503, 1.2)  # the route deadline has passed: no more attempts
    assert isinstance(done, Finish) and done.reply.status == 504
    assert done.reply.details == "upstream_response_timeout" and done.attempts == 2
    with pytest.raises(RuntimeError):
        state.begin_attempt(1.3)


def test_a_final_answer_that_arrives_in_time_is_kept_even_late_in_the_budget():
    state = RetryState(policy("5xx", n=10), now=0.0, route_timeout=1.0)
    state.begin_attempt(0.0)
    done = state.on_outcome(UpstreamResponse(200), 1.0)
    assert isinstance(done, Finish) and done.response.status == 200


def test_expected_timeout_header_is_capped_by_remaining_route_time_and_absent_without_timeouts():
    state = RetryState(policy("5xx", per_try_timeout=2.0), now=10.0, route_timeout=3.0, rng=random.Random(0))
    assert dict(state.begin_attempt(10.0).headers)["x-envoy-expected-rq-timeout-ms"] == "2000"
    state.on_outcome(R503, 11.5)
    assert dict(state.begin_attempt(11.5).headers)["x-envoy-expected-rq-timeout-ms"] == "1500"
    bare = RetryState(DEFAULT_RETRY_POLICY, now=0.0)
    assert "x-envoy-expected-rq-timeout-ms" not in dict(bare.begin_attempt(0.0).headers)


def test_retry_refused_by_circuit_breaker_ends_with_uo():
    state = RetryState(policy("5xx"), now=0.0)
    state.begin_attempt(0.0)
    done = state.on_outcome(R503, 0.0, admit_retry=lambda: False)
    assert isinstance(done, Finish) and done.response == R503
    assert ResponseFlag.UPSTREAM_OVERFLOW in done.flags


def test_final_reset_reply_reports_the_reason_and_that_it_retried():
    state = RetryState(policy("reset", n=1), now=0.0, rng=random.Random(0))
    done, _, _ = run(state, [REMOTE_RESET, UpstreamReset(ResetReason.CONNECTION_TERMINATION)])
    assert done.reply.status == 503
    assert done.reply.body == (b"upstream connect error or disconnect/reset before headers. "
                               b"retried and the latest reset reason: connection termination")
    assert ResponseFlag.UPSTREAM_CONNECTION_TERMINATION in done.reply.flags
    assert done.reply.details == "upstream_reset_before_response_started{connection_termination}"


def test_protocol_error_reset_is_502_upe():
    done, _, _ = run(RetryState(None, now=0.0), [UpstreamReset(ResetReason.PROTOCOL_ERROR)])
    assert done.reply.status == 502 and ResponseFlag.UPSTREAM_PROTOCOL_ERROR in done.reply.flags


def test_envoy_request_headers_override_the_policy():
    headers = Headers({"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "4",
                       "x-envoy-upstream-rq-timeout-ms": "3000", "x-envoy-upstream-rq-per-try-timeout-ms": "500"})
    state = RetryState.with_request_overrides(DEFAULT_RETRY_POLICY, headers, now=0.0, rng=random.Random(0))
    assert state.policy.num_retries == 4 and "5xx" in state.policy.retry_on
    assert state.policy.per_try_timeout == 0.5 and state.route_timeout == 3.0
    lone = RetryState.with_request_overrides(None, Headers({"x-envoy-retry-on": "5xx"}), now=0.0)
    assert lone.policy.num_retries == 1
    junk = RetryState.with_request_overrides(None, Headers({"x-envoy-max-retries": "lots"}), now=0.0)
    assert junk.policy.num_retries == 0


def test_backoff_intervals_double_from_25ms_to_the_250ms_cap():
    b = JitteredBackoff(rng=random.Random(0))
    bounds = []
    for _ in range(7):
        bounds.append(b.current_interval())
        b.next()
    assert bounds == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(0, 2**32), st.integers(1, 30))
def test_backoff_always_within_zero_and_cap(base_ms, seed, draws):
    b = JitteredBackoff(base_ms / 1000, rng=random.Random(seed))
    for _ in range(draws):
        bound = b.current_interval()
        wait = b.next()
        assert 0 <= wait < bound <= b.cap + 1e-9
        assert wait <= b.cap


def test_backoff_is_fully_jittered():
    b = JitteredBackoff(rng=random.Random(5))
    waits = {JitteredBackoff(rng=random.Random(s)).next() for s in range(200)}
    assert min(waits) < 0.005 and max(waits) > 0.02
    assert b.next() < 0.025

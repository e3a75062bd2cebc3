"""Retry decisions with Envoy's router semantics, as a sans-IO state machine.

One `RetryState` lives for one downstream request. The shell asks it for the plan of each attempt
(`begin_attempt`: the attempt number for `x-envoy-attempt-count`, the per-try timeout to arm, the
expected-timeout header) and reports how the attempt ended (`on_outcome`). The answer is either `Retry`
(wait this long, then attempt again) or `Finish` (send this downstream). The route-level timer is the
shell's; when it fires, `on_route_timeout` gives the 504.

The rules that users notice, each from Envoy's router / retry state:
- which outcomes are retriable depends on `retryOn`; status codes only match real upstream responses
  (a reset that Envoy would turn into a 503 matches `reset`/`5xx`, never `503`);
- a per-try timeout is a local reset: retried only under `5xx`, `gateway-error` or `reset`, so Istio's
  default policy does not retry it; when it is final the answer is 504 UT `upstream_per_try_timeout`;
- overflow resets and responses carrying `x-envoy-overloaded` are never retried;
- when retries run out on a retriable outcome the last outcome goes downstream with flag URX;
- a retry the circuit breaker refuses (`max_retries`) ends the request with flag UO.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from waypoint.flags import GRPC_STATUS_CODES, LocalReply, ResponseFlag, upstream_timeout
from waypoint.resilience.backoff import JitteredBackoff


class HeaderLookup(Protocol):
    def get(self, name: str) -> str | None: ...


HTTP_RETRY_ON = frozenset({
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
})
GRPC_RETRY_ON = {
    "cancelled": GRPC_STATUS_CODES["CANCELLED"],
    "deadline-exceeded": GRPC_STATUS_CODES["DEADLINE_EXCEEDED"],
    "internal": GRPC_STATUS_CODES["INTERNAL"],
    "resource-exhausted": GRPC_STATUS_CODES["RESOURCE_EXHAUSTED"],
    "unavailable": GRPC_STATUS_CODES["UNAVAILABLE"],
}
KNOWN_RETRY_ON = HTTP_RETRY_ON | frozenset(GRPC_RETRY_ON)


def parse_retry_on(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """Split Istio's `retryOn` into Envoy policies and bare status codes.

    Istio moves the codes to `retriable_status_codes` and adds `retriable-status-codes` itself, so
    `retryOn: "503,connect-failure"` retries a real upstream 503 and connection failures.
    Raises ValueError naming the first unknown entry.
    """
    policies: set[str] = set()
    codes: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.isdigit():
            code = int(item)
            if not 100 <= code <= 599:
                raise ValueError(f"{item!r} is not an HTTP status code (100-599)")
            codes.add(code)
        elif item in KNOWN_RETRY_ON:
            policies.add(item)
        else:
            raise ValueError(
                f"{item!r} is not a retry condition; use HTTP status codes or one of "
                + ", ".join(sorted(KNOWN_RETRY_ON))
            )
    if codes:
        policies.add("retriable-status-codes")
    return frozenset(policies), frozenset(codes)


@dataclass(frozen=True)
class RetryPolicy:
    """A route's retry policy. `num_retries` counts retries, so a request makes at most 1 + n attempts."""

    num_retries: int = 2
    retry_on: frozenset[str] = field(default_factory=frozenset)
    retriable_status_codes: frozenset[int] = field(default_factory=frozenset)
    per_try_timeout: float | None = None
    base_interval: float = 0.025
    max_interval: float | None = None
    retry_previous_hosts: bool = True
    host_selection_max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.num_retries < 0:
            raise ValueError("num_retries must not be negative")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError("per_try_timeout must be positive (None means no per-try timeout)")


# Istio's outbound default when neither the route nor the mesh sets a policy (1.24 and later: no 503).
DEFAULT_RETRY_POLICY = RetryPolicy(
    num_retries=2,
    retry_on=frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}),
)


class ResetReason(StrEnum):
    """Envoy's stream reset reasons; the value is the text its local replies print."""

    LOCAL_CONNECTION_FAILURE = "local connection failure"
    REMOTE_CONNECTION_FAILURE = "remote connection failure"
    CONNECTION_TIMEOUT = "connection timeout"
    CONNECTION_TERMINATION = "connection termination"
    LOCAL_RESET = "local reset"
    LOCAL_REFUSED_STREAM = "local refused stream reset"
    OVERFLOW = "overflow"
    REMOTE_RESET = "remote reset"
    REMOTE_REFUSED_STREAM = "remote refused stream reset"
    CONNECT_ERROR = "remote error with CONNECT request"
    PROTOCOL_ERROR = "protocol error"

    @property
    def is_connect_failure(self) -> bool:
        return self in (ResetReason.LOCAL_CONNECTION_FAILURE, ResetReason.REMOTE_CONNECTION_FAILURE,
                        ResetReason.CONNECTION_TIMEOUT)

    @property
    def flag(self) -> ResponseFlag:
        return _RESET_FLAGS[self]


_RESET_FLAGS = {
    ResetReason.LOCAL_CONNECTION_FAILURE: ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
    ResetReason.REMOTE_CONNECTION_FAILURE: ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
    ResetReason.CONNECTION_TIMEOUT: ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
    ResetReason.CONNECTION_TERMINATION: ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
    ResetReason.LOCAL_RESET: ResponseFlag.LOCAL_RESET,
    ResetReason.LOCAL_REFUSED_STREAM: ResponseFlag.LOCAL_RESET,
    ResetReason.OVERFLOW: ResponseFlag.UPSTREAM_OVERFLOW,
    ResetReason.REMOTE_RESET: ResponseFlag.UPSTREAM_REMOTE_RESET,
    ResetReason.REMOTE_REFUSED_STREAM: ResponseFlag.UPSTREAM_REMOTE_RESET,
    ResetReason.CONNECT_ERROR: ResponseFlag.UPSTREAM_REMOTE_RESET,
    ResetReason.PROTOCOL_ERROR: ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
}


# --- outcomes of one attempt -------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamResponse:
    """Response headers arrived from the upstream. `headers` holds lower-case names (for `grpc-status`
    of a trailers-only reply, `x-envoy-overloaded`, `x-envoy-ratelimited`)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def grpc_status(self) -> int | None:
        value = self.header("grpc-status")
        return int(value) if value is not None and value.strip().isdigit() else None


@dataclass(frozen=True)
class UpstreamReset:
    """The attempt died before response headers. `request_sent` is False when not a byte of the
    request reached the upstream (what `reset-before-request` retries)."""

    reason: ResetReason
    request_sent: bool = True


@dataclass(frozen=True)
class PerTryTimeout:
    """The per-try timer fired before response headers; Envoy resets the attempt locally."""


Outcome = UpstreamResponse | UpstreamReset | PerTryTimeout


def would_retry(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Whether `outcome` is retriable under `policy`'s `retryOn`, ignoring how many retries are left."""
    on = policy.retry_on
    if isinstance(outcome, PerTryTimeout):
        return bool(on & {"5xx", "gateway-error", "reset"})
    if isinstance(outcome, UpstreamReset):
        reason = outcome.reason
        if reason is ResetReason.OVERFLOW:
            return False
        if reason.is_connect_failure and "connect-failure" in on:
            return True
        if "reset-before-request" in on and not outcome.request_sent:
            return True
        if on & {"5xx", "gateway-error", "reset"}:
            return True
        return "refused-stream" in on and reason is ResetReason.REMOTE_REFUSED_STREAM
    status = outcome.status
    if outcome.header("x-envoy-overloaded") is not None:
        return False
    if outcome.header("x-envoy-ratelimited") is not None:
        return "envoy-ratelimited" in on
    if "5xx" in on and 500 <= status <= 599:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    if "retriable-4xx" in on and status == 409:
        return True
    if "retriable-status-codes" in on and status in policy.retriable_status_codes:
        return True
    grpc = outcome.grpc_status()
    if grpc is not None:
        return any(GRPC_RETRY_ON[name] == grpc for name in on if name in GRPC_RETRY_ON)
    return False


# --- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptPlan:
    """What the shell does for the next attempt: set `headers` on the upstream request and arm a timer
    for `per_try_timeout` seconds (None: no per-try timer)."""

    attempt: int
    per_try_timeout: float | None
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Retry:
    """Wait `backoff` seconds, then call `begin_attempt` again."""

    backoff: float
    attempt: int


@dataclass(frozen=True)
class Finish:
    """Stop: forward `response` (the upstream's, with `flags` added to its log line) or send `reply`."""

    response: UpstreamResponse | None = None
    reply: LocalReply | None = None
    flags: frozenset[ResponseFlag] = field(default_factory=frozenset)
    attempts: int = 1


class RetryState:
    """The retry bookkeeping of one downstream request.

    `route_timeout` (seconds, None = none) bounds all attempts and backoffs together; it starts at
    `now`, which should be when the whole downstream request reached the router.
    """

    def __init__(
        self,
        policy: RetryPolicy | None,
        *,
        now: float,
        route_timeout: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy(num_retries=0)
        self.retries_left = self.policy.num_retries
        self.deadline = now + route_timeout if route_timeout else None
        self.route_timeout = route_timeout or None
        self.attempt = 0
        self.retried = False
        self.finished = False
        self._backoff = JitteredBackoff(self.policy.base_interval, self.policy.max_interval, rng)

    @classmethod
    def with_request_overrides(
        cls,
        policy: RetryPolicy | None,
        headers: HeaderLookup,
        *,
        now: float,
        route_timeout: float | None = None,
        rng: random.Random | None = None,
    ) -> RetryState:
        """Honour the `x-envoy-*` request headers a mesh client may send, as Envoy does.

        `x-envoy-retry-on` / `x-envoy-retry-grpc-on` add conditions (alone they imply one retry),
        `x-envoy-max-retries` sets the count, `x-envoy-retriable-status-codes` adds codes,
        `x-envoy-upstream-rq-timeout-ms` replaces the route timeout and
        `x-envoy-upstream-rq-per-try-timeout-ms` the per-try timeout (ignored unless below the route timeout).
        Malformed values are ignored, as Envoy ignores them. The shell strips these headers upstream.
        """
        base = policy or RetryPolicy(num_retries=0)
        retry_on = set(base.retry_on)
        codes = set(base.retriable_status_codes)
        num = base.num_retries
        extra_on = _split(headers.get("x-envoy-retry-on")) + _split(headers.get("x-envoy-retry-grpc-on"))
        known = [p for p in extra_on if p in KNOWN_RETRY_ON]
        if known:
            if not retry_on:
                num = max(num, 1)
            retry_on.update(known)
        for raw in _split(headers.get("x-envoy-retriable-status-codes")):
            if raw.isdigit():
                codes.add(int(raw))
        max_retries = headers.get("x-envoy-max-retries")
        if retry_on and max_retries is not None and max_retries.strip().isdigit():
            num = int(max_retries.strip())
        timeout = route_timeout
        timeout_ms = headers.get("x-envoy-upstream-rq-timeout-ms")
        if timeout_ms is not None and timeout_ms.strip().isdigit():
            timeout = int(timeout_ms.strip()) / 1000 or None
        per_try = base.per_try_timeout
        per_try_ms = headers.get("x-envoy-upstream-rq-per-try-timeout-ms")
        if per_try_ms is not None and per_try_ms.strip().isdigit():
            value = int(per_try_ms.strip()) / 1000
            if value > 0 and (timeout is None or value < timeout):
                per_try = value
        merged = replace(base, num_retries=num, retry_on=frozenset(retry_on),
                         retriable_status_codes=frozenset(codes), per_try_timeout=per_try)
        return cls(merged, now=now, route_timeout=timeout, rng=rng)

    def remaining(self, now: float) -> float | None:
        if self.deadline is None:
            return None
        return max(self.deadline - now, 0.0)

    def begin_attempt(self, now: float) -> AttemptPlan:
        """Start the next attempt: its number, its per-try timer, the headers Envoy puts upstream.

        `x-envoy-expected-rq-timeout-ms` is the per-try timeout when set, else the route timeout, capped
        by what is left of the route timeout; absent when there is no timeout at all (Istio's default).
        """
        if self.finished:
            raise RuntimeError("the request already finished; no further attempt is allowed")
        self.attempt += 1
        per_try = self.policy.per_try_timeout
        left = self.remaining(now)
        expected = left if left is not None and (per_try is None or left < per_try) else per_try
        headers: list[tuple[str, str]] = [("x-envoy-attempt-count", str(self.attempt))]
        if expected:
            headers.append(("x-envoy-expected-rq-timeout-ms", str(max(int(expected * 1000), 1))))
        return AttemptPlan(self.attempt, per_try, tuple(headers))

    def on_outcome(self, outcome: Outcome, now: float,
                   admit_retry: Callable[[], bool] | None = None) -> Retry | Finish:
        """How the attempt ended decides the next step.

        `admit_retry` is asked only when a retry is otherwise due: the circuit breaker's `max_retries`
        (or a retry budget). Refused, the request ends with this outcome and flag UO.
        """
        if self.finished:
            raise RuntimeError("the request already finished")
        if not would_retry(self.policy, outcome):
            return self._finish(outcome)
        if self.deadline is not None and now >= self.deadline:
            # The route timer has run out: a retriable failure now ends as Envoy's global timeout does.
            return self.on_route_timeout()
        if self.retries_left <= 0:
            return self._finish(outcome, ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
        self.retries_left -= 1
        if admit_retry is not None and not admit_retry():
            return self._finish(outcome, ResponseFlag.UPSTREAM_OVERFLOW)
        self.retried = True
        return Retry(self._backoff.next(), self.attempt + 1)

    def on_route_timeout(self) -> Finish:
        """The route timer fired (during an attempt or a backoff): 504 UT, no more attempts."""
        self.finished = True
        return Finish(reply=upstream_timeout(per_try=False), attempts=self.attempt)

    def _finish(self, outcome: Outcome, *extra: ResponseFlag) -> Finish:
        self.finished = True
        flags = frozenset(extra)
        if isinstance(outcome, UpstreamResponse):
            return Finish(response=outcome, flags=flags, attempts=self.attempt)
        if isinstance(outcome, PerTryTimeout):
            return Finish(reply=upstream_timeout(per_try=True).with_flags(*extra), flags=flags,
                          attempts=self.attempt)
        return Finish(reply=reset_reply(outcome.reason, self.retried).with_flags(*extra), flags=flags,
                      attempts=self.attempt)


def reset_reply(reason: ResetReason, retried: bool) -> LocalReply:
    """Envoy's local reply for an upstream that reset before response headers: 503 (502 on a protocol
    error), the reset reason in the body, its flag, and `x-envoy-overloaded` on overflow."""
    prefix = "retried and the latest " if retried else ""
    body = f"upstream connect error or disconnect/reset before headers. {prefix}reset reason: {reason.value}"
    headers: tuple[tuple[str, str], ...] = ()
    if reason is ResetReason.OVERFLOW:
        headers = (("x-envoy-overloaded", "true"),)
    status = 502 if reason is ResetReason.PROTOCOL_ERROR else 503
    details = "upstream_reset_before_response_started{" + reason.value.replace(" ", "_") + "}"
    return LocalReply(status, body.encode(), headers, frozenset({reason.flag}), details)


def _split(value: str | None) -> list[str]:
    if not value:
        return []
    return [p.strip() for p in value.split(",") if p.strip()]



"""Outlier detection (passive health checking): consecutive-error ejection with Envoy's rules.

What users rely on, from Envoy's detector:
- a host is ejected when its consecutive 5xx count reaches `consecutive_5xx` (connect failures,
  timeouts and resets count as 5xx unless local-origin errors are split out), or its consecutive gateway
  errors (502/503/504) reach `consecutive_gateway_errors`; any other response resets the counters;
- no ejection may make the ejected share exceed `max_ejection_percent` ((ejected + 1) / hosts, checked
  before ejecting), so with the default 10% and fewer than ten hosts nothing is ever ejected;
- an ejection lasts base_ejection_time x (times ejected in a row), capped at max_ejection_time; every
  sweep (`interval`) in which a returned host stays healthy lowers that multiplier by one;
- an ejected host comes back by itself when its time is up.

Here the return happens at the exact instant the ejection ends (Envoy rounds it up to its next sweep);
the sweep still runs from `tick()` for the multiplier. Time comes from the injected clock only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from waypoint.resilience.retry import PerTryTimeout, ResetReason, UpstreamReset, UpstreamResponse

Host = Hashable


@dataclass(frozen=True)
class OutlierConfig:
    """DestinationRule `outlierDetection`, with Istio's defaults. 0 disables a consecutive check."""

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 0
    consecutive_local_origin_failures: int = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.base_ejection_time <= 0:
            raise ValueError("interval and base ejection time must be positive")
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max ejection time cannot be smaller than base ejection time")
        if not 0 <= self.max_ejection_percent <= 100 or not 0 <= self.min_health_percent <= 100:
            raise ValueError("percentages must be within 0-100")


class Result(StrEnum):
    """What the shell saw, in the detector's terms."""

    SUCCESS = "success"
    LOCAL_CONNECT_FAILED = "local_connect_failed"
    LOCAL_TIMEOUT = "local_timeout"


@dataclass
class _HostState:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0
    backoff: int = 0  # "times ejected in a row": the multiplier of the base ejection time
    ejected_at: float | None = None
    ejected_for: float = 0.0
    last_unejected_at: float | None = None
    times_ejected: int = 0


@dataclass(frozen=True)
class Ejection:
    host: Host
    at: float
    duration: float
    reason: str


@dataclass
class OutlierDetector:
    """The outlier state of one upstream cluster. `clock()` returns monotonic seconds."""

    config: OutlierConfig
    clock: Callable[[], float]
    _hosts: dict[Host, _HostState] = field(default_factory=dict)
    events: list[Ejection] = field(default_factory=list)
    overflowed: int = 0

    # --- membership ----------------------------------------------------------------------------------

    def set_hosts(self, hosts: Iterable[Host]) -> None:
        """Track exactly these hosts (endpoints came or went); state of remaining hosts is kept."""
        wanted = list(hosts)
        for h in wanted:
            self._hosts.setdefault(h, _HostState())
        for h in list(self._hosts):
            if h not in wanted:
                del self._hosts[h]

    @property
    def hosts(self) -> list[Host]:
        return list(self._hosts)

    # --- queries ---------------------------------------------------------------------------------------

    def is_ejected(self, host: Host) -> bool:
        self._return_due(self.clock())
        state = self._hosts.get(host)
        return state is not None and state.ejected_at is not None

    def ejected(self) -> set[Host]:
        self._return_due(self.clock())
        return {h for h, s in self._hosts.items() if s.ejected_at is not None}

    def healthy(self, hosts: Iterable[Host]) -> list[Host]:
        """`hosts` without the ejected ones: what the load balancer may pick from.

        With `min_health_percent` > 0 (Envoy's panic threshold) and fewer healthy hosts than that share,
        Envoy balances across all hosts again; Istio's default 0 disables this panic mode.
        """
        candidates = list(hosts)
        out = self.ejected()
        healthy = [h for h in candidates if h not in out]
        threshold = self.config.min_health_percent
        if threshold > 0 and candidates and 100.0 * len(healthy) / len(candidates) < threshold:
            return candidates
        return healthy

    def ejection_ends(self, host: Host) -> float | None:
        self._return_due(self.clock())
        state = self._hosts.get(host)
        if state is None or state.ejected_at is None:
            return None
        return state.ejected_at + state.ejected_for

    def multiplier(self, host: Host) -> int:
        return self._hosts[host].backoff

    # --- results ---------------------------------------------------------------------------------------

    def record_response(self, host: Host, status: int) -> Ejection | None:
        """An HTTP status from `host` (an upstream response, or the code Envoy maps a failure to)."""
        now = self.clock()
        self._return_due(now)
        state = self._hosts.get(host)
        if state is None:
            return None
        cfg = self.config
        if 500 <= status <= 599:
            ejection = None
            if status in (502, 503, 504):
                state.consecutive_gateway += 1
                if cfg.consecutive_gateway_errors and state.consecutive_gateway == cfg.consecutive_gateway_errors:
                    ejection = self._consecutive_error(host, state, now, "consecutive_gateway_failure")
            else:
                state.consecutive_gateway = 0
            state.consecutive_5xx += 1
            if cfg.consecutive_5xx and state.consecutive_5xx == cfg.consecutive_5xx:
                ejection = self._consecutive_error(host, state, now, "consecutive_5xx") or ejection
            return ejection
        state.consecutive_5xx = 0
        state.consecutive_gateway = 0
        return None

    def record_local(self, host: Host, result: Result) -> Ejection | None:
        """A local-origin result: connect failure / timeout, or a successful connection."""
        now = self.clock()
        self._return_due(now)
        state = self._hosts.get(host)
        if state is None:
            return None
        if not self.config.split_external_local_origin_errors:
            # Non-split mode: failures count as the HTTP code Envoy maps them to; success means nothing.
            if result is Result.LOCAL_CONNECT_FAILED:
                return self.record_response(host, 503)
            if result is Result.LOCAL_TIMEOUT:
                return self.record_response(host, 504)
            return None
        if result is Result.SUCCESS:
            state.consecutive_local = 0
            return None
        state.consecutive_local += 1
        limit = self.config.consecutive_local_origin_failures
        if limit and state.consecutive_local == limit:
            return self._consecutive_error(host, state, now, "consecutive_local_origin_failure")
        return None

    def record_outcome(self, host: Host, outcome: UpstreamResponse | UpstreamReset | PerTryTimeout) -> Ejection | None:
        """Convenience for the shell: feed a retry outcome straight in."""
        if isinstance(outcome, UpstreamResponse):
            return self.record_response(host, outcome.status)
        if isinstance(outcome, PerTryTimeout):
            return self.record_local(host, Result.LOCAL_TIMEOUT)
        if outcome.reason is ResetReason.OVERFLOW:
            return None  # the host was never reached
        if outcome.reason.is_connect_failure:
            return self.record_local(host, Result.LOCAL_CONNECT_FAILED)
        return self.record_response(host, 503)

    # --- the sweep -------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Envoy's interval sweep: return hosts whose time is up, then lower the multiplier of every
        host that has stayed healthy for a whole interval since it came back."""
        now = self.clock()
        self._return_due(now)
        for state in self._hosts.values():
            if (state.ejected_at is None and state.last_unejected_at is not None
                    and now - state.last_unejected_at >= self.config.interval and state.backoff > 0):
                state.backoff -= 1

    # --- internals -------------------------------------------------------------------------------------

    def _consecutive_error(self, host: Host, state: _HostState, now: float, reason: str) -> Ejection | None:
        ejection = None
        if state.ejected_at is None:
            ejection = self._eject(host, state, now, reason)
        # Envoy resets the counter that fired whether or not the ejection happened.
        if reason == "consecutive_5xx":
            state.consecutive_5xx = 0
        elif reason == "consecutive_gateway_failure":
            state.consecutive_gateway = 0
        else:
            state.consecutive_local = 0
        return ejection

    def _eject(self, host: Host, state: _HostState, now: float, reason: str) -> Ejection | None:
        active = sum(1 for s in self._hosts.values() if s.ejected_at is not None)
        if 100.0 * (active + 1) / len(self._hosts) > self.config.max_ejection_percent:
            self.overflowed += 1
            return None
        base, cap = self.config.base_ejection_time, self.config.max_ejection_time
        if state.backoff * base < cap + base:
            state.backoff += 1
        state.ejected_at = now
        state.ejected_for = min(base * state.backoff, cap)
        state.times_ejected += 1
        event = Ejection(host, now, state.ejected_for, reason)
        self.events.append(event)
        return event

    def _return_due(self, now: float) -> None:
        for state in self._hosts.values():
            if state.ejected_at is not None and now - state.ejected_at >= state.ejected_for:
                state.ejected_at = None
                state.last_unejected_at = now
                state.consecutive_5xx = state.consecutive_gateway = state.consecutive_local = 0

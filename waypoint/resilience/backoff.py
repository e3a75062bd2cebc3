"""Envoy's fully jittered exponential retry backoff.

Retry n waits a uniformly random whole number of milliseconds in [0, interval_n), where interval_1 is the
base (25 ms unless configured) and each retry doubles it until the cap (10 x base = 250 ms by default).
Full jitter spreads the retries of many clients that failed at the same instant, so they do not hit the
recovering upstream in lockstep.
"""

from __future__ import annotations

import random


class JitteredBackoff:
    def __init__(self, base: float = 0.025, cap: float | None = None, rng: random.Random | None = None) -> None:
        base_ms = round(base * 1000)
        if base_ms <= 0:
            raise ValueError("retry backoff base interval must be at least 1ms")
        cap_ms = round(cap * 1000) if cap is not None else base_ms * 10
        if cap_ms < base_ms:
            raise ValueError("retry backoff max interval must not be below the base interval")
        self._base_ms = base_ms
        self._cap_ms = cap_ms
        self._next_ms = base_ms
        self._rng = rng or random.Random()

    @property
    def cap(self) -> float:
        return self._cap_ms / 1000

    def current_interval(self) -> float:
        """The exclusive upper bound the next call draws below (seconds)."""
        return self._next_ms / 1000

    def next(self) -> float:
        """The wait before the next retry, in seconds; always in [0, cap]."""
        interval = self._next_ms
        # Double until doubling would pass the cap (or overflow), then stay at the cap.
        self._next_ms = interval * 2 if interval < self._cap_ms // 2 else self._cap_ms
        return min(self._rng.randrange(interval), self._cap_ms) / 1000

    def reset(self) -> None:
        self._next_ms = self._base_ms

"""When to fetch a workload certificate again: the sans-IO core of the certificate manager.

The rules, as ztunnel's: renew at half-life; on failure retry with exponential backoff (500 ms doubling,
capped at 150 s); keep serving the old certificate until it expires, then drop it. No clock or I/O here:
callers pass ``now`` and get back how long to wait, so every rule is testable without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mesh.identity.credentials import WorkloadCert
from mesh.identity.spiffe import SpiffeId

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 150.0
MIN_REFRESH_DELAY = 0.1  # never spin, even if a CA hands out a certificate already past half-life


def backoff_delay(failures: int, initial: float = INITIAL_BACKOFF, cap: float = MAX_BACKOFF) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure: 0.5, 1, 2, 4, ... capped at 150."""
    if failures < 1:
        return 0.0
    return min(cap, initial * 2 ** min(failures - 1, 64))


@dataclass
class IdentitySlot:
    """What the agent holds for one identity, and what happened at the last attempts."""

    identity: SpiffeId
    cert: WorkloadCert | None = None
    failures: int = 0
    last_error: str | None = None
    initial_backoff: float = INITIAL_BACKOFF
    max_backoff: float = MAX_BACKOFF

    def usable(self, now: datetime) -> WorkloadCert | None:
        """The certificate to present now, if any: only one inside its validity window."""
        if self.cert is not None and self.cert.not_before <= now <= self.cert.not_after:
            return self.cert
        return None

    def on_success(self, cert: WorkloadCert, now: datetime) -> float:
        """Take the new certificate; return seconds until it should be renewed (its half-life)."""
        self.cert = cert
        self.failures = 0
        self.last_error = None
        return max(MIN_REFRESH_DELAY, (cert.refresh_at - now).total_seconds())

    def on_failure(self, error: str, now: datetime) -> float:
        """Record a failed attempt; drop an expired certificate; return seconds until the next attempt.

        The wait is the backoff, but never past the current certificate's expiry, so expiry is noticed
        (and reported) on time.
        """
        self.failures += 1
        self.last_error = error
        if self.cert is not None and now > self.cert.not_after:
            self.cert = None
        delay = backoff_delay(self.failures, self.initial_backoff, self.max_backoff)
        if self.cert is not None:
            delay = min(delay, max(MIN_REFRESH_DELAY, (self.cert.not_after - now).total_seconds()))
        return delay

    def expire(self, now: datetime) -> bool:
        """Drop the certificate if it has expired; True if one was dropped."""
        if self.cert is not None and now > self.cert.not_after:
            self.cert = None
            return True
        return False

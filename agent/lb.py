"""Endpoint choice for Service VIP traffic: power of two choices on least connections.

Two random healthy endpoints are drawn and the one with fewer active connections wins: close to
least-connections in quality without a global scan or herding onto one idle endpoint (the choice Envoy
and ztunnel make). Endpoints that just refused a connection are skipped for a short while, so one dead
pod does not fail a share of new connections while the config still lists it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class EndpointStats:
    """Live connections per endpoint and recent connect failures, shared by all connections of an agent."""

    active: dict[str, int] = field(default_factory=dict)
    failed_until: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    penalty_s: float = 5.0

    def acquire(self, key: str) -> None:
        self.active[key] = self.active.get(key, 0) + 1

    def release(self, key: str) -> None:
        n = self.active.get(key, 0) - 1
        if n <= 0:
            self.active.pop(key, None)
        else:
            self.active[key] = n

    def mark_failed(self, key: str) -> None:
        self.failed_until[key] = self.clock() + self.penalty_s

    def is_penalised(self, key: str) -> bool:
        until = self.failed_until.get(key)
        if until is None:
            return False
        if until <= self.clock():
            del self.failed_until[key]
            return False
        return True


def pick(
    candidates: Sequence[str],
    stats: EndpointStats,
    exclude: set[str] | frozenset[str] = frozenset(),
    rng: random.Random | None = None,
) -> str | None:
    """Choose one endpoint key; None when every candidate is excluded.

    Endpoints in their failure penalty are used only when nothing else is left (better a likely failure
    than a certain one).
    """
    r = rng or random
    pool = [c for c in candidates if c not in exclude]
    if not pool:
        return None
    fresh = [c for c in pool if not stats.is_penalised(c)]
    if fresh:
        pool = fresh
    if len(pool) == 1:
        return pool[0]
    a, b = r.sample(pool, 2)
    return a if stats.active.get(a, 0) <= stats.active.get(b, 0) else b

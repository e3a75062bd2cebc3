"""Capped exponential backoff with jitter, sans-IO: it says how long to wait, the caller sleeps.

Jitter matters here: every agent of a cluster loses its watches at once when the API server restarts, and
without it they would all come back in the same instant, again and again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.cap < self.initial or self.factor < 1:
            raise ValueError("backoff: need 0 < initial <= cap and factor >= 1")

    def next(self) -> float:
        """The next delay: the capped exponential step, of which a random upper half is taken ("equal jitter")."""
        step = min(self.cap, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return step / 2 + self.rng.uniform(0, step / 2)

    def reset(self) -> None:
        self.attempts = 0

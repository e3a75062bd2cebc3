"""Load balancers with Envoy's algorithms: LEAST_REQUEST (P2C), ROUND_ROBIN, RANDOM, ring hash, Maglev.

Istio's default (`loadBalancer` unset) is LEAST_REQUEST. With equal weights Envoy samples two hosts at
random and takes the one with fewer active requests (power of two choices: near-optimal load spread
without a global scan). With unequal weights it runs an earliest-deadline-first schedule on
weight / (active + 1)^bias. ROUND_ROBIN is EDF on static weights (plain rotation when they are equal).
Consistent hashing keys on a header, a cookie, the source IP or a query parameter; on a ring (or a
Maglev table) adding or removing one of N hosts moves about 1/N of the keys.

Every balancer takes its randomness from an injected `random.Random`, so tests are reproducible. Hosts
are whatever the shell uses (`Endpoint` here); the shell passes only healthy (non-ejected) hosts.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from waypoint.routing import RequestView


@dataclass(frozen=True)
class Endpoint:
    """One upstream host: `address` is `ip:port`, `weight` the endpoint's load-balancing weight."""

    address: str
    weight: int = 1


ActiveRequests = Callable[[Endpoint], int]


def _no_load(_: Endpoint) -> int:
    return 0


@dataclass(frozen=True)
class LbContext:
    """Per-pick inputs: the request's hash (None when the hash policy found no key) and the live
    active-request count of each host (LEAST_REQUEST)."""

    hash_key: int | None = None
    active_requests: ActiveRequests = _no_load


class LoadBalancer(Protocol):
    def choose(self, hosts: Sequence[Endpoint], ctx: LbContext) -> Endpoint | None: ...


class LbKind(StrEnum):
    LEAST_REQUEST = "LEAST_REQUEST"
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"


@dataclass(frozen=True)
class HashPolicy:
    """What the consistent hash keys on; exactly one of the four is set."""

    header: str | None = None
    cookie: str | None = None
    cookie_path: str | None = None
    cookie_ttl: float | None = None
    source_ip: bool = False
    query_parameter: str | None = None


@dataclass(frozen=True)
class LbPolicy:
    kind: LbKind = LbKind.LEAST_REQUEST
    hash_policy: HashPolicy | None = None
    minimum_ring_size: int = 1024
    maglev_table_size: int = 65537
    choice_count: int = 2
    active_request_bias: float = 1.0


def hash64(data: str | bytes) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process, unusable for consistent hashing)."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


# --- hash keys from requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HashResult:
    """The request's hash, and the `Set-Cookie` value to add to the response when the cookie was
    generated (Envoy generates it when the policy has a ttl and the request has no such cookie)."""

    key: int | None
    set_cookie: str | None = None


def request_hash(policy: HashPolicy | None, request: RequestView) -> HashResult:
    if policy is None:
        return HashResult(None)
    if policy.header is not None:
        values = request.headers.get_all(policy.header)
        return HashResult(hash64(",".join(values)) if values else None)
    if policy.cookie is not None:
        value = _cookie(request, policy.cookie)
        if value is not None:
            return HashResult(hash64(value))
        if policy.cookie_ttl is None:
            return HashResult(None)
        generated = secrets.token_hex(8)
        parts = [f"{policy.cookie}={generated}"]
        if policy.cookie_path:
            parts.append(f"Path={policy.cookie_path}")
        if policy.cookie_ttl > 0:
            parts.append(f"Max-Age={int(policy.cookie_ttl)}")
        parts.append("HttpOnly")
        return HashResult(hash64(generated), "; ".join(parts))
    if policy.source_ip:
        return HashResult(hash64(str(request.source_ip)) if request.source_ip else None)
    if policy.query_parameter is not None:
        value = request.query_value(policy.query_parameter)
        return HashResult(hash64(value) if value is not None else None)
    return HashResult(None)


def _cookie(request: RequestView, name: str) -> str | None:
    for header in request.headers.get_all("cookie"):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(header)
        except Exception:  # a malformed Cookie header hashes like a missing cookie
            continue
        if name in jar:
            return jar[name].value
    return None


# --- balancers -------------------------------------------------------------------------------------


def _equal_weights(hosts: Sequence[Endpoint]) -> bool:
    return len({h.weight for h in hosts}) <= 1


class _Edf:
    """Earliest-deadline-first schedule: each host's next deadline advances by 1/weight per pick,
    so over time host i gets weight_i / sum(weights) of the picks, interleaved smoothly."""

    def __init__(self, hosts: Sequence[Endpoint], weight: Callable[[Endpoint], float], rng: random.Random) -> None:
        self._weight = weight
        self._heap: list[tuple[float, int, int]] = []
        self._hosts = list(hosts)
        self._seq = 0
        self.now = 0.0
        # A random start spreads the first picks of many waypoints over different hosts.
        for idx, host in enumerate(self._hosts):
            w = max(weight(host), 1e-9)
            self._push(rng.random() / w, idx)

    def _push(self, deadline: float, idx: int) -> None:
        heapq.heappush(self._heap, (deadline, self._seq, idx))
        self._seq += 1

    def pick(self) -> Endpoint:
        deadline, _, idx = heapq.heappop(self._heap)
        self.now = deadline
        host = self._hosts[idx]
        self._push(deadline + 1.0 / max(self._weight(host), 1e-9), idx)
        return host


class RoundRobin:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._key: tuple[Endpoint, ...] = ()
        self._index = 0
        self._edf: _Edf | None = None

    def choose(self, hosts: Sequence[Endpoint], ctx: LbContext) -> Endpoint | None:
        if not hosts:
            return None
        key = tuple(hosts)
        if key != self._key:
            self._key = key
            self._index = self._rng.randrange(len(hosts))
            self._edf = None if _equal_weights(hosts) else _Edf(hosts, lambda h: h.weight, self._rng)
        if self._edf is not None:
            return self._edf.pick()
        host = hosts[self._index % len(hosts)]
        self._index += 1
        return host


class Random:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, hosts: Sequence[Endpoint], ctx: LbContext) -> Endpoint | None:
        if not hosts:
            return None
        return hosts[self._rng.randrange(len(hosts))]


class LeastRequest:
    """P2C on equal weights; EDF on weight / (active + 1)^bias otherwise (Envoy's two modes)."""

    def __init__(self, rng: random.Random | None = None, choice_count: int = 2, bias: float = 1.0) -> None:
        if choice_count < 2:
            raise ValueError("choice_count must be at least 2")
        self._rng = rng or random.Random()
        self.choice_count = choice_count
        self.bias = bias
        self._key: tuple[Endpoint, ...] = ()
        self._edf: _Edf | None = None
        self._active: ActiveRequests = _no_load

    def choose(self, hosts: Sequence[Endpoint], ctx: LbContext) -> Endpoint | None:
        if not hosts:
            return None
        if _equal_weights(hosts):
            return self._p2c(hosts, ctx.active_requests)
        self._active = ctx.active_requests
        key = tuple(hosts)
        if key != self._key or self._edf is None:
            self._key = key
            self._edf = _Edf(hosts, self._effective_weight, self._rng)
        return self._edf.pick()

    def _effective_weight(self, host: Endpoint) -> float:
        active = self._active(host)
        if self.bias == 0:
            return float(host.weight)
        return host.weight / math.pow(active + 1, self.bias)

    def _p2c(self, hosts: Sequence[Endpoint], active: ActiveRequests) -> Endpoint:
        best: Endpoint | None = None
        best_load = 0
        for _ in range(self.choice_count):
            sampled = hosts[self._rng.randrange(len(hosts))]
            load = active(sampled)
            if best is None or load < best_load:
                best, best_load = sampled, load
        assert best is not None
        return best


class RingHash:
    """Envoy's ketama-style ring: each host owns entries in proportion to its weight, at least
    `minimum_ring_size` in total; a key goes to the first entry clockwise from its hash."""

    def __init__(self, minimum_ring_size: int = 1024, maximum_ring_size: int = 8 * 1024 * 1024,
                 rng: random.Random | None = None) -> None:
        self.minimum_ring_size = minimum_ring_size
        self.maximum_ring_size = maximum_ring_size
        self._rng = rng or random.Random()
        self._key: tuple[Endpoint, ...] = ()
        self._hashes: list[int] = []
        self._owners: list[Endpoint] = []

    def _build(self, hosts: Sequence[Endpoint]) -> None:
        total = sum(h.weight for h in hosts)
        normalized = [(h, h.weight / total) for h in hosts if h.weight > 0]
        min_w = min(w for _, w in normalized)
        scale = min(math.ceil(min_w * self.minimum_ring_size) / min_w, float(self.maximum_ring_size))
        ring: list[tuple[int, Endpoint]] = []
        target = 0.0
        current = 0
        for host, w in normalized:
            target += scale * w
            count = math.floor(target) - current
            for i in range(count):
                ring.append((hash64(f"{host.address}_{i}"), host))
            current += count
        ring.sort(key=lambda e: e[0])
        self._hashes = [h for h, _ in ring]
        self._owners = [o for _, o in ring]

    @property
    def ring_size(self) -> int:
        return len(self._hashes)

    def choose(self, hosts: Sequence[Endpoint], ctx: LbContext) -> Endpoint | None:
        if not hosts or all(h.weight <= 0 for h in hosts):
            return None
        key = tuple(hosts)
        if key != self._key:
            self._key = key
            self._build(hosts)
        h = ctx.hash_key if ctx.hash_key is not None else self._rng.getrandbits(64)
        idx = bisect.bisect_left(self._hashes, h)
        return self._owners[idx % len(self._owners)]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


class Maglev:
    """Google's Maglev table (Envoy's weighted variant): a fixed-size lookup table filled by each host's
    permutation in turn, hosts with higher weight filling more often; O(1) lookups, minimal disruption."""

    def __init__(self, table_size: int = 65537, rng: random.Random | None = None) -> None:
        if not is_prime(table_size):
            raise ValueError("maglev table size must be a prime number")
        self.table_size = table_size
        self._rng = rng or random.Random()
        self._key: tuple[Endpoint, ...] = ()
        self._table: list[Endpoint] = []

    def _build(self, hosts: Sequence[Endpoint]) -> None:
        m = self.table_size
        live = [h for h in hosts if h.weight > 0]
        max_w = max(h.weight for h in live)
        offsets = [hash64(h.address + "#offset") % m for h in live]
        skips = [hash64(h.address + "#skip") % (m - 1) + 1 for h in live]
        nexts = [0] * len(live)
        targets = [0.0] * len(live)
        table: list[Endpoint | None] = [None] * m
        filled = 0
        iteration = 1
        while filled < m:
            for i, host in enumerate(live):
                if filled == m:
                    break
                # A host of the largest weight fills a slot every round; one of a third of it, every
                # third round: the table shares follow the weights.
                if iteration * host.weight < targets[i]:
                    continue
                targets[i] += max_w
                slot = (offsets[i] + nexts[i] * skips[i]) % m
                while table[slot] is not None:
                    nexts[i] += 1
                    slot = (offsets[i] + nexts[i] * skips[i]) % m
                table[slot] = host
                nexts[i] += 1
                filled += 1
            iteration += 1
        self._table = [e for e in table if e is not None]

    def choose(self, hosts: Sequence[Endpoint], ctx: LbContext) -> Endpoint | None:
        if not hosts or all(h.weight <= 0 for h in hosts):
            return None
        key = tuple(hosts)
        if key != self._key:
            self._key = key
            self._build(hosts)
        h = ctx.hash_key if ctx.hash_key is not None else self._rng.getrandbits(64)
        return self._table[h % self.table_size]


def make_balancer(policy: LbPolicy, rng: random.Random | None = None) -> LoadBalancer:
    """The balancer for a DestinationRule `loadBalancer` (PASSTHROUGH is the shell's: no balancing)."""
    rng = rng or random.Random()
    if policy.kind is LbKind.ROUND_ROBIN:
        return RoundRobin(rng)
    if policy.kind is LbKind.RANDOM:
        return Random(rng)
    if policy.kind is LbKind.RING_HASH:
        return RingHash(policy.minimum_ring_size, rng=rng)
    if policy.kind is LbKind.MAGLEV:
        return Maglev(policy.maglev_table_size, rng=rng)
    return LeastRequest(rng, policy.choice_count, policy.active_request_bias)


@dataclass
class HostPicker:
    """Envoy's retry host predicate: on a retry, re-pick (up to `max_attempts` times) while the pick is a
    host already tried, then accept whatever came last. Consistent hashing skips it (Istio omits the
    previous-hosts predicate there, so retries stay sticky)."""

    balancer: LoadBalancer
    max_attempts: int = 5
    tried: list[Endpoint] = field(default_factory=list)

    def pick(self, hosts: Sequence[Endpoint], ctx: LbContext, avoid_previous: bool = True) -> Endpoint | None:
        choice = self.balancer.choose(hosts, ctx)
        if avoid_previous and self.tried:
            for _ in range(self.max_attempts - 1):
                if choice is None or choice not in self.tried:
                    break
                choice = self.balancer.choose(hosts, ctx)
        if choice is not None:
            self.tried.append(choice)
        return choice

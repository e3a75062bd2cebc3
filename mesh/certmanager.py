"""The agent's certificate manager: one fresh certificate per identity with a pod on this node.

Identities are *tracked* when a pod arrives (fetched in the background, a few at a time, so a node with
100 new pods does not stampede the CA) and *requested* when a connection needs one (``get``: fetched at
once, ahead of the background queue, concurrent callers sharing one fetch). Each tracked identity has one
task that renews at half-life and retries failures with backoff; the decisions live in
``mesh.identity.rotation.IdentitySlot`` (sans-IO), this module only sleeps and calls the fetcher.

Metric: ``nodemesh_identity_cert_expiry_timestamp_seconds{identity}`` (Unix time the held certificate
expires; the series disappears when no valid certificate is held) and
``nodemesh_identity_cert_fetches_total{result}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.identity import SpiffeId, WorkloadCert
from mesh.identity.rotation import INITIAL_BACKOFF, MAX_BACKOFF, IdentitySlot

log = logging.getLogger("nodemesh.certmanager")

Fetcher = Callable[[SpiffeId], Awaitable[WorkloadCert]]
Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CertUnavailable(Exception):
    """No valid certificate for an identity could be had; ``reason`` is the last fetch error."""

    def __init__(self, identity: SpiffeId, reason: str) -> None:
        super().__init__(f"no certificate for {identity}: {reason}")
        self.identity = identity
        self.reason = reason


class _Tracked:
    """The asyncio side of one identity: its slot, worker task, wake-up event and waiting callers."""

    def __init__(self, slot: IdentitySlot) -> None:
        self.slot = slot
        self.urgent = asyncio.Event()
        self.waiters: list[asyncio.Future[WorkloadCert]] = []
        self.task: asyncio.Task[None] | None = None


class CertificateManager:
    """Create inside a running event loop; close with ``aclose``."""

    def __init__(
        self,
        fetch: Fetcher,
        *,
        registry: CollectorRegistry | None = None,
        background_concurrency: int = 8,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        fetch_timeout: float = 30.0,
        clock: Clock = _utcnow,
    ) -> None:
        if background_concurrency < 1:
            raise ValueError("background_concurrency must be at least 1")
        self._fetch = fetch
        self._clock = clock
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._fetch_timeout = fetch_timeout
        self._background = asyncio.Semaphore(background_concurrency)
        self._tracked: dict[SpiffeId, _Tracked] = {}
        self._closed = False
        self.registry = registry or CollectorRegistry()
        self.expiry = Gauge(
            "nodemesh_identity_cert_expiry_timestamp_seconds",
            "When the certificate held for an identity expires (Unix time).",
            ["identity"],
            registry=self.registry,
        )
        self.fetches = Counter(
            "nodemesh_identity_cert_fetches", "Certificate fetch attempts by result.", ["result"],
            registry=self.registry,
        )

    # ---- public API ------------------------------------------------------------------------------------

    def track(self, identity: SpiffeId) -> None:
        """Keep a certificate for ``identity`` from now on (fetched in the background)."""
        self._ensure(identity)

    def untrack(self, identity: SpiffeId) -> None:
        """Forget ``identity`` (its last pod left the node): stop renewing, drop the key."""
        tracked = self._tracked.pop(identity, None)
        if tracked is None:
            return
        if tracked.task is not None:
            tracked.task.cancel()
        for waiter in tracked.waiters:
            if not waiter.done():
                waiter.set_exception(CertUnavailable(identity, "identity no longer needed on this node"))
        self._clear_metric(identity)

    def tracked(self) -> set[SpiffeId]:
        return set(self._tracked)

    def current(self, identity: SpiffeId) -> WorkloadCert | None:
        """The valid certificate held for ``identity`` now, without waiting (None if there is none)."""
        tracked = self._tracked.get(identity)
        if tracked is None:
            return None
        cert = tracked.slot.usable(self._clock())
        if cert is None:
            # Expired (or never fetched): the expiry gauge must not go on advertising a certificate that is
            # not served, even in the moment before the renewal loop notices.
            self._clear_metric(identity)
        return cert

    async def get(self, identity: SpiffeId, timeout: float | None = None) -> WorkloadCert:
        """A valid certificate for ``identity``, fetching it at once if none is held.

        Raises CertUnavailable if the fetch fails (the reason is the fetch error) or ``timeout`` passes.
        """
        tracked = self._ensure(identity)
        cert = tracked.slot.usable(self._clock())
        if cert is not None:
            return cert
        waiter: asyncio.Future[WorkloadCert] = asyncio.get_running_loop().create_future()
        tracked.waiters.append(waiter)
        tracked.urgent.set()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise CertUnavailable(identity, f"no certificate within {timeout} s"
                                  + (f" (last error: {tracked.slot.last_error})" if tracked.slot.last_error else "")
                                  ) from None
        finally:
            if waiter in tracked.waiters:
                tracked.waiters.remove(waiter)

    async def aclose(self) -> None:
        self._closed = True
        for identity in list(self._tracked):
            tracked = self._tracked[identity]
            self.untrack(identity)
            if tracked.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await tracked.task

    async def __aenter__(self) -> CertificateManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- internals -------------------------------------------------------------------------------------

    def _ensure(self, identity: SpiffeId) -> _Tracked:
        if self._closed:
            raise RuntimeError("certificate manager is closed")
        if not isinstance(identity, SpiffeId):
            raise TypeError(f"identity must be a SpiffeId, got {type(identity).__name__}")
        tracked = self._tracked.get(identity)
        if tracked is None:
            slot = IdentitySlot(identity, initial_backoff=self._initial_backoff, max_backoff=self._max_backoff)
            tracked = self._tracked[identity] = _Tracked(slot)
            tracked.task = asyncio.get_running_loop().create_task(self._run(tracked), name=f"cert {identity}")
        return tracked

    def _clear_metric(self, identity: SpiffeId) -> None:
        with contextlib.suppress(KeyError):
            self.expiry.remove(str(identity))

    async def _turn(self, tracked: _Tracked) -> bool:
        """Wait for a background slot unless the fetch is urgent; True if a slot is held (to release)."""
        if tracked.urgent.is_set():
            return False
        acquire = asyncio.ensure_future(self._background.acquire())
        urgent = asyncio.ensure_future(tracked.urgent.wait())
        try:
            await asyncio.wait({acquire, urgent}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            urgent.cancel()
            if not acquire.done():
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
        return acquire.done() and not acquire.cancelled()

    async def _sleep(self, tracked: _Tracked, seconds: float) -> None:
        """Sleep ``seconds``, or less if a caller is waiting for a certificate we do not have."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tracked.urgent.wait(), seconds)

    async def _attempt(self, tracked: _Tracked) -> WorkloadCert:
        holds = await self._turn(tracked)
        try:
            cert = await asyncio.wait_for(self._fetch(tracked.slot.identity), self._fetch_timeout)
        finally:
            if holds:
                self._background.release()
        if not isinstance(cert, WorkloadCert) or cert.identity != tracked.slot.identity:
            raise RuntimeError(f"fetcher returned {cert!r} for {tracked.slot.identity}")
        return cert

    async def _run(self, tracked: _Tracked) -> None:
        slot = tracked.slot
        identity = slot.identity
        while True:
            try:
                cert = await self._attempt(tracked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any fetch failure: back off and keep the old certificate
                now = self._clock()
                delay = slot.on_failure(str(exc) or type(exc).__name__, now)
                self.fetches.labels(result="failure").inc()
                held = slot.usable(now)
                if held is None:
                    self._clear_metric(identity)
                    for waiter in tracked.waiters:
                        if not waiter.done():
                            waiter.set_exception(CertUnavailable(identity, slot.last_error or "fetch failed"))
                log.warning("certificate for %s not renewed (attempt %d, retry in %.1fs, %s): %s", identity,
                            slot.failures, delay,
                            f"still serving the old one until {held.not_after.isoformat()}" if held
                            else "no valid certificate held", slot.last_error)
            else:
                now = self._clock()
                delay = slot.on_success(cert, now)
                self.fetches.labels(result="success").inc()
                self.expiry.labels(identity=str(identity)).set(cert.not_after.timestamp())
                for waiter in tracked.waiters:
                    if not waiter.done():
                        waiter.set_result(cert)
                log.info("certificate for %s renewed, expires %s, next renewal in %.1fs", identity,
                         cert.not_after.isoformat(), delay)
            tracked.urgent.clear()
            await self._sleep(tracked, delay)
            if slot.expire(self._clock()):
                self._clear_metric(identity)

"""The Kubernetes watch as a config source: `KubeWatch` + `translate` feeding a `ConfigStore`.

Two rules shape it:

- **Nothing is published before every kind was listed once.** A model built from pods without their
  namespaces' labels, or without the AuthorizationPolicies, would be wrong in the unsafe direction (pods
  not enrolled, traffic allowed that a DENY forbids). A kind the server does not serve at all (404: the
  Gateway API or Istio CRDs are not installed) cannot hold objects, so it does not hold the start up; if
  its CRD is installed later, its objects arrive as ordinary events.
- **A burst of events causes one rebuild.** A namespace label change, a rollout or a re-list after
  410 Gone delivers tens or thousands of events in a row; each one only marks the state dirty, and the
  snapshot is rebuilt once the events stop for `quiet` seconds (or at the latest `max_delay` after the
  first one, so a steady stream still gets through).

Pods are watched cluster-wide, not only this node's: the model needs remote pods (to route to them and to
know who a peer is), and one informer for all pods holds no more than a node-scoped one plus a second
cluster-wide one would. This node's pods, the ones the agent captures, are a filter on the model
(`local_workloads()`, `captured_workloads()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio.client import Configuration

from agent.kube.client import KubeClient
from agent.kube.events import WatchEvent
from agent.kube.informer import Informer
from agent.kube.translate import Skipped, TranslateOptions, Translation, captured, translate
from agent.kube.watch import KubeWatch
from mesh.config.localconfig import dump_local_config
from mesh.config.model import ConfigSet, Workload
from mesh.config.store import ConfigStore

log = logging.getLogger(__name__)

SOURCE_NAME = "kubernetes"


@dataclass
class Debouncer:
    """When to rebuild, sans-IO: `poke(now)` for every event, `due()` says when, `take(now)` consumes.

    Due `quiet` seconds after the latest poke, but never later than `max_delay` after the first poke
    since the last rebuild.
    """

    quiet: float = 0.1
    max_delay: float = 1.0
    first: float | None = None
    last: float | None = None

    def __post_init__(self) -> None:
        if self.quiet < 0 or self.max_delay < self.quiet:
            raise ValueError("debounce: need 0 <= quiet <= max_delay")

    def poke(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def due(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)

    def take(self, now: float) -> bool:
        """True (and reset) when a rebuild is due at `now`."""
        due = self.due()
        if due is None or now < due:
            return False
        self.first = self.last = None
        return True


def _absent(informer: Informer) -> bool:
    """The server answered 404 for the whole kind: its resource (a CRD) is not installed."""
    return not informer.synced.is_set() and (informer.last_error or "").startswith("ApiStatusError: 404")


class KubeSource:
    """Keeps the store's contribution `name` equal to the translation of what the watch holds.

    `configuration` is a kubernetes-asyncio `Configuration` or a `KubeClient`; `node_name` is this agent's
    node (for `local_workloads`), never a watch filter.
    """

    def __init__(self, store: ConfigStore, configuration: Configuration | KubeClient, node_name: str | None, *,
                 options: TranslateOptions | None = None, name: str = SOURCE_NAME, priority: int = 0,
                 quiet: float = 0.1, max_delay: float = 1.0, backoff: tuple[float, float] = (0.5, 30.0),
                 watch_timeout: tuple[int, int] = (300, 600)) -> None:
        self.store = store
        self.node_name = node_name
        self.options = options or TranslateOptions(root_namespace=store.root_namespace)
        self.name = name
        self.priority = priority
        self.watch = KubeWatch(configuration, None, default_handler=self._on_event, backoff=backoff,
                               watch_timeout=watch_timeout)
        self.translation: Translation | None = None
        self.rebuilds = 0
        self.events = 0
        self._debounce = Debouncer(quiet, max_delay)
        self._poked = asyncio.Event()
        self._published = asyncio.Event()
        self._reported: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.watch.start()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"config-source-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.watch.stop()

    async def __aenter__(self) -> KubeSource:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_published(self, timeout: float | None = None) -> None:
        """Until the first complete state is in the store."""
        await asyncio.wait_for(self._published.wait(), timeout)

    @property
    def published(self) -> bool:
        return self._published.is_set()

    # --- the loop ----------------------------------------------------------------------------------

    def _on_event(self, event: WatchEvent) -> None:
        self.events += 1
        self._debounce.poke(asyncio.get_running_loop().time())
        self._poked.set()

    def _ready(self) -> bool:
        return all(i.synced.is_set() or _absent(i) for i in self.watch.informers.values())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._ready():
            await asyncio.sleep(0.05)
        missing = sorted(k for k, i in self.watch.informers.items() if not i.synced.is_set())
        if missing:
            log.warning("the API server does not serve %s; starting without them", ", ".join(missing))
        self._debounce.take(float("inf"))
        self._poked.clear()
        self.rebuild()
        self._published.set()
        while True:
            await self._poked.wait()
            while True:
                due = self._debounce.due()
                if due is None or self._debounce.take(loop.time()):
                    break
                self._poked.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poked.wait(), max(due - loop.time(), 0.0))
            self._poked.clear()
            try:
                self.rebuild()
            except Exception:  # a bug in one rebuild must not end the source: the last good state stays
                log.exception("rebuilding the mesh config from the cluster failed; keeping the previous state")

    def rebuild(self) -> Translation:
        """Translate what the watch holds now and make it this source's contribution."""
        objects = {kind: informer.cache.objects for kind, informer in self.watch.informers.items()}
        translation = translate(objects, self.options)
        self.translation = translation
        self.rebuilds += 1
        self._report(translation.skipped, translation.warnings)
        self.store.replace(self.name, translation.config, priority=self.priority)
        return translation

    def _report(self, skipped: tuple[Skipped, ...], warnings: tuple[str, ...]) -> None:
        """Log each skipped object and warning once (not on every rebuild), and again if it comes back."""
        current = {f"skipping {s}" for s in skipped} | set(warnings)
        for line in sorted(current - self._reported):
            log.warning("%s", line)
        self._reported = current

    # --- what it holds -----------------------------------------------------------------------------

    @property
    def config(self) -> ConfigSet:
        return self.translation.config if self.translation is not None else ConfigSet()

    def local_workloads(self) -> list[Workload]:
        """The workloads on this agent's node (enrolled or not)."""
        return [w for w in self.config.workloads if self.node_name and w.node == self.node_name]

    def captured_workloads(self) -> list[Workload]:
        """The workloads on this node whose traffic the agent captures."""
        return [w for w in self.local_workloads() if captured(w)]

    def config_dump(self) -> dict[str, Any]:
        """This source's contribution as JSON-ready data (the local config format, plus the waypoint
        policies and waypoints), sorted: two agents that see the same cluster produce equal dumps, whatever
        server incarnation or event order brought them there."""
        translation = self.translation
        dump: dict[str, Any] = json.loads(dump_local_config(self.config))
        dump["waypoints"] = {} if translation is None else {
            key: {"for": wp.waypoint_for, "address": str(wp.address.destination),
                  "hboneMtlsPort": wp.address.hbone_mtls_port} for key, wp in translation.waypoints.items()}
        dump["waypointPolicies"] = [] if translation is None else [tp.key for tp in translation.waypoint_policies]
        return dump

    def status(self) -> Mapping[str, Any]:
        """For the admin page: whether the state is complete, and what was left out and why."""
        translation = self.translation
        return {
            "source": self.name,
            "published": self.published,
            "synced": {k: i.synced.is_set() for k, i in sorted(self.watch.informers.items())},
            "lastErrors": {k: i.last_error for k, i in sorted(self.watch.informers.items()) if i.last_error},
            "events": self.events,
            "rebuilds": self.rebuilds,
            "skipped": [str(s) for s in translation.skipped] if translation else [],
            "warnings": list(translation.warnings) if translation else [],
        }

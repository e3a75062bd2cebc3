"""List, then watch from the list's resourceVersion, for one kind; forever, whatever the server does.

The loop a client-go reflector runs, with the same answers to the same troubles:
- BOOKMARK events move the resume point without any object changing, so a quiet watch can resume cheaply;
- 410 Gone (history compacted, or a restarted server whose versions our old one predates) and "resource
  version too large" (a server that restarted with fresh state) mean: list again, and emit the difference;
- a dropped connection or an error means: wait (capped exponential backoff with jitter), then resume the
  watch from the last resourceVersion seen, listing again only if that is refused;
- an object that fails its kind's check, or a line that is not a watch event, is logged and skipped.
Handler exceptions are logged and never stop the informer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from agent.kube.backoff import Backoff
from agent.kube.cache import ObjectCache, Rejected
from agent.kube.client import ApiStatusError, KubeClient, WatchStreamError
from agent.kube.events import Handler, WatchEvent
from agent.kube.kinds import Kind

log = logging.getLogger(__name__)


class ResyncNeeded(Exception):
    """The watch cannot resume from our resourceVersion: list again."""


class Informer:
    def __init__(self, client: KubeClient, kind: Kind, handler: Handler, *, field_selector: str | None = None,
                 label_selector: str | None = None, backoff: Backoff | None = None, page_size: int = 500,
                 watch_timeout: tuple[int, int] = (300, 600)) -> None:
        self.client = client
        self.kind = kind
        self.handler = handler
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.backoff = backoff or Backoff()
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.cache = ObjectCache(kind)
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.lists = 0  # how many complete lists were done (1 + re-lists)
        self.rejected: list[Rejected] = []  # the latest skipped objects, newest last (bounded)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"informer-{self.kind.plural}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    # --- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        need_list = True
        resyncs = 0  # re-lists in a row without a working watch in between
        while True:
            try:
                if need_list:
                    await self._list_and_replace()
                    need_list = False
                started = time.monotonic()
                delivered = await self._watch_once()
                if delivered or time.monotonic() - started > 5:
                    self.backoff.reset()
                    resyncs = 0
                    continue
                await asyncio.sleep(self.backoff.next())  # a watch that ends at once, repeatedly: slow down
            except ResyncNeeded as why:
                log.info("%s: %s; listing again", self.kind.plural, why)
                need_list = True
                resyncs += 1
                if resyncs > 1:  # the first re-list is immediate; a server that keeps refusing gets backoff
                    await asyncio.sleep(self.backoff.next())
            except asyncio.CancelledError:
                raise
            except (ApiStatusError, WatchStreamError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
                self.last_error = f"{type(err).__name__}: {err}"
                delay = self.backoff.next()
                quiet = isinstance(err, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError)
                log.log(logging.INFO if quiet else logging.WARNING, "%s: %s %s; retrying in %.2fs", self.kind.plural,
                        "list failed:" if need_list else "watch broke:", self.last_error, delay)
                await asyncio.sleep(delay)

    async def _list_and_replace(self) -> None:
        items: list[Any] = []
        params = {**self._params(), "limit": str(self.page_size)}
        while True:
            try:
                doc = await self.client.list(self.kind.path, params)
            except ApiStatusError as err:
                if err.gone and "continue" in params:  # the snapshot we were paging through expired
                    items, params = [], {**self._params(), "limit": str(self.page_size)}
                    continue
                raise
            items.extend(doc.get("items") or [])
            meta = doc.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
            params = {**self._params(), "limit": str(self.page_size), "continue": str(token)}
        rv = (doc.get("metadata") or {}).get("resourceVersion")
        if not isinstance(rv, str) or not rv:
            raise ApiStatusError(200, "BadResponse", "the list has no metadata.resourceVersion")
        events, rejected = self.cache.replace(items)
        self._note_rejected(rejected)
        self.resource_version = rv
        self.lists += 1
        log.debug("%s: listed %d objects at resourceVersion %s", self.kind.plural, len(self.cache.objects), rv)
        for event in events:
            await self._emit(event)
        self.synced.set()

    async def _watch_once(self) -> int:
        """Watch until the stream ends; returns how many events (bookmarks included) it delivered."""
        low, high = self.watch_timeout
        timeout = random.randint(low, high)
        params = {**self._params(), "resourceVersion": self.resource_version or "",
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)}
        delivered = 0
        try:
            async for line in self.client.watch(self.kind.path, params, read_timeout=timeout + 30):
                delivered += await self._handle_line(line)
        except ApiStatusError as err:
            if err.gone or err.too_large:
                raise ResyncNeeded(f"watch from resourceVersion {self.resource_version} refused: "
                                   f"{err.code} {err.reason}") from None
            raise
        return delivered

    async def _handle_line(self, line: bytes) -> int:
        try:
            event = json.loads(line)
        except ValueError:
            self._note_rejected([Rejected("watch line", f"not JSON: {line[:80]!r}")])
            return 0
        if not isinstance(event, Mapping) or not isinstance(event.get("type"), str):
            self._note_rejected([Rejected("watch line", "not a watch event (no type)")])
            return 0
        kind, obj = event["type"], event.get("object")
        if kind == "ERROR":
            err = ApiStatusError.from_status(obj)
            if err.gone or err.too_large:
                raise ResyncNeeded(f"watch from resourceVersion {self.resource_version} answered "
                                   f"{err.code} {err.reason}")
            raise err
        rv = (obj.get("metadata") or {}).get("resourceVersion") if isinstance(obj, Mapping) and \
            isinstance(obj.get("metadata"), Mapping) else None
        if kind == "BOOKMARK":
            if isinstance(rv, str) and rv:
                self.resource_version = rv
            return 1
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            self._note_rejected([Rejected("watch line", f"unknown event type {kind!r}")])
            return 0
        emitted, rejected = self.cache.apply(kind, obj)
        if isinstance(rv, str) and rv:
            self.resource_version = rv  # even a skipped object moves us past its version
        if rejected is not None:
            self._note_rejected([rejected])
        if emitted is not None:
            await self._emit(emitted)
        return 1

    def _note_rejected(self, rejected: list[Rejected]) -> None:
        for r in rejected:
            log.warning("%s: skipping %s: %s", self.kind.plural, r.where, r.reason)
        self.rejected = (self.rejected + rejected)[-100:]

    async def _emit(self, event: WatchEvent) -> None:
        try:
            result = self.handler(event)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the handler failed on %s %s", self.kind.plural, event.type, event.key)

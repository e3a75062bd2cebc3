"""Waypoint config from a directory of the YAML users `kubectl apply`, polled for changes.

Each change syncs the store to exactly what the files say (a removed resource is removed). A resource
that fails validation is logged once with the message naming its field, and the last good version of it
stays in force (the store's rule); a file that is not valid YAML deletes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from waypoint.config.files import config_files, sync_paths
from waypoint.config.store import ApplyResult, ConfigStore, Outcome

log = logging.getLogger("waypoint.config")


class ConfigDirSource:
    def __init__(self, store: ConfigStore, paths: Sequence[str | os.PathLike[str]], interval: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.store = store
        self.paths = [Path(p) for p in paths]
        self.interval = interval
        self.last_results: list[ApplyResult] = []
        self._signature: tuple[tuple[str, int, int, int], ...] | None = None
        self._reported: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        for path in config_files(self.paths):
            try:
                st = path.stat()
            except OSError:
                out.append((str(path), -1, -1, -1))
                continue
            out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def poll(self) -> bool:
        """Sync if anything changed; True when the files were read."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        results = sync_paths(self.store, self.paths)
        self.last_results = results
        messages = set()
        for r in results:
            if r.outcome is Outcome.REJECTED:
                text = r.message + (" (the previously accepted version stays in force)" if r.kept_previous else "")
                messages.add(text)
                if text not in self._reported:
                    log.error("waypoint config rejected: %s", text)
            elif r.outcome is Outcome.ACCEPTED and r.warnings:
                for w in r.warnings:
                    key = f"{r.ref}: {w}"
                    messages.add(key)
                    if key not in self._reported:
                        log.warning("waypoint config: %s", key)
        self._reported = messages
        return True

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._stat)  # keep slow filesystems off the loop's critical path
                self.poll()
            except Exception:
                log.exception("reading the waypoint config failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.poll()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="waypoint-config-dir")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""A config file watched for changes and fed into the store.

Polling (stat, then a content hash) rather than inotify: it works on every filesystem, including the
bind mounts and ConfigMap symlink swaps Kubernetes uses, and the files are small. A file that fails to
parse is refused as a whole: the error (with the bad field's path) is logged once and kept in
`last_error`, and the store keeps the last good contribution, so a typo never drops the running
state. The blocking read happens on a worker thread; the store is updated on the event loop's thread,
so subscribers run where the agent's connections live.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh.config.errors import ConfigError
from mesh.config.labstate import parse_lab_state
from mesh.config.localconfig import parse_local_config
from mesh.config.model import ConfigSet
from mesh.config.store import ConfigStore

log = logging.getLogger(__name__)

Parser = Callable[[bytes], ConfigSet]


@dataclass(frozen=True)
class _Read:
    stat_key: tuple[int, int, int] | None
    data: bytes | None
    error: str | None


class FileSource:
    """Keeps the store's contribution named `name` equal to the parsed content of `path`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        store: ConfigStore,
        parse: Parser = parse_local_config,
        *,
        name: str | None = None,
        interval: float = 1.0,
        priority: int = 0,
        rehash_every: int = 10,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.path = Path(path)
        self.store = store
        self.parse = parse
        self.name = name or f"file:{self.path}"
        self.interval = interval
        self.priority = priority
        self.rehash_every = max(1, rehash_every)
        self.last_error: str | None = None
        self.loads = 0
        self.failures = 0
        self._stat_key: tuple[int, int, int] | None = None
        self._hash: bytes | None = None
        self._polls = 0
        self._task: asyncio.Task[None] | None = None

    # --- the two halves of a poll ----------------------------------------------------------------------

    def _read(self) -> _Read:
        """Blocking part: stat, and read only when the file may have changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return _Read(None, None, f"{self.path}: file not found")
        except OSError as exc:
            return _Read(None, None, f"{self.path}: {exc.strerror or exc}")
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._polls += 1
        if key == self._stat_key and self._polls % self.rehash_every:
            return _Read(key, None, None)
        try:
            return _Read(key, self.path.read_bytes(), None)
        except OSError as exc:
            return _Read(None, None, f"{self.path}: {exc.strerror or exc}")

    def _apply(self, read: _Read) -> bool:
        """Event-loop part: parse new content and swap it into the store. True when the store changed."""
        if read.error is not None:
            self._stat_key = None
            self._fail(read.error, None)
            return False
        self._stat_key = read.stat_key
        if read.data is None:
            return False
        digest = hashlib.sha256(read.data).digest()
        if digest == self._hash:
            return False
        self._hash = digest
        try:
            config = self.parse(read.data)
        except ConfigError as exc:
            self._fail(f"{self.path}: {exc}", digest)
            return False
        except Exception as exc:  # a parser bug must not kill the watcher or the agent
            log.exception("parsing %s failed unexpectedly", self.path)
            self._fail(f"{self.path}: {type(exc).__name__}: {exc}", digest)
            return False
        before = self.store.snapshot.version
        self.store.replace(self.name, config, priority=self.priority)
        self.loads += 1
        if self.last_error is not None:
            log.info("config file %s is valid again and was loaded", self.path)
        self.last_error = None
        return self.store.snapshot.version != before

    def _fail(self, message: str, digest: bytes | None) -> None:
        if message != self.last_error:
            self.failures += 1
            kept = "keeping the last good state" if self.loads else "nothing loaded yet"
            log.error("config file refused (%s): %s", kept, message)
        self.last_error = message
        if digest is None:
            self._hash = None

    # --- driving it ------------------------------------------------------------------------------------

    def poll(self) -> bool:
        """One synchronous check (for tests, tools and the first load before the loop runs)."""
        return self._apply(self._read())

    async def poll_async(self) -> bool:
        return self._apply(await asyncio.to_thread(self._read))

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await self.poll_async()
            await asyncio.sleep(self.interval)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"config-{self.name}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> FileSource:
        await self.poll_async()
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def local_config_source(path: str | os.PathLike[str], store: ConfigStore, **kw: object) -> FileSource:
    """A ztunnel-format local config file."""
    return FileSource(path, store, parse_local_config, **kw)  # type: ignore[arg-type]


def lab_state_source(path: str | os.PathLike[str], store: ConfigStore, **kw: object) -> FileSource:
    """A netns lab's state file (pods -> workloads, services -> services)."""
    kw.setdefault("name", f"lab:{Path(path).stem}")
    return FileSource(path, store, parse_lab_state, **kw)  # type: ignore[arg-type]


def policy_file_source(path: str | os.PathLike[str], store: ConfigStore, **kw: object) -> FileSource:
    """A file of Istio AuthorizationPolicy objects (what users `kubectl apply`)."""
    from mesh.config.istio import parse_policy_file

    kw.setdefault("name", f"policies:{path}")
    return FileSource(path, store, parse_policy_file, **kw)  # type: ignore[arg-type]

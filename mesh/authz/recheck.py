"""Re-checking live connections after the mesh state changed.

A policy added while connections are open must close the ones it now denies (ztunnel's "late
rejection"); connections opened before a policy that would have refused them must not live on. The
decision is the same pure `authorize` used for new connections, run against the new snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from mesh.authz.l4 import ConnInfo, Decision, authorize
from mesh.config.store import ConfigStore, MeshSnapshot, SnapshotChange

log = logging.getLogger(__name__)

T = TypeVar("T")


def _as_info(item: object) -> ConnInfo:
    if isinstance(item, ConnInfo):
        return item
    raise TypeError(f"{item!r} is not a ConnInfo; pass info= to say how to get one")


def connections_to_close(
    state: MeshSnapshot,
    live: Iterable[T],
    info: Callable[[T], ConnInfo] = _as_info,  # type: ignore[assignment]
) -> list[tuple[T, Decision]]:
    """The live connections `state` now denies, each with the decision that denies it.

    `live` may hold the agent's own connection objects; `info` says how to get a ConnInfo from one.
    """
    out = []
    for item in live:
        decision = authorize(info(item), state)
        if not decision.allowed:
            out.append((item, decision))
    return out


def enforce_on_change(
    store: ConfigStore,
    live: Callable[[], Iterable[T]],
    close: Callable[[T, Decision], None],
    info: Callable[[T], ConnInfo] = _as_info,  # type: ignore[assignment]
) -> Callable[[], None]:
    """Subscribe to `store`: after every change that can affect authorization, call `close` for each
    live connection now denied. `close` runs in the thread that changed the store (an asyncio agent
    hands it to its loop with `call_soon_threadsafe`). Returns the unsubscribe function."""

    def on_change(change: SnapshotChange) -> None:
        if not change.authz_changed:
            return
        for item, decision in connections_to_close(change.new, list(live()), info):
            log.info("closing connection now denied: %s", decision)
            try:
                close(item, decision)
            except Exception:
                log.exception("closing a denied connection failed")

    return store.subscribe(on_change)

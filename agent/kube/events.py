"""What the watch layer tells the rest of the agent: an object of a kind was added, changed or deleted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class WatchEvent:
    """`obj` is the raw object as the API server sent it (for DELETED: its last known state); `old` is the
    previous state for MODIFIED. Handlers must treat both as read-only: the informer's cache shares them."""

    kind: str
    type: EventType
    key: str  # "namespace/name", or "name" for cluster-scoped kinds
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None = None


Handler = Callable[[WatchEvent], Awaitable[None] | None]

"""The informer's view of one kind, sans-IO: it turns lists and watch events into add/update/delete events.

`replace()` takes a complete list (the first one, or a re-list after 410 Gone or a server restart) and
returns the difference from what was known: ADDED for new objects, MODIFIED for changed ones and DELETED
for those that vanished, so the agent converges without ever being told "start over". Objects that fail
their kind's check are dropped with the reason, never stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.kube.events import EventType, WatchEvent
from agent.kube.kinds import Kind

# Metadata that changes on every write or with every server incarnation without changing what an object says.
VOLATILE_META = ("resourceVersion", "managedFields")


def comparable(obj: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(obj)
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        out["metadata"] = {k: v for k, v in meta.items() if k not in VOLATILE_META}
    return out


@dataclass
class Rejected:
    """An object that was skipped, and why (for logs and tests)."""

    where: str
    reason: str


@dataclass
class ObjectCache:
    kind: Kind
    objects: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    def replace(self, items: Iterable[Any]) -> tuple[list[WatchEvent], list[Rejected]]:
        fresh: dict[str, Mapping[str, Any]] = {}
        rejected: list[Rejected] = []
        for n, obj in enumerate(items):
            problem = self.kind.problem(obj)
            if problem:
                rejected.append(Rejected(f"list item {n} ({_describe(obj)})", problem))
                continue
            fresh[self.kind.key(obj)] = obj
        events = []
        for key, old in list(self.objects.items()):
            if key not in fresh:
                events.append(WatchEvent(self.kind.name, EventType.DELETED, key, old))
        for key, obj in fresh.items():
            old = self.objects.get(key)
            if old is None:
                events.append(WatchEvent(self.kind.name, EventType.ADDED, key, obj))
            elif comparable(old) != comparable(obj):
                events.append(WatchEvent(self.kind.name, EventType.MODIFIED, key, obj, old))
        self.objects = fresh
        return events, rejected

    def apply(self, event_type: str, obj: Any) -> tuple[WatchEvent | None, Rejected | None]:
        """One watch event; returns the event to emit (None when nothing changed) or why it was skipped."""
        problem = self.kind.problem(obj)
        if problem:
            return None, Rejected(f"{event_type} event ({_describe(obj)})", problem)
        key = self.kind.key(obj)
        old = self.objects.get(key)
        if event_type == "DELETED":
            if old is None:
                return None, None
            del self.objects[key]
            return WatchEvent(self.kind.name, EventType.DELETED, key, obj), None
        self.objects[key] = obj
        if old is None:
            return WatchEvent(self.kind.name, EventType.ADDED, key, obj), None
        if comparable(old) == comparable(obj):
            return None, None
        return WatchEvent(self.kind.name, EventType.MODIFIED, key, obj, old), None


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping) and isinstance(obj.get("metadata"), Mapping):
        meta = obj["metadata"]
        return "/".join(str(p) for p in (meta.get("namespace"), meta.get("name")) if p) or "no name"
    return type(obj).__name__

"""Watch fan-out: one `WatchStream` per client watch, fed synchronously by the store in rv order.

A stream keeps the client's filter (namespace, label and field selectors) and turns each change into the
event that client must see: an object that stops matching a selector is DELETED for it, one that starts
matching is ADDED, as on the real server. Lines wait in an unbounded queue; a client that falls too far
behind is cut off (the real server does the same), and will resume or list again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.kube.apiserver.kinds import ResourceType
from mesh.kube.apiserver.selectors import FieldSelector, LabelSelector
from mesh.kube.apiserver.store import Change, matches

MAX_BACKLOG = 10000


@dataclass(frozen=True)
class Drop:
    """Sentinel: end the stream; `abort` resets the connection instead of ending it cleanly."""

    abort: bool


class WatchStream:
    def __init__(self, rtype: ResourceType, namespace: str | None, labels: LabelSelector, fields: FieldSelector,
                 render: Callable[[str, Any], bytes] | None = None) -> None:
        self.rtype = rtype
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.render = render  # for Table watches (kubectl get -w); None: the object as JSON
        self.queue: asyncio.Queue[bytes | Drop] = asyncio.Queue()
        self.closed = False

    def selects(self, key: tuple[str, str], obj: Any) -> bool:
        if self.namespace is not None and key[0] != self.namespace:
            return False
        return matches(obj, self.labels, self.fields)

    def event_for(self, change: Change) -> str | None:
        """The event type this client sees for `change`, or None when it is not its business."""
        if change.rtype is not self.rtype:
            return None
        now = self.selects(change.key, change.obj)
        if change.type == "ADDED":
            return "ADDED" if now else None
        if change.type == "DELETED":
            return "DELETED" if now else None
        before = change.prev is not None and self.selects(change.key, change.prev)
        if before and now:
            return "MODIFIED"
        if now:
            return "ADDED"
        return "DELETED" if before else None

    def line(self, event: str, change: Change) -> bytes:
        if self.render is not None:
            return self.render(event, change.obj)
        return change.encoded(event)

    def offer(self, change: Change) -> None:
        if self.closed:
            return
        event = self.event_for(change)
        if event is not None:
            self.put(self.line(event, change))

    def put(self, line: bytes) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= MAX_BACKLOG:
            self.drop(abort=False)
            return
        self.queue.put_nowait(line)

    def drop(self, abort: bool) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(Drop(abort))


def encode_event(event: str, obj: Any) -> bytes:
    return json.dumps({"type": event, "object": obj}, separators=(",", ":")).encode() + b"\n"


def bookmark(rtype: ResourceType, rv: int, initial_events_end: bool = False) -> bytes:
    meta: dict[str, Any] = {"resourceVersion": str(rv), "creationTimestamp": None}
    if initial_events_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return encode_event("BOOKMARK", {"kind": rtype.kind, "apiVersion": rtype.group_version, "metadata": meta})

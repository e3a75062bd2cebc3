"""The cluster's state: objects, one resourceVersion counter, and the history that watches resume from.

Sans-IO and synchronous: every write runs to completion inside one call (there is no await in here), so
writes are totally ordered by resourceVersion, watchers are told in that order, and no lock is needed in
the asyncio server around it. Controllers (endpointslices, namespaces, garbage collection) hook in after
each write and may write in turn; their writes are queued so that the caller's write is complete first.

History is a bounded log of changes with the object before and after. It gives watches their resume point,
`resourceVersionMatch=Exact` lists and paginated lists their consistent snapshot, and `compact()` drops it,
after which an older resourceVersion is answered with 410 Gone, as etcd compaction does.

The counter starts from the wall clock in microseconds by default, so a restarted server (which has lost
all state) never hands out a resourceVersion its previous incarnation used: clients holding an old one get
410 and list again, which is how they converge.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mesh.kube.apiserver import admission, kinds
from mesh.kube.apiserver.errors import ApiError, already_exists, bad_request, conflict, expired, invalid, not_found
from mesh.kube.apiserver.kinds import Registry, ResourceType
from mesh.kube.apiserver.patch import (
    APPLY_PATCH,
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    StrategicMerge,
    json_patch,
    merge_patch,
)
from mesh.kube.apiserver.selectors import FieldSelector, LabelSelector

Key = tuple[str, str]  # (namespace or "", name)
log = logging.getLogger(__name__)
IMMORTAL_NAMESPACES = ("default", "kube-system", "kube-public")  # the real server refuses to delete these
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Change:
    """One committed write: the event every watcher of its type may see."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    rtype: ResourceType
    key: Key
    obj: Any  # the object after the write (for DELETED: its last state)
    prev: Any | None  # the object before the write (None for ADDED)
    _encoded: dict[str, bytes] = field(default_factory=dict, repr=False)

    def encoded(self, event_type: str) -> bytes:
        """The watch line, serialised once however many watchers send it."""
        line = self._encoded.get(event_type)
        if line is None:
            line = json.dumps({"type": event_type, "object": self.obj}, separators=(",", ":")).encode() + b"\n"
            self._encoded[event_type] = line
        return line


Listener = Callable[[Change], None]


class Store:
    def __init__(self, registry: Registry | None = None, *, start_rv: int | None = None, max_events: int = 10000,
                 service_cidr: str = "10.96.0.0/12", default_namespaces: bool = True) -> None:
        self.registry = registry or Registry()
        self.rv = start_rv if start_rv is not None else time.time_ns() // 1000
        self.compacted_rv = self.rv
        self.max_events = max_events
        self.service_cidr = ipaddress.ip_network(service_cidr)
        self._objects: dict[ResourceType, dict[Key, Any]] = {t: {} for t in self.registry.types}
        self._log: deque[Change] = deque()
        self._watchers: list[Listener] = []
        self._controllers: list[Listener] = []
        self._pending: deque[Change] = deque()
        self._draining = False
        if default_namespaces:
            for ns in DEFAULT_NAMESPACES:
                self.create(kinds.CORE_NAMESPACES, None, {"metadata": {"name": ns}})

    # --- subscription ------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Watch fan-out: called synchronously, in resourceVersion order, for every committed change."""
        self._watchers.append(listener)
        return lambda: self._watchers.remove(listener) if listener in self._watchers else None

    @property
    def has_controllers(self) -> bool:
        return bool(self._controllers)

    def add_controller(self, controller: Listener) -> None:
        """Called after each change, once the write that caused it has returned; may write itself."""
        self._controllers.append(controller)

    # --- reads -------------------------------------------------------------------------------------

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects[rtype].get((namespace or "", name))
        if obj is None:
            raise not_found(rtype.plural, name, rtype.group)
        return copy.deepcopy(obj)

    def peek(self, rtype: ResourceType, namespace: str | None, name: str) -> Any | None:
        """The stored object without copying (read-only use by controllers)."""
        return self._objects[rtype].get((namespace or "", name))

    def items(self, rtype: ResourceType, namespace: str | None = None) -> Iterator[tuple[Key, Any]]:
        for key in sorted(self._objects[rtype]):
            if namespace is None or key[0] == namespace:
                yield key, self._objects[rtype][key]

    def snapshot(self, rtype: ResourceType, at_rv: int | None = None) -> dict[Key, Any]:
        """The objects of `rtype` as they were at `at_rv` (default: now); 410 if that history is compacted."""
        objs = dict(self._objects[rtype])
        if at_rv is None or at_rv >= self.rv:
            return objs
        if at_rv < self.compacted_rv:
            raise expired(f"too old resource version: {at_rv} ({self.compacted_rv})")
        for change in reversed(self._log):
            if change.rv <= at_rv:
                break
            if change.rtype is rtype:
                if change.prev is None:
                    objs.pop(change.key, None)
                else:
                    objs[change.key] = change.prev
        return objs

    def list(self, rtype: ResourceType, namespace: str | None = None, labels: LabelSelector | None = None,
             fields: FieldSelector | None = None, at_rv: int | None = None) -> list[Any]:
        objs = self.snapshot(rtype, at_rv)
        out = []
        for key in sorted(objs):
            obj = objs[key]
            if namespace is not None and key[0] != namespace:
                continue
            if not matches(obj, labels, fields):
                continue
            out.append(obj)
        return copy.deepcopy(out)

    def changes_since(self, rv: int) -> list[Change]:
        """The changes after `rv`; 410 Gone when `rv` is older than the retained history."""
        if rv < self.compacted_rv:
            raise expired(f"too old resource version: {rv} ({self.compacted_rv})")
        return [c for c in self._log if c.rv > rv]

    # --- writes ------------------------------------------------------------------------------------

    def create(self, rtype: ResourceType, namespace: str | None, body: Any) -> dict[str, Any]:
        obj = admission.check_envelope(rtype, copy.deepcopy(body), namespace)
        meta = obj["metadata"]
        for f in admission.SERVER_META:
            meta.pop(f, None)
        if not meta.get("name") and isinstance(meta.get("generateName"), str) and meta["generateName"]:
            meta["name"] = self._generate_name(rtype, meta.get("namespace", ""), meta["generateName"])
        admission.validate_meta(rtype, obj)
        ns = meta.get("namespace", "") if rtype.namespaced else ""
        if rtype.namespaced:
            self._require_namespace(ns)
        key = (ns, meta["name"])
        if key in self._objects[rtype]:
            raise already_exists(rtype.plural, meta["name"], rtype.group)
        admission.default_on_create(rtype, obj)
        if rtype is kinds.CORE_SERVICES:
            self._allocate_cluster_ip(obj)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        return copy.deepcopy(self._commit("ADDED", rtype, key, obj, None))

    def update(self, rtype: ResourceType, namespace: str | None, name: str, body: Any,
               subresource: str | None = None) -> dict[str, Any]:
        key = (namespace or "" if rtype.namespaced else "", name)
        old = self._objects[rtype].get(key)
        if old is None:
            raise not_found(rtype.plural, name, rtype.group)
        new = admission.check_envelope(rtype, copy.deepcopy(body), namespace if rtype.namespaced else None)
        if new["metadata"].get("name") not in (None, name):
            raise bad_request(f"the name of the object ({new['metadata'].get('name')}) does not match the name on "
                              f"the URL ({name})")
        new["metadata"]["name"] = name
        asked_rv = new["metadata"].get("resourceVersion")
        if asked_rv not in (None, "") and str(asked_rv) != old["metadata"]["resourceVersion"]:
            raise conflict(rtype.plural, name, rtype.group)
        return self._write(rtype, key, old, new, subresource)

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, content_type: str, patch: Any,
              subresource: str | None = None) -> dict[str, Any]:
        key = (namespace or "" if rtype.namespaced else "", name)
        old = self._objects[rtype].get(key)
        if old is None:
            raise not_found(rtype.plural, name, rtype.group)
        if content_type == JSON_PATCH:
            new = json_patch(old, patch)
        elif content_type == MERGE_PATCH:
            if not isinstance(patch, dict):
                raise bad_request("merge patch: the body must be a JSON object")
            new = merge_patch(old, patch)
        elif content_type == STRATEGIC_MERGE_PATCH and rtype.supports_strategic_merge:
            new = StrategicMerge(rtype.merge_keys, rtype.merge_sets).apply(old, patch)
        else:
            accepted = [JSON_PATCH, MERGE_PATCH] + ([STRATEGIC_MERGE_PATCH] if rtype.supports_strategic_merge else [])
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"{', '.join(accepted)}"
                           + (" (server-side apply is not implemented by this test double)"
                              if content_type == APPLY_PATCH else ""))
        asked_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        if asked_rv not in (None, "") and str(asked_rv) != old["metadata"]["resourceVersion"]:
            raise conflict(rtype.plural, name, rtype.group)
        new = admission.check_envelope(rtype, new, namespace if rtype.namespaced else None)
        if new["metadata"].get("name") != name:
            raise bad_request("a patch cannot change metadata.name")
        return self._write(rtype, key, old, new, subresource)

    def delete(self, rtype: ResourceType, namespace: str | None, name: str,
               precondition_uid: str | None = None, precondition_rv: str | None = None) -> dict[str, Any]:
        key = (namespace or "" if rtype.namespaced else "", name)
        old = self._objects[rtype].get(key)
        if old is None:
            raise not_found(rtype.plural, name, rtype.group)
        if precondition_uid and precondition_uid != old["metadata"].get("uid"):
            raise conflict(rtype.plural, name, rtype.group)
        if precondition_rv and precondition_rv != old["metadata"].get("resourceVersion"):
            raise conflict(rtype.plural, name, rtype.group)
        if rtype is kinds.CORE_NAMESPACES and name in IMMORTAL_NAMESPACES:
            raise ApiError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                           {"name": name, "kind": "namespaces"})
        finalizers = (old.get("metadata") or {}).get("finalizers") or []
        if rtype is kinds.CORE_NAMESPACES or finalizers:
            if (old.get("metadata") or {}).get("deletionTimestamp"):
                return copy.deepcopy(old)
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            if rtype is kinds.CORE_NAMESPACES:
                new.setdefault("status", {})["phase"] = "Terminating"
            return copy.deepcopy(self._commit("MODIFIED", rtype, key, new, old))
        return copy.deepcopy(self._commit("DELETED", rtype, key, old, old))

    def finalize_namespace(self, name: str) -> None:
        """The namespace controller's last step: the namespace is empty, remove it."""
        key = ("", name)
        old = self._objects[kinds.CORE_NAMESPACES].get(key)
        if old is not None and (old.get("metadata") or {}).get("deletionTimestamp"):
            self._commit("DELETED", kinds.CORE_NAMESPACES, key, old, old)

    def inject_raw(self, rtype: ResourceType, namespace: str, name: str, obj: Any) -> None:
        """Store `obj` as it is, without any check, and tell watchers: how tests plant a malformed object."""
        key = (namespace, name)
        prev = self._objects[rtype].get(key)
        self.rv += 1
        self._objects[rtype][key] = obj
        self._record(Change(self.rv, "ADDED" if prev is None else "MODIFIED", rtype, key, obj, prev))

    def compact(self, rv: int | None = None) -> None:
        """Forget history up to `rv` (default: all of it), as etcd compaction does."""
        target = self.rv if rv is None else min(rv, self.rv)
        while self._log and self._log[0].rv <= target:
            self._log.popleft()
        self.compacted_rv = max(self.compacted_rv, target)

    # --- internals ---------------------------------------------------------------------------------

    def _write(self, rtype: ResourceType, key: Key, old: Any, new: dict[str, Any],
               subresource: str | None) -> dict[str, Any]:
        if subresource not in (None, "status") or (subresource == "status" and "status" not in rtype.subresources):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                            f"({rtype.plural}/{subresource})")
        meta = new["metadata"]
        for f in admission.SERVER_META:
            if f in old["metadata"]:
                meta[f] = old["metadata"][f]
            else:
                meta.pop(f, None)
        if old["metadata"].get("deletionTimestamp") and "deletionTimestamp" not in meta:
            meta["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif rtype.status_subresource:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        admission.validate_meta(rtype, new)
        admission.check_update(rtype, old, new)
        if _spec_part(new) != _spec_part(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if _without_rv(new) == _without_rv(old):
            return copy.deepcopy(old)  # a no-op write does not bump the resourceVersion, as on the real server
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and rtype is not kinds.CORE_NAMESPACES:
            return copy.deepcopy(self._commit("DELETED", rtype, key, new, old))
        return copy.deepcopy(self._commit("MODIFIED", rtype, key, new, old))

    def _commit(self, event: str, rtype: ResourceType, key: Key, obj: dict[str, Any], prev: Any) -> Any:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if event == "DELETED":
            self._objects[rtype].pop(key, None)
        else:
            self._objects[rtype][key] = obj
        self._record(Change(self.rv, event, rtype, key, obj, prev))
        return obj

    def _record(self, change: Change) -> None:
        self._log.append(change)
        while len(self._log) > self.max_events:
            self.compacted_rv = self._log.popleft().rv
        for watcher in list(self._watchers):
            watcher(change)
        self._pending.append(change)
        if self._draining:
            return
        self._draining = True
        try:
            while self._pending:
                pending = self._pending.popleft()
                for controller in self._controllers:
                    try:
                        controller(pending)
                    except Exception:  # a controller's bug must not turn a committed write into an error
                        log.exception("controller %r failed on %s %s/%s", controller, pending.type,
                                      pending.rtype.plural, "/".join(pending.key))
        finally:
            self._draining = False
            self._pending.clear()

    def _require_namespace(self, ns: str) -> None:
        existing = self._objects[kinds.CORE_NAMESPACES].get(("", ns))
        if existing is None:
            raise not_found("namespaces", ns)
        if (existing.get("metadata") or {}).get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {ns} because it is "
                                             "being terminated",
                           {"name": ns, "kind": "namespaces",
                            "causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace"}]})

    def _generate_name(self, rtype: ResourceType, ns: str, prefix: str) -> str:
        alphabet = "bcdfghjklmnpqrstvwxz2456789"
        for _ in range(100):
            name = prefix[:58] + "".join(secrets.choice(alphabet) for _ in range(5))
            if (ns, name) not in self._objects[rtype]:
                return name
        raise ApiError(500, "InternalError", "could not generate a unique name")

    def _allocate_cluster_ip(self, obj: dict[str, Any]) -> None:
        spec = obj.setdefault("spec", {})
        if spec.get("type", "ClusterIP") == "ExternalName":
            return
        asked = spec.get("clusterIP")
        used = {(o.get("spec") or {}).get("clusterIP") for _, o in self.items(kinds.CORE_SERVICES)}
        if asked == "None":
            spec["clusterIPs"] = ["None"]
        elif asked:
            if asked in used:
                raise invalid("Service", obj["metadata"]["name"], [
                    ("spec.clusterIPs", f'Invalid value: ["{asked}"]: failed to allocate IP {asked}: '
                                        "provided IP is already allocated")])
            spec["clusterIPs"] = [asked]
        else:
            free = next((str(h) for h in self.service_cidr.hosts() if str(h) not in used
                         and int(h) - int(self.service_cidr.network_address) > 10), None)
            if free is None:
                raise ApiError(500, "InternalError", f"no free cluster IP left in {self.service_cidr}")
            spec["clusterIP"], spec["clusterIPs"] = free, [free]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")


def matches(obj: Any, labels: LabelSelector | None, fields: FieldSelector | None) -> bool:
    """Whether a stored object is selected; an object too malformed to read is never selected."""
    if not isinstance(obj, dict):
        return (labels is None or labels.empty) and (fields is None or fields.empty)
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    if labels is not None and not labels.empty and not labels.matches(meta.get("labels") or {}):
        return False
    return fields is None or fields.empty or fields.matches(obj)


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _without_rv(obj: dict[str, Any]) -> dict[str, Any]:
    out = dict(obj)
    out["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return out

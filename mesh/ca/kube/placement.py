"""Pod placement from the Kubernetes API: the identities on node N are the service accounts of the pods
whose `spec.nodeName` is N.

The CA keeps every pod's (node, service account, uid) in memory from a list+watch of all pods (the same
bookkeeping as Istio's node authorizer, which indexes pods by node and service account), so each signing
request is answered from memory. The watch is the reflector loop client-go runs: resume from the last
resourceVersion after a dropped connection, list again after 410 Gone or a server that restarted with
fresh state, back off (with jitter) while the server is unreachable.

Fail closed: before the first complete list, and when the watch has been broken for longer than
`max_stale` seconds, `identities_on_node` raises PlacementError and the CA refuses to sign, rather than
answer from a picture of the cluster that may be arbitrarily old. Pods in a terminal phase (Succeeded,
Failed) no longer run anything and authorise nothing; a malformed pod is logged and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from mesh.ca.kube.api import KubeApi, KubeApiError
from mesh.ca.placement import PlacementError
from mesh.identity import IdentityError, SpiffeId
from mesh.identity.spiffe import DEFAULT_TRUST_DOMAIN

log = logging.getLogger("nodemesh.ca.kube")

PODS_PATH = "/api/v1/pods"
TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class PodFacts:
    """What the CA needs to know about one pod."""

    namespace: str
    name: str
    uid: str
    node: str
    service_account: str
    phase: str

    @property
    def running(self) -> bool:
        """Scheduled and not finished: its identity may be needed on its node."""
        return bool(self.node) and self.phase not in TERMINAL_PHASES


class _Resync(Exception):
    """The watch cannot resume: list again."""


def pod_facts(obj: Any) -> PodFacts:
    """The facts of a pod object, or ValueError naming the field that is unusable."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    meta, spec, status = (obj.get(k) or {} for k in ("metadata", "spec", "status"))
    for name, part in (("metadata", meta), ("spec", spec), ("status", status)):
        if not isinstance(part, Mapping):
            raise ValueError(f"{name}: not an object")
    values = {}
    for path, part, key in (("metadata.namespace", meta, "namespace"), ("metadata.name", meta, "name"),
                            ("metadata.uid", meta, "uid"), ("spec.nodeName", spec, "nodeName"),
                            ("spec.serviceAccountName", spec, "serviceAccountName"), ("status.phase", status, "phase")):
        value = part.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: not a string")
        values[key] = value or ""
    if not values["namespace"] or not values["name"]:
        raise ValueError("metadata.name/namespace: missing")
    return PodFacts(values["namespace"], values["name"], values["uid"], values["nodeName"],
                    values["serviceAccountName"] or "default", values["phase"])


class KubePodPlacement:
    """A `PlacementSource` (and pod lookup for token authentication) fed by a watch on all pods."""

    def __init__(self, api: KubeApi, trust_domain: str = DEFAULT_TRUST_DOMAIN, *, max_stale: float = 60.0,
                 backoff: tuple[float, float] = (0.5, 30.0), watch_timeout: tuple[int, int] = (240, 480),
                 page_size: int = 500) -> None:
        self.api = api
        self.trust_domain = trust_domain
        self.max_stale = max_stale
        self.backoff = backoff
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.resource_version: str | None = None
        self.lists = 0
        self.last_error: str | None = None
        self._pods: dict[tuple[str, str], PodFacts] = {}
        self._by_node: dict[str, dict[SpiffeId, int]] = {}
        self._ids: dict[tuple[str, str], SpiffeId | None] = {}
        self._synced = asyncio.Event()
        self._broken_since: float | None = None
        self._attempts = 0
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ca-pod-placement")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._synced.wait(), timeout)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    # --- the PlacementSource protocol ----------------------------------------------------------------

    def _check_fresh(self) -> None:
        if not self._synced.is_set():
            raise PlacementError(f"pods not listed from the API server {self.api.host} yet"
                                 + (f" ({self.last_error})" if self.last_error else ""))
        if self._broken_since is not None:
            stale = time.monotonic() - self._broken_since
            if stale > self.max_stale:
                raise PlacementError(f"the pod watch on {self.api.host} has been broken for {stale:.0f}s "
                                     f"({self.last_error})")

    def identities_on_node(self, node: str) -> set[SpiffeId]:
        self._check_fresh()
        return set(self._by_node.get(node, {}))

    def pod(self, namespace: str, name: str) -> PodFacts | None:
        """A pod as last seen (None when unknown); PlacementError while the view cannot be trusted."""
        self._check_fresh()
        return self._pods.get((namespace, name))

    def describe(self) -> str:
        return f"kube:{self.api.host}"

    # --- the index -----------------------------------------------------------------------------------

    def _identity(self, pod: PodFacts) -> SpiffeId | None:
        key = (pod.namespace, pod.service_account)
        if key not in self._ids:
            try:
                self._ids[key] = SpiffeId(self.trust_domain, pod.namespace, pod.service_account)
            except IdentityError as exc:
                log.warning("pod %s/%s: its service account gives no valid identity: %s", pod.namespace,
                            pod.name, exc)
                self._ids[key] = None
        return self._ids[key]

    def _count(self, pod: PodFacts, delta: int) -> None:
        sid = self._identity(pod) if pod.running else None
        if sid is None:
            return
        counts = self._by_node.setdefault(pod.node, {})
        counts[sid] = counts.get(sid, 0) + delta
        if counts[sid] <= 0:
            del counts[sid]
            if not counts:
                del self._by_node[pod.node]

    def _put(self, pod: PodFacts) -> None:
        key = (pod.namespace, pod.name)
        old = self._pods.get(key)
        if old is not None:
            self._count(old, -1)
        self._pods[key] = pod
        self._count(pod, +1)

    def _remove(self, namespace: str, name: str) -> None:
        old = self._pods.pop((namespace, name), None)
        if old is not None:
            self._count(old, -1)

    def _replace(self, pods: list[PodFacts]) -> None:
        self._pods, self._by_node = {}, {}
        for pod in pods:
            self._put(pod)

    # --- list and watch ------------------------------------------------------------------------------

    def _delay(self) -> float:
        low, cap = self.backoff
        step = min(cap, low * 2 ** min(self._attempts, 32))
        self._attempts += 1
        return step / 2 + random.uniform(0, step / 2)

    def _broken(self, err: BaseException) -> None:
        self.last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if self._broken_since is None:
            self._broken_since = time.monotonic()

    def _healthy(self) -> None:
        self._broken_since = None
        self._attempts = 0

    async def _run(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch_once()
            except _Resync as why:
                log.info("pod watch: %s; listing again", why)
                need_list = True
            except asyncio.CancelledError:
                raise
            except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
                self._broken(err)
                delay = self._delay()
                log.warning("pod %s failed: %s; retrying in %.2fs", "list" if need_list else "watch",
                            self.last_error, delay)
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        pods: list[PodFacts] = []
        params = {"limit": str(self.page_size)}
        while True:
            try:
                doc = await self.api.request("GET", PODS_PATH, params, timeout=60.0)
            except KubeApiError as err:
                if err.code == 410 and "continue" in params:  # the snapshot being paged through expired
                    pods, params = [], {"limit": str(self.page_size)}
                    continue
                raise
            items = doc.get("items")
            for n, item in enumerate(items if isinstance(items, list) else []):
                try:
                    pods.append(pod_facts(item))
                except ValueError as exc:
                    log.warning("pod list item %d skipped: %s", n, exc)
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
            token = meta.get("continue")
            if not token:
                break
            params = {"limit": str(self.page_size), "continue": str(token)}
        rv = meta.get("resourceVersion")
        if not isinstance(rv, str) or not rv:
            raise KubeApiError(200, "BadResponse", "the pod list has no metadata.resourceVersion")
        self._replace(pods)
        self.resource_version = rv
        self.lists += 1
        self._healthy()
        self._synced.set()
        log.info("pod placement: %d pods on %d nodes at resourceVersion %s", len(self._pods), len(self._by_node), rv)

    async def _watch_once(self) -> None:
        low, high = self.watch_timeout
        timeout = random.randint(low, high)
        params = {"resourceVersion": self.resource_version or "", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout)}
        try:
            async for line in self.api.watch(PODS_PATH, params, read_timeout=timeout + 30, on_open=self._healthy):
                self._handle(line)
        except KubeApiError as err:
            if err.resync:
                raise _Resync(f"resuming from resourceVersion {self.resource_version} refused: {err}") from None
            raise

    def _handle(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("pod watch: skipping a line that is not JSON")
            return
        if not isinstance(event, Mapping):
            log.warning("pod watch: skipping a line that is not a watch event")
            return
        kind, obj = event.get("type"), event.get("object")
        if kind == "ERROR":
            err = KubeApiError.from_status(obj)
            if err.resync:
                raise _Resync(f"the watch from resourceVersion {self.resource_version} answered {err}")
            raise err
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if kind == "BOOKMARK":
            if isinstance(rv, str) and rv:
                self.resource_version = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("pod watch: skipping an event of unknown type %r", kind)
            return
        if isinstance(rv, str) and rv:
            self.resource_version = rv
        try:
            pod = pod_facts(obj)
        except ValueError as exc:
            log.warning("pod watch: skipping a %s event: %s", kind, exc)
            return
        if kind == "DELETED":
            self._remove(pod.namespace, pod.name)
        else:
            self._put(pod)

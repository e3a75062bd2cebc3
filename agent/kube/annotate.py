"""Recording capture on the pod, as Istio does: `ambient.istio.io/redirection: enabled`.

Users and tools (`kubectl get pod -o yaml`, Istio's own tooling) read the annotation to know whether a
pod's traffic is in the mesh, so it is set once the capture is installed and removed once it is taken
down while the pod lives on. It is a JSON merge patch on the pod alone (the agent's ClusterRole has
`patch` on pods and nothing else that writes).

Patches go out from one background task, newest wish per pod wins, so a burst of enrolments is a
queue, not a storm, and a flapping label ends in the last state. A pod that no longer exists (404) is
dropped; other failures are retried with backoff, up to a bound, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

log = logging.getLogger("nodemesh.kube.annotate")

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
ENABLED = "enabled"
MERGE_PATCH = "application/merge-patch+json"


def redirection_patch(enabled: bool) -> dict[str, Any]:
    """The merge patch that sets (or, with None, removes) the annotation. Sans-IO."""
    return {"metadata": {"annotations": {REDIRECTION_ANNOTATION: ENABLED if enabled else None}}}


def has_annotation(pod: Mapping[str, Any] | None) -> bool:
    if not isinstance(pod, Mapping):
        return False
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return isinstance(annotations, Mapping) and annotations.get(REDIRECTION_ANNOTATION) == ENABLED


class PodApi:
    """The two pod requests enrolment makes (get and merge patch), raw JSON in and out."""

    def __init__(self, configuration: Configuration) -> None:
        self._api = ApiClient(configuration)

    async def close(self) -> None:
        await self._api.close()

    async def _call(self, method: str, path: str, body: Any = None, content_type: str | None = None,
                    timeout: float = 10.0) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        response = await self._api.call_api(
            path, method, header_params=headers, body=body, auth_settings=["BearerToken"],
            _preload_content=False, _request_timeout=aiohttp.ClientTimeout(total=timeout))
        try:
            raw = await response.read()
        finally:
            response.release()
        try:
            return response.status, json.loads(raw) if raw else {}
        except ValueError:
            return response.status, {"message": raw[:200].decode(errors="replace")}

    async def get(self, path: str) -> tuple[int, Any]:
        """(HTTP status, body); status 0 when the server could not be reached."""
        try:
            return await self._call("GET", path)
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return 0, {"message": str(err) or type(err).__name__}

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> tuple[int, Any]:
        try:
            return await self._call("PATCH", path, dict(patch), MERGE_PATCH)
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return 0, {"message": str(err) or type(err).__name__}


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"


class RedirectionAnnotator:
    """`want(ns, name, enabled)` records the wish; the task patches when the cached pod differs."""

    def __init__(self, api: PodApi, current: Callable[[str, str], Mapping[str, Any] | None], *,
                 attempts: int = 6, backoff: float = 0.5) -> None:
        self.api = api
        self.current = current  # the watch cache's view of a pod, to skip patches that change nothing
        self.attempts = attempts
        self.backoff = backoff
        self._wanted: dict[tuple[str, str], bool] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.patches = 0

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="pod-annotator")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def want(self, namespace: str, name: str, enabled: bool) -> None:
        self._wanted[(namespace, name)] = enabled
        self._dirty.set()

    def pending(self) -> dict[tuple[str, str], bool]:
        return dict(self._wanted)

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            while self._wanted:
                key, enabled = next(iter(self._wanted.items()))
                await self._apply(key, enabled)
                if self._wanted.get(key) == enabled:
                    del self._wanted[key]

    async def _apply(self, key: tuple[str, str], enabled: bool) -> None:
        namespace, name = key
        pod = self.current(namespace, name)
        if pod is not None and has_annotation(pod) == enabled:
            return
        if pod is None and enabled is False:
            return  # the pod is gone: nothing to take off
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            status, body = await self.api.merge_patch(pod_path(namespace, name), redirection_patch(enabled))
            if 200 <= status < 300:
                self.patches += 1
                return
            if status == 404:
                return
            if self._wanted.get(key) not in (None, enabled):
                return  # changed its mind meanwhile; the newer wish is next
            message = body.get("message") if isinstance(body, Mapping) else body
            log.warning("pod %s/%s: cannot %s the %s annotation (attempt %d/%d): HTTP %s %s", namespace, name,
                        "set" if enabled else "remove", REDIRECTION_ANNOTATION, attempt, self.attempts, status,
                        message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

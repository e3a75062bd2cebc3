"""A small Kubernetes REST client for the waypoint's controller and config watch (list, watch, get,
create, replace, merge-patch status, delete), over kubernetes-asyncio's connection handling.

Objects stay plain JSON dicts: the waypoint validates the resources it reads itself (with the messages
users need), and the kinds it writes are built by hand. The waypoint may not depend on the agent, so this
is its own, deliberately minimal, client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

from mesh.kube.config import load_configuration as load_configuration  # the shared loader, re-exported

log = logging.getLogger("waypoint.kube")
MERGE = "application/merge-patch+json"


class KubeError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def resource_path(group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  sub: str | None = None) -> str:
    root = f"/apis/{group}/{version}" if group else f"/api/{version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class Kube:
    def __init__(self, configuration: Configuration) -> None:
        self.api = ApiClient(configuration)

    async def close(self) -> None:
        await self.api.close()

    async def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                      params: Mapping[str, str] | None = None, timeout: float = 30.0) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        response = await self.api.call_api(
            path, method, query_params=list((params or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=timeout))
        try:
            raw = await response.read()
        finally:
            response.release()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"message": raw[:200].decode(errors="replace")}
        if not 200 <= response.status < 300:
            raise KubeError(response.status, str(doc.get("message", "")) if isinstance(doc, dict) else str(doc))
        return doc

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)  # type: ignore[no-any-return]
        except KubeError as exc:
            if exc.code == 404:
                return None
            raise

    async def watch(self, path: str, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        params = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true")]
        response = await self.api.call_api(
            path, "GET", query_params=params, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_read=600))
        try:
            if response.status != 200:
                raise KubeError(response.status, (await response.read())[:200].decode(errors="replace"))
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            log.warning("skipping a malformed watch line from %s", path)
        finally:
            response.release()


async def list_and_watch(kube: Kube, path: str, on_event: Callable[[dict[str, Any]], Any],
                         on_sync: Callable[[list[dict[str, Any]]], Any] | None = None,
                         stop: asyncio.Event | None = None) -> None:
    """Keep `on_event` fed with ADDED/MODIFIED/DELETED events of `path`, relisting after 410 or errors."""
    backoff = 0.2
    while stop is None or not stop.is_set():
        try:
            listed = await kube.request("GET", path)
            items = listed.get("items") or []
            if on_sync is not None:
                result = on_sync(items)
                if asyncio.iscoroutine(result):
                    await result
            else:
                for item in items:
                    result = on_event({"type": "ADDED", "object": item})
                    if asyncio.iscoroutine(result):
                        await result
            rv = str((listed.get("metadata") or {}).get("resourceVersion") or "0")
            backoff = 0.2
            async for event in kube.watch(path, rv):
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "BOOKMARK":
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    continue
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        break
                    log.warning("watch %s: %s", path, obj.get("message"))
                    continue
                result = on_event(event)
                if asyncio.iscoroutine(result):
                    await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("list/watch %s failed (%s); retrying in %.1fs", path, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

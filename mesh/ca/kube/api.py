"""The CA's few requests to the API server: TokenReview, and list/watch/get of pods.

kubernetes-asyncio brings the connection (kubeconfig or in-cluster service account, token refresh, TLS to
the cluster CA); bodies are read as raw JSON so an odd object is judged by the caller, field by field,
instead of failing a whole deserialisation. The CA lives in `mesh` and does not use the agent's watch
layer (dependencies point from the agent to `mesh`, never back), so this is its own small client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

# The shared loader; re-exported under the names this package has always used.
from mesh.kube.config import KubeConfigError as KubeConfigurationError  # noqa: F401
from mesh.kube.config import load_configuration as load_configuration

MAX_LINE = 16 * 1024 * 1024


class KubeApiError(Exception):
    """The API server answered with an error (a `Status`), or not at all in a usable way."""

    def __init__(self, code: int, reason: str, message: str, causes: tuple[str, ...] = ()) -> None:
        super().__init__(f"{code} {reason}: {message}" if code else message)
        self.code = code
        self.reason = reason
        self.message = message
        self.causes = causes

    @classmethod
    def from_status(cls, status: Any, http_code: int = 0) -> KubeApiError:
        if isinstance(status, Mapping):
            details = status.get("details")
            raw = details.get("causes") if isinstance(details, Mapping) else None
            causes = tuple(str(c.get("reason")) for c in raw if isinstance(c, Mapping)) if isinstance(raw, list) else ()
            return cls(int(status.get("code") or http_code or 0), str(status.get("reason") or ""),
                       str(status.get("message") or ""), causes)
        return cls(http_code, "", str(status)[:200])

    @property
    def resync(self) -> bool:
        """The watch cannot resume from our resourceVersion (410 Gone, or a server that restarted with
        fresh state and has not reached it): list again."""
        return self.code == 410 or "ResourceVersionTooLarge" in self.causes


class KubeApi:
    """JSON in, JSON out. One per CA process; `close()` when done."""

    def __init__(self, configuration: Configuration) -> None:
        self.configuration = configuration
        self._api = ApiClient(configuration)

    @property
    def host(self) -> str:
        return str(self.configuration.host)

    async def close(self) -> None:
        await self._api.close()

    async def _call(self, method: str, path: str, params: Mapping[str, str] | None, body: Any,
                    timeout: aiohttp.ClientTimeout) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return await self._api.call_api(
            path, method, query_params=list((params or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
        )

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None, body: Any = None,
                      timeout: float = 10.0) -> dict[str, Any]:
        response = await self._call(method, path, params, body, aiohttp.ClientTimeout(total=timeout))
        try:
            raw = await response.read()
        finally:
            response.release()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise KubeApiError(response.status, "BadResponse", "the response is not JSON") from None
        if not 200 <= response.status < 300:
            raise KubeApiError.from_status(doc, response.status)
        if not isinstance(doc, dict):
            raise KubeApiError(response.status, "BadResponse", "the response is not an object")
        return doc

    async def watch(self, path: str, params: Mapping[str, str], read_timeout: float,
                    on_open: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
        """The raw lines of a watch stream; ends when the server ends it. `on_open` is called once the
        server accepted the watch (before any line), so a caller can tell a live stream from a dead one."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=read_timeout)
        response = await self._call("GET", path, {**params, "watch": "true"}, None, timeout)
        try:
            if not 200 <= response.status < 300:
                raw = await response.read()
                try:
                    doc: Any = json.loads(raw)
                except ValueError:
                    doc = raw.decode(errors="replace")
                raise KubeApiError.from_status(doc, response.status)
            if on_open is not None:
                on_open()
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield line
                if len(buffer) > MAX_LINE:
                    raise KubeApiError(0, "BadResponse", f"a watch line is longer than {MAX_LINE} bytes")
            if buffer.strip():
                yield buffer
        finally:
            response.release()

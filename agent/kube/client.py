"""The two requests an informer makes, list and watch, over kubernetes-asyncio's HTTP client.

kubernetes-asyncio brings the connection handling: kubeconfig and in-cluster credentials, bearer token
refresh, TLS with the cluster CA. Responses are read raw rather than through its generated models, so that
an object the models would refuse (or silently mangle) reaches the kind's own check and is skipped alone,
and so that watch lines are parsed one by one with a size limit.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

MAX_LINE = 16 * 1024 * 1024


class ApiStatusError(Exception):
    """The server answered with an error `Status` (or an HTTP error without one)."""

    def __init__(self, code: int, reason: str, message: str, status: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}

    @classmethod
    def from_status(cls, status: Any, http_code: int = 0) -> ApiStatusError:
        if isinstance(status, Mapping):
            return cls(int(status.get("code") or http_code or 0), str(status.get("reason") or ""),
                       str(status.get("message") or ""), status)
        return cls(http_code, "", str(status)[:200])

    @property
    def gone(self) -> bool:
        """410: the resourceVersion is too old; list again."""
        return self.code == 410

    @property
    def too_large(self) -> bool:
        """The server has not reached our resourceVersion (it restarted with fresh state): list again."""
        causes = (self.status.get("details") or {}).get("causes") or [] if isinstance(self.status, Mapping) else []
        return any(isinstance(c, Mapping) and c.get("reason") == "ResourceVersionTooLarge" for c in causes)


class WatchStreamError(Exception):
    """The watch stream broke in a way that is not a server Status (a line too long, bad chunking)."""


class KubeClient:
    def __init__(self, configuration: Configuration) -> None:
        self.configuration = configuration
        self._api = ApiClient(configuration)

    @property
    def host(self) -> str:
        return str(self.configuration.host)

    async def close(self) -> None:
        await self._api.close()

    async def _get(self, path: str, params: Mapping[str, str], timeout: aiohttp.ClientTimeout) -> Any:
        return await self._api.call_api(
            path, "GET", query_params=list(params.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
        )

    async def list(self, path: str, params: Mapping[str, str], timeout: float = 60.0) -> dict[str, Any]:
        response = await self._get(path, params, aiohttp.ClientTimeout(total=timeout))
        try:
            body = await response.read()
        finally:
            response.release()
        try:
            doc = json.loads(body)
        except ValueError:
            raise ApiStatusError(response.status, "BadResponse", "the list response is not JSON") from None
        if not 200 <= response.status < 300:
            raise ApiStatusError.from_status(doc, response.status)
        if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list) \
                or not isinstance(doc.get("metadata", {}), dict):
            raise ApiStatusError(response.status, "BadResponse", "the list response has no items/metadata")
        return doc

    async def watch(self, path: str, params: Mapping[str, str], read_timeout: float) -> AsyncIterator[bytes]:
        """The raw lines of a watch stream; ends when the server ends it."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=read_timeout)
        response = await self._get(path, {**params, "watch": "true"}, timeout)
        try:
            if not 200 <= response.status < 300:
                body = await response.read()
                try:
                    doc: Any = json.loads(body)
                except ValueError:
                    doc = body.decode(errors="replace")
                raise ApiStatusError.from_status(doc, response.status)
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield line
                if len(buffer) > MAX_LINE:
                    raise WatchStreamError(f"a watch line is longer than {MAX_LINE} bytes")
            if buffer.strip():
                yield buffer
        finally:
            response.release()

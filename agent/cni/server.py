"""The agent's end of the CNI plugin's socket: HTTP/1.1 over a unix socket, one request per pod event.

The socket is the only way in, so it is created mode 0600 (the runtime runs the plugin as root) in a
directory shared with the host. The handler answers an ADD only when the pod's redirection and
listeners exist, which is what makes the plugin's wait meaningful; anything it cannot finish in time is
an error, and the plugin fails the ADD (fail closed).

Routes:
- `POST /v1/cni/add`   {containerId, netns, ifname, podNamespace, podName, podUid, ips} -> {captured, reason}
- `POST /v1/cni/del`   {containerId, netns, podNamespace, podName, podUid} -> {}
- `GET  /v1/cni/check?namespace=&name=&netns=` -> {ok, reason}
- `GET  /v1/cni/status` -> 200 when the agent can capture pods, 503 otherwise
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger("nodemesh.cni")

MAX_BODY = 64 * 1024


class CniRequestError(ValueError):
    """A request from the plugin is malformed; the message names the field."""


class CniNotReady(Exception):
    """The agent cannot decide yet (its view of the cluster is not complete): the plugin should retry."""


class CniCaptureFailed(Exception):
    """The pod is in the mesh but its capture could not be installed."""


def _text(doc: Mapping[str, Any], key: str, *, required: bool = True, limit: int = 4096) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise CniRequestError(f"{key}: expected a string")
    if required and not value:
        raise CniRequestError(f"{key}: missing")
    if len(value) > limit or "\x00" in value:
        raise CniRequestError(f"{key}: not a plausible value")
    return value


@dataclass(frozen=True)
class CniPodEvent:
    """What the plugin knows about a pod sandbox."""

    container_id: str
    netns: str
    pod_namespace: str
    pod_name: str
    pod_uid: str = ""
    ifname: str = "eth0"
    ips: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}"

    @classmethod
    def parse(cls, doc: Any, *, add: bool) -> CniPodEvent:
        if not isinstance(doc, Mapping):
            raise CniRequestError("body: expected a JSON object")
        ips = doc.get("ips", [])
        if not isinstance(ips, list):
            raise CniRequestError("ips: expected a list")
        parsed = []
        for n, ip in enumerate(ips):
            try:
                parsed.append(str(ipaddress.ip_address(ip)))
            except ValueError:
                raise CniRequestError(f"ips[{n}]: {ip!r} is not an IP address") from None
        netns = _text(doc, "netns", required=add)
        if netns and not netns.startswith("/"):
            raise CniRequestError("netns: expected an absolute path")
        return cls(container_id=_text(doc, "containerId", required=add), netns=netns,
                   pod_namespace=_text(doc, "podNamespace", limit=63), pod_name=_text(doc, "podName", limit=253),
                   pod_uid=_text(doc, "podUid", required=False, limit=64),
                   ifname=_text(doc, "ifname", required=False, limit=15) or "eth0", ips=tuple(parsed))


@dataclass(frozen=True)
class CniDecision:
    captured: bool
    reason: str = ""


class CniHandler(Protocol):
    """What the agent provides to the server."""

    async def cni_add(self, event: CniPodEvent) -> CniDecision: ...

    async def cni_del(self, event: CniPodEvent) -> None: ...

    def cni_check(self, namespace: str, name: str, netns: str) -> tuple[bool, str]: ...

    def cni_ready(self) -> str | None:
        """None when ready; otherwise why not."""
        ...


class CniServer:
    def __init__(self, path: str | os.PathLike[str], handler: CniHandler, *, add_timeout: float = 25.0) -> None:
        self.path = Path(path)
        self.handler = handler
        self.add_timeout = add_timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> CniServer:
        self._prepare_path()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/cni/add", self._add)
        app.router.add_post("/v1/cni/del", self._del)
        app.router.add_get("/v1/cni/check", self._check)
        app.router.add_get("/v1/cni/status", self._status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window in which others may connect
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("CNI plugin socket listening on %s", self.path)
        return self

    def _prepare_path(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"CNI socket {self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # a socket left behind by an agent that died
            return
        finally:
            probe.close()
        raise OSError(f"CNI socket {self.path}: another agent is serving on it")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # --- handlers -------------------------------------------------------------------------------------

    async def _event(self, request: web.Request, *, add: bool) -> CniPodEvent:
        try:
            doc = await request.json()
        except ValueError:
            raise CniRequestError("body: not JSON") from None
        return CniPodEvent.parse(doc, add=add)

    async def _add(self, request: web.Request) -> web.Response:
        try:
            event = await self._event(request, add=True)
        except CniRequestError as err:
            return web.json_response({"error": str(err)}, status=400)
        try:
            decision = await asyncio.wait_for(self.handler.cni_add(event), self.add_timeout)
        except CniNotReady as err:
            log.warning("CNI ADD %s: not ready: %s", event.key, err)
            return web.json_response({"error": str(err)}, status=503)
        except (CniCaptureFailed, TimeoutError) as err:
            reason = str(err) or f"capture not finished within {self.add_timeout:g}s"
            log.error("CNI ADD %s: %s", event.key, reason)
            return web.json_response({"error": reason}, status=500)
        except Exception:
            log.exception("CNI ADD %s failed", event.key)
            return web.json_response({"error": "internal error in the agent (see its log)"}, status=500)
        log.info("CNI ADD %s: %s", event.key, "captured" if decision.captured else f"not captured: {decision.reason}")
        return web.json_response({"captured": decision.captured, "reason": decision.reason})

    async def _del(self, request: web.Request) -> web.Response:
        try:
            event = await self._event(request, add=False)
        except CniRequestError as err:
            return web.json_response({"error": str(err)}, status=400)
        try:
            await self.handler.cni_del(event)
        except Exception:
            log.exception("CNI DEL %s failed", event.key)
            return web.json_response({"error": "internal error in the agent (see its log)"}, status=500)
        return web.json_response({})

    async def _check(self, request: web.Request) -> web.Response:
        ns, name = request.query.get("namespace", ""), request.query.get("name", "")
        if not ns or not name:
            return web.json_response({"error": "namespace and name are required"}, status=400)
        ok, reason = self.handler.cni_check(ns, name, request.query.get("netns", ""))
        return web.json_response({"ok": ok, "reason": reason})

    async def _status(self, request: web.Request) -> web.Response:
        why = self.handler.cni_ready()
        if why is not None:
            return web.json_response({"error": why}, status=503)
        return web.json_response({})

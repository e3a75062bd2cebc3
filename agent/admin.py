"""The agent's three HTTP ports, as ztunnel has them (reference ztunnel.md §2).

- 15020 `/metrics` and `/stats/prometheus`: every registry of the agent, Prometheus text format.
- 15021 `/healthz/ready`: 200 once the agent serves its pods, 503 before and while shutting down.
- 15000, bound to localhost only: `/config_dump` (the live state as JSON), `/logging` (GET shows, POST
  `?level=debug` sets the log level), `/quitquitquit` (POST: graceful shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("nodemesh.agent.admin")

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 10}


class AdminServers:
    """Owns the three aiohttp sites; the agent passes callables so this module knows nothing of proxies."""

    def __init__(
        self,
        registries: Callable[[], Iterable[CollectorRegistry]],
        config_dump: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        quit: Callable[[], None],
        metrics_addr: tuple[str, int] = ("0.0.0.0", 15020),
        readiness_addr: tuple[str, int] = ("0.0.0.0", 15021),
        admin_addr: tuple[str, int] = ("127.0.0.1", 15000),
    ) -> None:
        self._registries = registries
        self._config_dump = config_dump
        self._ready = ready
        self._quit = quit
        self._addrs = {"metrics": metrics_addr, "readiness": readiness_addr, "admin": admin_addr}
        self._runners: list[web.AppRunner] = []

    # -- handlers --------------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in self._registries())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready_handler(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _config_dump_handler(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self._config_dump(), indent=2, default=str),
                            content_type="application/json")

    async def _logging(self, request: web.Request) -> web.Response:
        root = logging.getLogger()
        if request.method == "POST":
            level = request.query.get("level", "").lower()
            if level not in LEVELS:
                return web.Response(status=400, text=f"unknown level {level!r}; one of {', '.join(LEVELS)}\n")
            root.setLevel(LEVELS[level])
            log.info("log level set to %s", level)
        return web.Response(text=f"current log level is {logging.getLevelName(root.level).lower()}\n")

    async def _quit_handler(self, request: web.Request) -> web.Response:
        log.info("shutdown requested through /quitquitquit")
        asyncio.get_running_loop().call_soon(self._quit)
        return web.Response(text="OK\n")

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        apps = {
            "metrics": [web.get("/metrics", self._metrics), web.get("/stats/prometheus", self._metrics)],
            "readiness": [web.get("/healthz/ready", self._ready_handler)],
            "admin": [
                web.get("/config_dump", self._config_dump_handler),
                web.get("/logging", self._logging),
                web.post("/logging", self._logging),
                web.post("/quitquitquit", self._quit_handler),
            ],
        }
        for name, routes in apps.items():
            host, port = self._addrs[name]
            if port < 0:
                continue
            app = web.Application()
            app.add_routes(routes)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

"""The waypoint process: its HBONE listener, the proxy pipeline, the upstream pools, config and telemetry.

`WaypointApp` wires the parts and owns their lifecycle (start, a one-second housekeeping tick for
outlier sweeps and log flushing, graceful close). Certificates, the mesh model and the waypoint config
are handed in, so the same object runs in the lab (`nodemesh waypoint`), in a Kubernetes pod, and in tests.
The admin port serves Prometheus metrics (`/stats/prometheus`, `/metrics`), readiness
(`/healthz/ready`) and what the config store accepted and rejected (`/config_dump`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh.config import ConfigStore as MeshStore
from mesh.hbone import CLIENT_LIMITS, HboneLimits, HboneMetrics, HbonePool
from mesh.identity import SpiffeId, TrustBundle, WorkloadCert
from waypoint.accesslog import AccessLog
from waypoint.config.store import ConfigStore, WaypointIdentity
from waypoint.filters import Filter
from waypoint.metrics import WaypointMetrics
from waypoint.server.clusters import Clusters, Resolver
from waypoint.server.context import ServerLimits
from waypoint.server.inbound import Inbound
from waypoint.server.proxy import Proxy
from waypoint.server.tcp import TcpForwarder
from waypoint.server.upstream import UpstreamPool
from waypoint.tracing import Tracer

log = logging.getLogger("waypoint")


@dataclass(frozen=True)
class WaypointSettings:
    namespace: str
    name: str
    service_account: str | None = None  # Istio gives a waypoint a service account named after it
    trust_domain: str = "cluster.local"
    domain: str = "cluster.local"
    listen: tuple[str, int] = ("0.0.0.0", 15008)
    hbone_port: int = 15008  # the destination agents' HBONE port
    admin: tuple[str, int] | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    hbone_limits: HboneLimits | None = None
    access_log: str = "text"  # text | json | off
    sampling: float = 1.0
    otlp_endpoint: str | None = None
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.access_log not in ("text", "json", "off"):
            raise ValueError(f"access_log must be text, json or off, got {self.access_log!r}")
        if not 1 <= self.hbone_port <= 65535:
            raise ValueError(f"hbone_port must be a port number, got {self.hbone_port}")

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account or self.name)


class WaypointApp:
    def __init__(self, settings: WaypointSettings, *, cert: WorkloadCert | Callable[[], WorkloadCert],
                 mesh: MeshStore, config: ConfigStore | None = None, bundle: TrustBundle | None = None,
                 filters: Sequence[Filter] = (), registry: CollectorRegistry | None = None,
                 access_log_sink: TextIO | Callable[[str], object] | None = None, rng: random.Random | None = None,
                 trace_exporter: Any = None) -> None:
        self.settings = settings
        self._cert = cert if callable(cert) else (lambda: cert)  # type: ignore[misc,return-value]
        self.identity = WaypointIdentity(settings.namespace, settings.name)
        self.config = config or ConfigStore(domain=settings.domain, waypoint=self.identity)
        self.mesh = mesh
        self.bundle = bundle
        self.filters = list(filters)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rng = rng or random.Random()
        self.metrics = WaypointMetrics(self.registry)
        self.hbone_metrics = HboneMetrics(self.registry)
        self.access_log = AccessLog(access_log_sink, json_format=settings.access_log == "json",
                                    enabled=settings.access_log != "off")
        self.tracer = Tracer(sampling=settings.sampling, otlp_endpoint=settings.otlp_endpoint, rng=self.rng,
                             exporter=trace_exporter)
        self.address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.ready = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._admin: web.AppRunner | None = None

    def cert(self) -> WorkloadCert:
        return self._cert()  # type: ignore[no-any-return]

    async def start(self) -> WaypointApp:
        s = self.settings
        loop = asyncio.get_running_loop()
        cert = self.cert()
        bundle = self.bundle or cert.roots
        self.resolver = Resolver(self.mesh, self.identity, s.domain)
        self.clusters = Clusters(self.rng, loop.time)
        self.hbone = HbonePool(bundle=bundle, metrics=self.hbone_metrics,
                               limits=CLIENT_LIMITS if s.hbone_limits is None else s.hbone_limits)
        self.upstream = UpstreamPool(self.hbone, self.cert, hbone_port=s.hbone_port,
                                     connect_timeout=s.connect_timeout)
        self.proxy = Proxy(config=self.config, resolver=self.resolver, clusters=self.clusters,
                           upstream=self.upstream, metrics=self.metrics, access_log=self.access_log,
                           tracer=self.tracer, filters=self.filters, rng=self.rng)
        self.tcp = TcpForwarder(config=self.config, resolver=self.resolver, clusters=self.clusters,
                                hbone=self.hbone, cert=self.cert, hbone_port=s.hbone_port, metrics=self.metrics,
                                access_log=self.access_log, connect_timeout=s.connect_timeout)
        self.inbound = Inbound(cert=self.cert, trust_domain=s.trust_domain, bundle=bundle, resolver=self.resolver,
                               handler=self.proxy, tcp=self.tcp, limits=s.limits, hbone_limits=s.hbone_limits,
                               hbone_metrics=self.hbone_metrics)
        self.address = await self.inbound.listen(*s.listen)
        if s.admin is not None:
            await self._start_admin(*s.admin)
        self._tasks.append(loop.create_task(self._housekeeping(), name="waypoint-housekeeping"))
        self.ready = True
        log.info("waypoint %s/%s (%s) listening on %s:%d", s.namespace, s.name, s.identity, *self.address)
        return self

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.clusters.tick()
                self.access_log.flush()
            except Exception:
                log.exception("housekeeping failed")

    # ---- admin -------------------------------------------------------------------------------------

    async def _start_admin(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/stats/prometheus", self._metrics)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz/ready", self._ready)
        app.router.add_get("/config_dump", self._config_dump)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self._admin = runner
        server = site._server
        if server is not None and server.sockets:  # type: ignore[union-attr]
            sock = server.sockets[0].getsockname()  # type: ignore[union-attr]
            self.admin_address = (sock[0], sock[1])

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503, text="ready\n" if self.ready else "starting\n")

    async def _config_dump(self, request: web.Request) -> web.Response:
        results = [{"resource": str(r.ref) if r.ref else None, "outcome": r.outcome.value, "message": r.message,
                    "warnings": list(r.warnings), "keptPrevious": r.kept_previous} for r in self.config.results()]
        doc = {"waypoint": f"{self.identity.namespace}/{self.identity.name}", "configVersion": self.config.version,
               "meshVersion": self.mesh.snapshot.version, "resources": results,
               "clusters": [{"name": c.name, "active": sum(c.active.values()),
                             "ejected": sorted(map(str, c.outlier.ejected())) if c.outlier else []}
                            for c in self.clusters.all()]}
        return web.json_response(doc)

    # ---- shutdown ----------------------------------------------------------------------------------

    async def close(self, drain_timeout: float = 1.0) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if hasattr(self, "inbound"):
            await self.inbound.close(drain_timeout)
            await self.proxy.close()
            await self.upstream.close()
            await self.hbone.close(drain_timeout=drain_timeout)
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        self.access_log.flush()
        self.tracer.shutdown()

    async def __aenter__(self) -> WaypointApp:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

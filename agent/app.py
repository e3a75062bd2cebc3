"""The node agent: keeps one PodProxy per captured pod of its node, in step with the mesh config.

Life cycle: load config (its sources keep the store current) -> prepare redirection (the eBPF program is
compiled once) -> re-adopt pods a previous agent left captured -> reconcile: install redirection and
start a proxy for every local mesh pod, remove those no longer there -> ready. A policy change re-checks
every live inbound connection. On shutdown: not ready, stop accepting, drain live connections for a
grace period, cut the rest. Redirection stays in place when the agent stops (a pod's traffic must not
escape the mesh while the agent restarts; the next agent adopts it), and is removed when a pod leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.accesslog import AccessLog
from agent.admin import AdminServers
from agent.context import AgentContext
from agent.metrics import TcpMetrics
from agent.pod import PodProxy
from agent.redirect import CaptureExclusions, PodNetInfo, RedirectController, RedirectError
from mesh.ca import NodeCredentials
from mesh.ca.client import CAClient
from mesh.certmanager import CertificateManager
from mesh.config import ConfigStore, SnapshotChange, Workload
from mesh.config.filesource import FileSource, lab_state_source, local_config_source, policy_file_source
from mesh.identity import TrustBundle

log = logging.getLogger("nodemesh.agent")


@dataclasses.dataclass
class AgentConfig:
    node: str
    config: list[str]  # "lab:NAME" | "file:PATH" | "policies:PATH"
    ca_url: str
    ca_creds: Path
    redirect: str = "auto"
    bpffs_root: str = "/sys/fs/bpf/nodemesh"
    state_dir: str = "/run/nodemesh/redirect"
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    log_format: str = "text"
    drain_seconds: float = 5.0
    config_poll: float = 0.5
    node_addresses: tuple[str, ...] = ()
    cert_ttl: float | None = None


def _lab_state_path(name: str) -> Path:
    from mesh.lab.state import state_path

    return state_path(name)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = ConfigStore()
        self.sources: list[FileSource] = []
        self.proxies: dict[str, PodProxy] = {}
        self.redirect: RedirectController | None = None
        self.ctx: AgentContext | None = None
        self.ca: CAClient | None = None
        self.admin: AdminServers | None = None
        self.ready = False
        self.stopping = asyncio.Event()
        self._reconcile_wanted = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.install_errors: dict[str, str] = {}

    # -- startup -------------------------------------------------------------------------------------
    def _make_sources(self) -> list[FileSource]:
        out = []
        for spec in self.cfg.config:
            kind, _, arg = spec.partition(":")
            kw: dict[str, Any] = {"interval": self.cfg.config_poll}
            if kind == "lab":
                out.append(lab_state_source(_lab_state_path(arg), self.store, **kw))
            elif kind == "file":
                out.append(local_config_source(arg, self.store, **kw))
            elif kind == "policies":
                out.append(policy_file_source(arg, self.store, **kw))
            else:
                raise ValueError(f"--config {spec!r}: use lab:NAME, file:PATH or policies:PATH")
        return out

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.cfg
        self.sources = self._make_sources()
        for src in self.sources:
            await src.poll_async()
            if src.last_error:
                log.error("config %s: %s", src.name, src.last_error)
            src.start()
        creds = NodeCredentials.read_files(cfg.ca_creds)
        if creds.node != cfg.node:
            raise ValueError(f"--ca-creds hold a certificate for node {creds.node!r}, not {cfg.node!r}")
        ttl = timedelta(seconds=cfg.cert_ttl) if cfg.cert_ttl else None
        self.ca = CAClient(cfg.ca_url, creds, ttl=ttl)
        bundle: TrustBundle = await self.ca.trust_bundle()
        certs = CertificateManager(self.ca.fetch)
        trust_domain = creds.trust_domain or "cluster.local"
        self.ctx = AgentContext(node=cfg.node, store=self.store, certs=certs, bundle=bundle,
                                trust_domain=trust_domain, metrics=TcpMetrics(), access_log=AccessLog(cfg.log_format))
        self.redirect = RedirectController(backend=cfg.redirect, bpffs_root=cfg.bpffs_root, state_dir=cfg.state_dir)
        backend = await asyncio.get_running_loop().run_in_executor(None, self.redirect.prepare)
        if self.redirect.fallback_reason:
            log.warning("redirection: %s", self.redirect.fallback_reason)
        log.info("node %s: redirection backend %s", cfg.node, backend)
        self.admin = AdminServers(self._registries, self.config_dump, lambda: self.ready, self.request_stop,
                                  cfg.metrics_addr, cfg.readiness_addr, cfg.admin_addr)
        await self.admin.start()
        self._unsubscribe = self.store.subscribe(self._on_change)
        await self.reconcile()
        self._reconciler = asyncio.ensure_future(self._reconcile_loop())
        self.ready = True
        log.info("node %s: ready, %d pods captured", cfg.node, len(self.proxies))

    def _registries(self) -> Iterable[CollectorRegistry]:
        regs = []
        if self.ctx is not None:
            regs += [self.ctx.metrics.registry, self.ctx.certs.registry]
        from mesh.hbone.metrics import default_metrics

        hm = default_metrics()
        if getattr(hm, "registry", None) is not None:
            regs.append(hm.registry)
        return regs

    # -- config changes --------------------------------------------------------------------------------
    def _on_change(self, change: SnapshotChange) -> None:
        loop = self._loop
        if loop is None:
            return
        def apply() -> None:
            if change.workloads_changed or change.services_changed:
                self._reconcile_wanted.set()
            if change.authz_changed:
                for proxy in list(self.proxies.values()):
                    proxy.live.recheck(change.new)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            apply()
        else:
            loop.call_soon_threadsafe(apply)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._reconcile_wanted.wait()
            self._reconcile_wanted.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed")

    def local_pods(self) -> dict[str, Workload]:
        snap = self.store.snapshot
        return {w.uid: w for w in snap.workloads_on_node(self.cfg.node) if w.in_mesh and w.netns and w.workload_ips}

    def _net_info(self, w: Workload) -> PodNetInfo:
        annotations = dict(getattr(w, "annotations", {}) or {})
        exclusions = CaptureExclusions.from_annotations(annotations) if annotations else CaptureExclusions()
        return PodNetInfo(uid=w.uid, netns=w.netns or "", ip=ipaddress.IPv4Address(str(w.workload_ips[0])),
                          name=w.name, namespace=w.namespace, exclusions=exclusions,
                          node_addresses=tuple(self.cfg.node_addresses))

    async def reconcile(self) -> None:
        assert self.redirect is not None and self.ctx is not None
        want = self.local_pods()
        for uid in [u for u in self.proxies if u not in want]:
            proxy = self.proxies.pop(uid)
            log.info("pod %s left: removing its redirection", uid)
            await proxy.stop(drain=0)
            self.ctx.certs.untrack(proxy.identity)
            await self.redirect.remove_async(uid)
        for uid, w in want.items():
            proxy = self.proxies.get(uid)
            if proxy is not None:
                proxy.update(w)
                continue
            try:
                red = await self.redirect.install_async(self._net_info(w))
            except (RedirectError, OSError) as e:
                self.install_errors[uid] = str(e)
                log.error("pod %s: cannot capture its traffic: %s", uid, e)
                continue
            self.install_errors.pop(uid, None)
            proxy = PodProxy(self.ctx, w, red)
            await proxy.start()
            self.proxies[uid] = proxy
            log.info("pod %s/%s (%s): captured with %s%s", w.namespace, w.name, red.pod.ip, red.backend,
                     " (adopted)" if red.adopted else "")

    # -- admin -------------------------------------------------------------------------------------------
    def config_dump(self) -> dict[str, Any]:
        snap = self.store.snapshot
        return {
            "node": self.cfg.node,
            "ready": self.ready,
            "redirection": self.redirect.backend if self.redirect else None,
            "pods": {uid: {"name": p.workload.name, "namespace": p.workload.namespace, "ip": p.ip,
                           "identity": str(p.identity), "liveInbound": len(p.live)}
                     for uid, p in sorted(self.proxies.items())},
            "installErrors": dict(self.install_errors),
            "configErrors": {s.name: s.last_error for s in self.sources if s.last_error},
            "workloads": sorted(snap.workloads),
            "services": sorted(snap.services),
            "policies": sorted(snap.policies),
            "certificates": sorted(str(i) for i in self.ctx.certs.tracked()) if self.ctx else [],
        }

    def request_stop(self) -> None:
        self.stopping.set()

    # -- shutdown -----------------------------------------------------------------------------------------
    async def stop(self) -> None:
        self.ready = False
        if self._unsubscribe:
            self._unsubscribe()
        if self._reconciler:
            self._reconciler.cancel()
        for src in self.sources:
            await src.stop()
        drain = self.cfg.drain_seconds
        await asyncio.gather(*(p.stop(drain=drain) for p in self.proxies.values()), return_exceptions=True)
        self.proxies.clear()
        if self.redirect is not None:
            self.redirect.close()  # listeners closed; kernel steering stays for the next agent
        if self.ctx is not None:
            await self.ctx.certs.aclose()
        if self.ca is not None:
            await self.ca.aclose()
        if self.admin is not None:
            await self.admin.stop()


async def run_agent(cfg: AgentConfig, started: Callable[[Agent], Awaitable[None]] | None = None) -> int:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, agent.request_stop)
    try:
        await agent.start()
        if started is not None:
            await started(agent)
        await agent.stopping.wait()
        log.info("shutting down: draining for up to %.1fs", cfg.drain_seconds)
    finally:
        await agent.stop()
    return 0

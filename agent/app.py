"""The node agent: keeps one PodProxy per captured pod of its node, in step with the mesh config.

Life cycle: load config (its sources keep the store current) -> prepare redirection (the eBPF program is
compiled once) -> re-adopt pods a previous agent left captured -> reconcile: install redirection and
start a proxy for every local mesh pod, remove those no longer there -> ready. A policy change re-checks
every live inbound connection. On shutdown: not ready, stop accepting, drain live connections for a
grace period, cut the rest. Redirection stays in place when the agent stops (a pod's traffic must not
escape the mesh while the agent restarts; the next agent adopts it), and is removed when a pod leaves.

In Kubernetes mode (`--config kube`) the model comes from the API server (`agent.kube.source`), the pods
to capture are this node's enrolled ones, their namespaces are found from the host's /proc by pod IP
(`agent.kube.enrol`), capture is recorded on the pod (`ambient.istio.io/redirection: enabled`), and new
pods are announced by the chained CNI plugin before they start (`agent.cni`), so that they never send a
packet uncaptured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.accesslog import AccessLog
from agent.admin import AdminServers
from agent.cni.server import CniCaptureFailed, CniDecision, CniNotReady, CniPodEvent, CniServer
from agent.context import AgentContext
from agent.metrics import TcpMetrics
from agent.pod import PodProxy
from agent.redirect import CaptureExclusions, PodNetInfo, RedirectController, RedirectError
from mesh.ca import NodeCredentials
from mesh.ca.client import CAClient, CAClientError
from mesh.certmanager import CertificateManager
from mesh.config import ConfigStore, SnapshotChange, Workload
from mesh.config.filesource import FileSource, lab_state_source, local_config_source, policy_file_source
from mesh.identity import TrustBundle

log = logging.getLogger("nodemesh.agent")


KUBE_CONFIG = "kube"


@dataclasses.dataclass
class AgentConfig:
    node: str
    config: list[str]  # "lab:NAME" | "file:PATH" | "policies:PATH" | "kube"
    ca_url: str
    ca_creds: Path | None = None  # a node certificate from the CA ...
    ca_token: Path | None = None  # ... or a service-account token (CA run with --auth tokenreview)
    ca_roots: Path | None = None  # the CA's root certificate, with ca_token
    trust_domain: str = "cluster.local"  # with ca_token (a node certificate carries its own)
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
    # Kubernetes mode
    kubeconfig: str | None = None  # None: in-cluster, then $KUBECONFIG, then ~/.kube/config
    host_proc: str = "/proc"  # the host's /proc as the agent sees it (pod namespaces are found there)
    cni_socket: str | None = None  # where the chained CNI plugin reaches the agent; None: no CNI plugin
    cni_bin_dir: str | None = None  # with cni_conf_dir: install the plugin into the node's CNI chain
    cni_conf_dir: str | None = None
    cni_exclude: tuple[str, ...] = ("kube-system",)
    cni_interpreter: str = "/usr/bin/env python3"

    @property
    def kube_mode(self) -> bool:
        return KUBE_CONFIG in self.config


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
        self._lock = asyncio.Lock()  # one capture change at a time: reconcile and CNI requests
        self.install_errors: dict[str, str] = {}
        self.kube: Any = None  # agent.kube.source.KubeSource in Kubernetes mode
        self.enrolment: Any = None  # agent.kube.enrol.KubeEnrolment
        self.annotator: Any = None  # agent.kube.annotate.RedirectionAnnotator
        self._pod_api: Any = None
        self._kube_configuration: Any = None  # kubernetes_asyncio Configuration, for the plugin's kubeconfig
        self.cni_server: CniServer | None = None
        self._cni_installer: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = 1.0

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
            elif spec == KUBE_CONFIG:
                continue  # not a file source: see _start_kube
            else:
                raise ValueError(f"--config {spec!r}: use kube, lab:NAME, file:PATH or policies:PATH")
        return out

    async def _start_kube(self) -> None:
        from agent.kube import KubeConfigError, load_configuration
        from agent.kube.annotate import PodApi, RedirectionAnnotator
        from agent.kube.enrol import KubeEnrolment
        from agent.kube.podnetns import NetnsFinder
        from agent.kube.source import KubeSource
        from agent.kube.translate import TranslateOptions

        cfg = self.cfg
        try:
            configuration = await load_configuration(cfg.kubeconfig)
        except KubeConfigError as e:
            raise ValueError(str(e)) from None
        self._kube_configuration = configuration
        domain = self._trust_domain()
        # "" is the model's spelling of the default domain: dumps then equal those of any other source.
        options = TranslateOptions(trust_domain="" if domain == "cluster.local" else domain,
                                   root_namespace=self.store.root_namespace)
        self.kube = KubeSource(self.store, configuration, cfg.node, options=options)
        self.kube.start()
        while True:
            try:
                await self.kube.wait_published(timeout=10)
                break
            except TimeoutError:
                log.warning("still waiting for the first complete list from the API server: %s",
                            self.kube.status().get("lastErrors") or "no answer yet")
        self._pod_api = PodApi(configuration)
        self.enrolment = KubeEnrolment(self.kube, NetnsFinder(cfg.host_proc), self._pod_api, cfg.node)
        self.annotator = RedirectionAnnotator(self._pod_api, self.enrolment.raw_pod)
        self.annotator.start()

    def _trust_domain(self) -> str:
        if self.cfg.ca_creds is not None:
            return NodeCredentials.read_files(self.cfg.ca_creds).trust_domain or "cluster.local"
        return self.cfg.trust_domain

    def _ca_credentials(self) -> Any:
        cfg = self.cfg
        if cfg.ca_token is not None:
            from mesh.ca.kube import TokenCredentials

            if cfg.ca_roots is None:
                raise ValueError("--ca-token needs --ca-roots (the CA's root certificate, PEM)")
            return TokenCredentials.read(cfg.ca_token, cfg.ca_roots)
        if cfg.ca_creds is None:
            raise ValueError("give --ca-creds (a node certificate) or --ca-token with --ca-roots")
        creds = NodeCredentials.read_files(cfg.ca_creds)
        if creds.node != cfg.node:
            raise ValueError(f"--ca-creds hold a certificate for node {creds.node!r}, not {cfg.node!r}")
        return creds

    async def _trust_bundle(self) -> TrustBundle:
        """The CA's bundle, waiting out a CA that is not up yet (backoff 0.5 s doubling to 30 s): an agent
        that starts before its CA (a node reboot, a fresh cluster) must not crash-loop."""
        assert self.ca is not None
        delay = 0.5
        while True:
            try:
                return await self.ca.trust_bundle()
            except (CAClientError, OSError, TimeoutError) as e:
                if self.stopping.is_set():
                    raise
                log.warning("CA %s not reachable (%s); retrying in %.1fs", self.cfg.ca_url, e, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                if self.stopping.is_set():
                    raise
                delay = min(delay * 2, 30.0)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.cfg
        self.sources = self._make_sources()
        for src in self.sources:
            await src.poll_async()
            if src.last_error:
                log.error("config %s: %s", src.name, src.last_error)
            src.start()
        creds = self._ca_credentials()
        if cfg.kube_mode:
            await self._start_kube()
        ttl = timedelta(seconds=cfg.cert_ttl) if cfg.cert_ttl else None
        self.ca = CAClient(cfg.ca_url, creds, ttl=ttl)
        bundle = await self._trust_bundle()
        certs = CertificateManager(self.ca.fetch)
        trust_domain = self._trust_domain()
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
        if cfg.kube_mode and cfg.cni_socket:
            self.cni_server = await CniServer(cfg.cni_socket, self).start()
            if cfg.cni_bin_dir and cfg.cni_conf_dir:
                self._cni_installer = asyncio.ensure_future(self._keep_cni_installed())
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
        """Lab and file modes: this node's mesh pods, whose namespace the config names."""
        snap = self.store.snapshot
        return {w.uid: w for w in snap.workloads_on_node(self.cfg.node) if w.in_mesh and w.netns and w.workload_ips}

    async def _wanted(self) -> dict[str, Workload]:
        if self.enrolment is None:
            return self.local_pods()
        snap = self.store.snapshot
        plan = self.enrolment.plan(snap.workloads_on_node(self.cfg.node), set(self.proxies))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.enrolment.resolve, plan, set(self.proxies))

    def _annotations_of(self, w: Workload) -> dict[str, str]:
        if self.enrolment is not None:
            pod = self.enrolment.raw_pod(w.namespace, w.name) or {}
            return dict((pod.get("metadata") or {}).get("annotations") or {})
        return dict(getattr(w, "annotations", {}) or {})

    def _net_info(self, w: Workload) -> PodNetInfo:
        annotations = self._annotations_of(w)
        exclusions = CaptureExclusions.from_annotations(annotations) if annotations else CaptureExclusions()
        return PodNetInfo(uid=w.uid, netns=w.netns or "", ip=ipaddress.IPv4Address(str(w.workload_ips[0])),
                          name=w.name, namespace=w.namespace, exclusions=exclusions,
                          node_addresses=tuple(self.cfg.node_addresses))

    async def reconcile(self) -> None:
        assert self.redirect is not None and self.ctx is not None
        async with self._lock:
            want = await self._wanted()
            for uid in [u for u in self.proxies if u not in want]:
                await self._release(uid)
            for uid, w in want.items():
                proxy = self.proxies.get(uid)
                if proxy is not None:
                    proxy.update(w)
                    continue
                try:
                    await self._capture(w)
                except (RedirectError, OSError) as e:
                    self.install_errors[uid] = str(e)
                    log.error("pod %s: cannot capture its traffic: %s", uid, e)
            for uid in [u for u in self.install_errors if u not in want]:
                del self.install_errors[uid]
            if self.enrolment is not None:
                self._after_kube_reconcile()

    async def _capture(self, w: Workload) -> PodProxy:
        assert self.redirect is not None and self.ctx is not None
        red = await self.redirect.install_async(self._net_info(w))
        self.install_errors.pop(w.uid, None)
        proxy = PodProxy(self.ctx, w, red)
        await proxy.start()
        self.proxies[w.uid] = proxy
        log.info("pod %s/%s (%s): captured with %s%s", w.namespace, w.name, red.pod.ip, red.backend,
                 " (adopted)" if red.adopted else "")
        return proxy

    async def _release(self, uid: str) -> None:
        assert self.redirect is not None and self.ctx is not None
        proxy = self.proxies.pop(uid)
        log.info("pod %s left: removing its redirection", uid)
        await proxy.stop(drain=0)
        if not any(p.identity == proxy.identity for p in self.proxies.values()):
            self.ctx.certs.untrack(proxy.identity)
        await self.redirect.remove_async(uid)
        if self.enrolment is not None:
            self.enrolment.finder.forget(proxy.ip)

    def _after_kube_reconcile(self) -> None:
        """Record capture on the pods, and come back soon for pods whose namespace was not found yet
        (their sandbox process may not be running) or whose capture failed."""
        for namespace, name, enabled in self.enrolment.annotation_changes(set(self.proxies)):
            self.annotator.want(namespace, name, enabled)
        for uid, why in self.enrolment.unresolved.items():
            self.install_errors[uid] = why
        retry = bool(self.enrolment.unresolved or self.install_errors) and not self.stopping.is_set()
        if not retry:
            self._retry_delay = 1.0
        elif self._loop is not None and (self._retry is None or self._retry.when() <= self._loop.time()):
            # Each retry scans /proc: soon for a sandbox about to start, then less and less often.
            self._retry = self._loop.call_later(self._retry_delay, self._reconcile_wanted.set)
            self._retry_delay = min(self._retry_delay * 2, 30.0)

    # -- the CNI plugin's requests (agent.cni.server.CniHandler) -----------------------------------------
    async def cni_add(self, event: CniPodEvent) -> CniDecision:
        from agent.kube.enrol import EnrolmentError, EnrolmentNotReady

        if self.enrolment is None or self.ctx is None:
            raise CniNotReady("the agent does not run in Kubernetes mode")
        try:
            pod, namespace = await self.enrolment.fetch(event.pod_namespace, event.pod_name, event.pod_uid,
                                                        time.monotonic() + 10.0)
            workload, reason = self.enrolment.decide(pod, event.ips, namespace)
        except EnrolmentNotReady as e:
            raise CniNotReady(str(e)) from None
        except EnrolmentError as e:
            raise CniCaptureFailed(str(e)) from None
        if workload is None:
            return CniDecision(False, reason)
        if not event.ips:
            raise CniCaptureFailed("the CNI result gives the pod no address")
        async with self._lock:
            existing = self.proxies.get(workload.uid)
            if existing is not None:
                if _inode(event.netns) == existing.redirection.netns_ino:
                    return CniDecision(True, "already captured")
                await self._release(workload.uid)  # a new sandbox for the same pod
            self.enrolment.add_pending(pod, workload, event.netns, event.container_id)
            try:
                proxy = await self._capture(dataclasses.replace(workload, netns=event.netns))
            except (RedirectError, OSError) as e:
                self.enrolment.drop_pending(workload.uid)
                raise CniCaptureFailed(f"pod {event.key}: {e}") from None
        # Fetch the pod's certificate now, so its first connection does not wait for the CA; a CA outage
        # must not block the pod, though (the certificate manager keeps trying).
        with contextlib.suppress(Exception):
            await self.ctx.certs.get(proxy.identity, timeout=5.0)
        self.annotator.want(event.pod_namespace, event.pod_name, True)
        return CniDecision(True)

    async def cni_del(self, event: CniPodEvent) -> None:
        if self.enrolment is None:
            return
        uid = self.enrolment.workload_uid(event.pod_namespace, event.pod_name)
        async with self._lock:
            pending = self.enrolment.drop_pending(uid)
            proxy = self.proxies.get(uid)
            if proxy is None:
                return
            ino = _inode(event.netns) if event.netns else None
            same = ino is None or ino == proxy.redirection.netns_ino
            if same or (pending is not None and pending.container_id == event.container_id):
                await self._release(uid)

    def cni_check(self, namespace: str, name: str, netns: str) -> tuple[bool, str]:
        if self.enrolment is None:
            return False, "the agent does not run in Kubernetes mode"
        uid = self.enrolment.workload_uid(namespace, name)
        proxy = self.proxies.get(uid)
        if proxy is not None:
            if netns and _inode(netns) not in (None, proxy.redirection.netns_ino):
                return False, "captured in another network namespace than the one checked"
            return True, "captured"
        pod = self.enrolment.raw_pod(namespace, name)
        if pod is None:
            return False, "the agent does not know this pod"
        from agent.kube.enrol import not_enrolled_reason

        reason = not_enrolled_reason(pod, self.enrolment.namespace_labels(namespace))
        if reason:
            return True, f"not in the mesh: {reason}"
        return False, f"in the mesh but not captured: {self.install_errors.get(uid, 'not yet')}"

    def cni_ready(self) -> str | None:
        if self.enrolment is None:
            return "the agent does not run in Kubernetes mode"
        return None if self.ready else "the agent is starting or stopping"

    async def _keep_cni_installed(self, interval: float = 10.0) -> None:
        """Keep the plugin in the node's chain (the primary CNI may write its config after us, or again)."""
        from agent.cni.install import CniInstallError, PluginSettings, install

        cfg = self.cfg
        assert cfg.cni_bin_dir and cfg.cni_conf_dir and cfg.cni_socket
        loop = asyncio.get_running_loop()
        reported = ""
        while True:
            try:
                kubeconfig = await loop.run_in_executor(None, self._write_cni_kubeconfig)
                settings = PluginSettings(agent_socket=cfg.cni_socket, exclude_namespaces=cfg.cni_exclude,
                                          kubeconfig=kubeconfig)
                result = await loop.run_in_executor(None, functools.partial(
                    install, cfg.cni_bin_dir, cfg.cni_conf_dir, settings, interpreter=cfg.cni_interpreter))
                if result.changed:
                    log.info("CNI plugin chained into %s", result.conf_file)
                reported = ""
            except (CniInstallError, OSError) as e:
                if str(e) != reported:
                    log.warning("CNI plugin not installed yet: %s", e)
                    reported = str(e)
            await asyncio.sleep(interval)

    def _write_cni_kubeconfig(self) -> str | None:
        """The plugin's API access for deciding about pods while the agent is down (read-only use)."""
        from agent.cni.install import write_plugin_kubeconfig

        conf = self._kube_configuration
        if conf is None or not self.cfg.cni_conf_dir:
            return None
        auth = (conf.api_key or {}).get("authorization") or (conf.api_key or {}).get("BearerToken") or ""
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else (auth or None)
        ca_pem = Path(conf.ssl_ca_cert).read_text() if conf.ssl_ca_cert else None
        return str(write_plugin_kubeconfig(self.cfg.cni_conf_dir, conf.host, token=token, ca_pem=ca_pem))

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
            **self._kube_dump(),
        }

    def _kube_dump(self) -> dict[str, Any]:
        if self.kube is None or self.enrolment is None:
            return {}
        return {
            "kube": self.kube.config_dump(),
            "kubeStatus": dict(self.kube.status()),
            "cniPending": sorted(p.key for p in self.enrolment.pending.values()),
            "unresolved": dict(self.enrolment.unresolved),
        }

    def request_stop(self) -> None:
        self.stopping.set()

    # -- shutdown -----------------------------------------------------------------------------------------
    async def stop(self) -> None:
        self.ready = False
        if self._retry is not None:
            self._retry.cancel()
        if self.cni_server is not None:
            # From now on the plugin finds no agent and decides on its own (fail closed for mesh pods).
            await self.cni_server.stop()
        if self._cni_installer is not None:
            self._cni_installer.cancel()
        if self._unsubscribe:
            self._unsubscribe()
        if self._reconciler:
            self._reconciler.cancel()
        for src in self.sources:
            await src.stop()
        if self.annotator is not None:
            await self.annotator.stop()
        if self.kube is not None:
            await self.kube.stop()
        if self._pod_api is not None:
            await self._pod_api.close()
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


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


async def run_agent(cfg: AgentConfig, started: Callable[[Agent], Awaitable[None]] | None = None) -> int:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, agent.request_stop)
    try:
        # A stop request must also end a start that is still waiting (for the API server, say).
        starting = asyncio.ensure_future(agent.start())
        stop_asked = asyncio.ensure_future(agent.stopping.wait())
        await asyncio.wait({starting, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            log.info("stopped while starting")
            return 0
        stop_asked.cancel()
        starting.result()
        if started is not None:
            await started(agent)
        await agent.stopping.wait()
        log.info("shutting down: draining for up to %.1fs", cfg.drain_seconds)
    finally:
        await agent.stop()
    return 0

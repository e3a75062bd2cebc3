"""Plain TCP through the waypoint: streams that are not HTTP are forwarded at L4 (Envoy's tcp_proxy chain).

The endpoint is chosen by the Service's load balancer (ejected hosts left out) and reached over HBONE like
any HTTP attempt; bytes are then spliced both ways with half-close and backpressure. L7 authorization
policies apply as Istio applies them to TCP: an ALLOW rule that needs HTTP attributes can never match,
and a DENY rule is enforced without its HTTP attributes (so it denies more, never less).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from h2.errors import ErrorCodes

from mesh.hbone import HboneError, HbonePool, Tunnel, TunnelRequest
from mesh.hbone.headers import Authority
from mesh.identity import WorkloadCert
from waypoint.accesslog import AccessLog
from waypoint.authz import Action, AuthzPolicy, evaluate
from waypoint.config.model import Backend, ServiceRef
from waypoint.config.store import ConfigStore
from waypoint.flags import ResponseFlag
from waypoint.lb import Endpoint, LbContext
from waypoint.metrics import WaypointMetrics
from waypoint.record import RequestRecord
from waypoint.routing import RequestView
from waypoint.server.clusters import Clusters, EndpointInfo, Resolver
from waypoint.server.context import ConnectionContext
from waypoint.server.upstream import _connect_error

log = logging.getLogger("waypoint.tcp")


def tcp_policies(policies: tuple[AuthzPolicy, ...]) -> tuple[AuthzPolicy, ...]:
    """Policies as a TCP chain sees them (HTTP-only attributes are missing there)."""
    out = []
    for p in policies:
        if p.rules is None:
            out.append(p)
            continue
        rules = []
        for r in p.rules:
            http_ops = any(o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
                           for o in r.operations)
            http_conds = any(c.key.startswith("request.") for c in r.conditions)
            if p.action is Action.ALLOW:
                if not (http_ops or http_conds):
                    rules.append(r)
                continue
            ops = tuple(replace(o, hosts=(), not_hosts=(), methods=(), not_methods=(), paths=(), not_paths=())
                        for o in r.operations)
            conds = tuple(c for c in r.conditions if not c.key.startswith("request."))
            rules.append(replace(r, operations=ops, conditions=conds))
        out.append(replace(p, rules=tuple(rules)))
    return tuple(out)


class TcpForwarder:
    def __init__(self, *, config: ConfigStore, resolver: Resolver, clusters: Clusters, hbone: HbonePool,
                 cert: object, hbone_port: int, metrics: WaypointMetrics, access_log: AccessLog,
                 connect_timeout: float = 10.0) -> None:
        self.config = config
        self.resolver = resolver
        self.clusters = clusters
        self.hbone = hbone
        self.cert = cert  # Callable[[], WorkloadCert]
        self.hbone_port = hbone_port
        self.metrics = metrics
        self.access_log = access_log
        self.connect_timeout = connect_timeout

    def protocol(self, ctx: ConnectionContext) -> TcpSplice:
        return TcpSplice(self, ctx)

    async def open(self, ctx: ConnectionContext, rec: RequestRecord) -> Tunnel | None:
        """Authorize and connect; None (with the record saying why) when the stream must be closed."""
        dest = self.resolver.destination(*ctx.destination)
        if dest is None:
            rec.flags.add(ResponseFlag.NO_CLUSTER_FOUND)
            return None
        config = self.config.snapshot()
        ref = dest.service_ref
        if dest.service is not None:
            rec.destination_service = dest.service.hostname
            rec.destination_service_name = dest.service.name
            rec.destination_service_namespace = dest.service.namespace
        policies = config.authz_policies(ref if ref is not None else ServiceRef(dest.workload.namespace, ""))
        if policies:
            view = RequestView("", "/", ctx.destination_text, source_principal=ctx.peer_identity,
                               source_ip=ctx.source_ip, destination_ip=ctx.destination[0],
                               destination_port=dest.port)
            verdict = evaluate(tcp_policies(policies), view)
            if not verdict.allowed:
                rec.termination_details = f"rbac_access_denied_matched_policy[{verdict.policy or 'none'}]"
                return None
        if dest.service is not None:
            svc = dest.service
            backend = Backend(svc.hostname, svc.namespace, svc.name, port=dest.port)
            cluster = self.clusters.get(config, backend, dest.port)
            if cluster is None:
                rec.flags.add(ResponseFlag.NO_CLUSTER_FOUND)
                return None
            rec.upstream_cluster = cluster.name.replace("|http", "|tcp", 1)
            hosts, infos = self.resolver.endpoints(backend, dest.port, dict(cluster.policy.subset_labels))
            healthy = cluster.healthy(hosts)
            host = cluster.balancer.choose(healthy, LbContext(None, cluster.active_requests)) if healthy else None
        else:
            wl = dest.workload
            assert wl is not None
            info0 = EndpointInfo(wl, str(wl.workload_ips[0]), dest.port)
            host, infos, cluster = Endpoint(info0.address), {info0.address: info0}, None
        if host is None:
            rec.flags.add(ResponseFlag.NO_HEALTHY_UPSTREAM)
            return None
        info = infos[host.address]
        rec.upstream_host = f"envoy://connect_originate/{info.address}"
        request = TunnelRequest(authority=Authority.from_address(info.ip, info.port), src_addr=ctx.source)
        cert: WorkloadCert = self.cert()  # type: ignore[operator]
        try:
            tunnel = await asyncio.wait_for(self.hbone.connect(cert, (info.ip, self.hbone_port),
                                                               [info.workload.identity], request),
                                            self.connect_timeout)
        except (OSError, TimeoutError, HboneError) as exc:
            err = _connect_error(exc)
            rec.flags.add(err.reason.flag)
            rec.transport_failure = err.detail or None
            if cluster is not None and cluster.outlier is not None:
                from waypoint.resilience.outlier import Result

                cluster.outlier.record_local(host.address, Result.LOCAL_CONNECT_FAILED)
            return None
        return tunnel


class TcpSplice(asyncio.Protocol):
    """The downstream side of one L4-forwarded stream."""

    def __init__(self, forwarder: TcpForwarder, ctx: ConnectionContext) -> None:
        self.forwarder = forwarder
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.tunnel: Tunnel | None = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._down_eof = False
        self._up_eof = False
        self._write_paused = False
        self._lost = False
        self.sent = 0  # to the client
        self.received = 0  # from the client
        self.rec = RequestRecord(time.time(), asyncio.get_running_loop().time(), protocol="-")
        self._task: asyncio.Task[None] | None = None

    # ---- downstream ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        rec = self.rec
        ctx = self.ctx
        rec.downstream_local_address = ctx.destination_text
        rec.mutual_tls = ctx.peer_identity is not None
        if ctx.source is not None:
            rec.downstream_remote_address = f"{ctx.source[0]}:{ctx.source[1]}"
        self._task = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        rec = self.rec
        try:
            tunnel = await self.forwarder.open(self.ctx, rec)
        except Exception:
            log.exception("L4 forward failed")
            tunnel = None
        if tunnel is None or self._lost:
            if tunnel is not None:
                tunnel.reset(ErrorCodes.CANCEL, "client gone")
            if self.transport is not None:
                self.transport.abort()
            self._done()
            return
        self.tunnel = tunnel
        self.forwarder.metrics.tcp_open(rec)
        tunnel.attach_sink(self)
        tunnel.set_source(self)
        pending, self._pending = self._pending, []
        for chunk in pending:
            self._to_tunnel(chunk)
        if self._pending_eof:
            tunnel.write_eof()
        with contextlib.suppress(ConnectionError):
            await tunnel.wait_closed()
        self.forwarder.metrics.tcp_close(rec, self.sent, self.received)
        self._done()

    def _done(self) -> None:
        rec = self.rec
        rec.bytes_received, rec.bytes_sent = self.received, self.sent
        rec.duration_ms = int((asyncio.get_running_loop().time() - rec.start) * 1000)
        if self.tunnel is None and not rec.flags and rec.termination_details == "-":
            rec.flags.add(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        try:
            self.forwarder.access_log.log(rec)
        except Exception:
            log.exception("access log failed")

    def data_received(self, data: bytes) -> None:
        if self.tunnel is None:
            self._pending.append(data)
            self.received += len(data)
            return
        self.received += len(data)
        self._to_tunnel(data)

    def _to_tunnel(self, data: bytes) -> None:
        assert self.tunnel is not None
        try:
            more = self.tunnel.write(data)
        except ConnectionError:
            if self.transport is not None:
                self.transport.abort()
            return
        if not more and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._down_eof = True
        if self.tunnel is None:
            self._pending_eof = True
        else:
            with contextlib.suppress(ConnectionError):
                self.tunnel.write_eof()
        self._maybe_close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        tunnel = self.tunnel
        if tunnel is not None and not tunnel.closed and not (self._down_eof and self._up_eof):
            tunnel.reset(ErrorCodes.CONNECT_ERROR, "client connection lost")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_receiving()

    # ---- tunnel ------------------------------------------------------------------------------------

    def tunnel_data(self, data: bytes) -> bool:
        self.sent += len(data)
        t = self.transport
        if t is None or t.is_closing():
            return True
        t.write(data)
        return not self._write_paused

    def tunnel_eof(self) -> None:
        self._up_eof = True
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self._maybe_close()

    def tunnel_reset(self, exc: BaseException) -> None:
        self.rec.flags.add(ResponseFlag.UPSTREAM_REMOTE_RESET)
        if self.transport is not None:
            self.transport.abort()

    def tunnel_pause_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def tunnel_resume_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self._down_eof and self._up_eof and self.transport is not None:
            self.transport.close()

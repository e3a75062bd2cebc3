"""Everything the agent runs for one captured pod: its three listeners and the connections through them.

- 15001 (outbound): the pod's own connections, steered here by the redirection layer; carried by HBONE to
  the destination's agent (or its waypoint), or as plain TCP where the destination is not in the mesh.
- 15008 (inbound HBONE): tunnels from other agents; the peer's certificate is the client identity.
- 15006 (inbound plaintext): connections from outside the mesh, with no identity.

Inbound connections are authorized at the destination (here), then connected to the application inside
the pod with the client's own address. Every connection ends with one access-log line and its metrics.
As ztunnel does in in-pod mode, each pod has its own HBONE pool: pooled connections are keyed by the
source identity anyway, and the pool's sockets must live in the pod's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from agent.accesslog import AccessRecord
from agent.context import AgentContext, peer_of, spiffe_of
from agent.lb import pick
from agent.metrics import ConnLabels
from agent.proxy import dial
from agent.proxy.live import LiveConnections
from agent.proxy.route import Direct, Hbone, Passthrough, Refuse, plan_outbound
from agent.proxy.splice import SpliceStats, splice
from agent.redirect import MESH_MARK, PodRedirection, original_destination
from mesh.authz import ConnInfo, authorize
from mesh.config import MeshSnapshot, Workload
from mesh.hbone import (
    Baggage,
    ConnectInfo,
    HboneError,
    HbonePool,
    HboneServer,
    TunnelRefused,
    TunnelRequest,
    TunnelStats,
    relay,
    workload_baggage,
)
from mesh.identity import WorkloadCert

log = logging.getLogger("nodemesh.agent.pod")

MAX_ENDPOINT_ATTEMPTS = 3


def _rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _addr(a: tuple[str, int] | Sequence[object]) -> str:
    return f"{a[0]}:{a[1]}"


@dataclass
class _HboneStream:
    """What inbound HBONE knows of one stream between the policy check and its end."""

    labels: ConnLabels
    rec: AccessRecord
    conn: ConnInfo
    live_id: int = 0


class SocketStock:
    """Marked sockets made ahead of time in the pod's namespace.

    Making a socket in another namespace takes a hop to a helper thread; keeping a few ready takes that
    hop off the path of every new connection.
    """

    def __init__(self, make: Callable[[], Awaitable[socket.socket]], size: int = 8) -> None:
        self.make = make
        self.size = size
        self._ready: list[socket.socket] = []
        self._refilling: asyncio.Task[None] | None = None

    async def _make(self) -> socket.socket:
        s = await self.make()
        s.setblocking(False)
        return s

    async def get(self) -> socket.socket:
        if self._ready:
            sock = self._ready.pop()
        else:
            sock = await self._make()
        if len(self._ready) < self.size // 2 and (self._refilling is None or self._refilling.done()):
            self._refilling = asyncio.ensure_future(self._refill())
        return sock

    async def _refill(self) -> None:
        with contextlib.suppress(RuntimeError):  # worker closed while refilling
            while len(self._ready) < self.size:
                self._ready.append(await self._make())

    def close(self) -> None:
        for s in self._ready:
            s.close()
        self._ready.clear()
        if self._refilling is not None:
            self._refilling.cancel()


class PodProxy:
    def __init__(self, ctx: AgentContext, workload: Workload, redirection: PodRedirection) -> None:
        self.ctx = ctx
        self.workload = workload
        self.redirection = redirection
        self.ip = str(redirection.pod.ip)
        self.identity = spiffe_of(workload)
        self.baggage = _baggage(workload)  # what this pod says of itself in every tunnel it opens
        self.stock = SocketStock(redirection.socket_async)
        # Towards the app the client's address is kept (IP_TRANSPARENT); both backends route the app's
        # replies back to the agent's socket. With eBPF the connection must also be announced (below).
        self.spoof = redirection.backend == "nftables" or redirection.program is not None
        self.pool = HbonePool(bundle=ctx.bundle, mark=MESH_MARK, socket_factory=self.stock.get)
        self.live = LiveConnections()
        self.hbone = HboneServer(
            self._server_cert, ctx.trust_domain, ctx.bundle,
            authorize=self._authorize_hbone, connect_upstream=self._dial_app_hbone,
            on_tunnel_closed=self._hbone_closed,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._hbone_meta: dict[tuple[int, int], _HboneStream] = {}
        self._rng = random.Random()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        lst = self.redirection.listeners
        for sock in (lst.outbound, lst.inbound):
            sock.setblocking(False)
        self._accept_tasks = [
            asyncio.ensure_future(self._accept_loop(lst.outbound, self._outbound)),
            asyncio.ensure_future(self._accept_loop(lst.inbound, self._inbound_plain)),
        ]
        # The server closes the socket it serves on when it stops; the redirection keeps the original.
        await self.hbone.serve_socket(lst.hbone.dup())
        self.ctx.certs.track(self.identity)

    def update(self, workload: Workload) -> None:
        self.workload = workload
        self.baggage = _baggage(workload)

    async def stop(self, drain: float = 0.0) -> None:
        """Stop accepting; wait up to `drain` seconds for live connections, then cut what is left."""
        self._closing = True
        for t in self._accept_tasks:
            t.cancel()
        await self.hbone.close(drain_timeout=drain)
        if drain and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=drain)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self.pool.close(drain_timeout=0.5)
        self.stock.close()

    async def _accept_loop(self, listener: socket.socket, handler: object) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                conn, peer = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                log.warning("%s: accept failed: %s", self.workload.name, e)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            # Small writes go out at once: a relay that waits for Nagle adds the peer's delayed-ACK
            # time (up to 40 ms) to every pipelined request.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(handler(conn, peer))  # type: ignore[operator]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- outbound ------------------------------------------------------------------------------------
    def _choose(self, keys: Sequence[str], exclude: set[str]) -> str | None:
        return pick(keys, self.ctx.endpoints, exclude=exclude, rng=self._rng)

    async def _outbound(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        ctx = self.ctx
        try:
            dst_ip, dst_port = original_destination(conn)
        except OSError as e:
            log.warning("%s: no original destination: %s", self.workload.name, e)
            _rst_close(conn)
            return
        rec = AccessRecord(direction="outbound", src_addr=_addr(peer), dst_addr=f"{dst_ip}:{dst_port}",
                           src_workload=self.workload.name, src_namespace=self.workload.namespace)
        labels = ConnLabels(reporter="source", source=peer_of(self.workload, str(self.identity)))
        failed: set[str] = set()
        snap = ctx.store.snapshot
        for _attempt in range(MAX_ENDPOINT_ATTEMPTS):
            plan = plan_outbound(snap, self.workload, dst_ip, dst_port, lambda k: self._choose(k, failed))
            self._label_destination(labels, rec, plan)
            if isinstance(plan, Refuse):
                labels.response_flags = plan.flag
                rec.error = plan.reason if not failed else f"{rec.error}; {plan.reason}"
                break
            try:
                if isinstance(plan, Hbone):
                    await self._outbound_hbone(conn, peer, plan, labels, rec)
                else:
                    await self._outbound_tcp(conn, plan, labels, rec)
                return
            except (OSError, HboneError, TimeoutError) as e:
                retriable = not isinstance(e, TunnelRefused) or e.status == 503
                if isinstance(e, TunnelRefused) and e.status == 401:
                    labels.response_flags = "DENY"
                else:
                    labels.response_flags = "CONNECT"
                rec.error = f"{type(e).__name__}: {e}"
                if isinstance(plan, Hbone | Direct):
                    ctx.endpoints.mark_failed(plan.endpoint_key)
                    failed.add(plan.endpoint_key)
                # Another endpoint of the same Service may answer; a pod IP or a denial will not change.
                if not (retriable and isinstance(plan, Hbone | Direct) and plan.service is not None
                        and not getattr(plan, "via_waypoint", False)):
                    break
        ctx.metrics.refused(labels)
        ctx.access_log.write(rec)
        _rst_close(conn)

    def _label_destination(self, labels: ConnLabels, rec: AccessRecord, plan: object) -> None:
        wl: Workload | None = getattr(plan, "workload", None)
        svc = getattr(plan, "service", None)
        if isinstance(plan, Hbone):
            principal = plan.identities[0]
            rec.dst_hbone_addr = plan.authority
            rec.dst_identity = principal
            labels.mtls = True
        else:
            principal = ""
        if isinstance(plan, Hbone) and plan.via_waypoint:
            labels.destination = peer_of(None, principal)
            rec.dst_workload = wl.name if wl else ""
        else:
            labels.destination = peer_of(wl, principal)
            if wl is not None:
                rec.dst_workload, rec.dst_namespace = wl.name, wl.namespace
        if svc is not None:
            labels.service_host, labels.service_namespace, labels.service_name = svc.hostname, svc.namespace, svc.name
            rec.dst_service = svc.hostname

    async def _cert(self) -> WorkloadCert:
        return await self.ctx.certs.get(self.identity, timeout=self.ctx.connect_timeout)

    async def _outbound_hbone(self, conn: socket.socket, peer: tuple[str, int], plan: Hbone, labels: ConnLabels,
                              rec: AccessRecord) -> None:
        ctx = self.ctx
        cert = await self._cert()
        request = TunnelRequest(authority=plan.authority, src_addr=(peer[0], int(peer[1])), baggage=self.baggage)
        tunnel = await asyncio.wait_for(
            self.pool.connect(cert, plan.dst, plan.identities, request, source_ip=self.ip), ctx.connect_timeout)
        ctx.endpoints.acquire(plan.endpoint_key)
        ctx.metrics.open(labels)
        try:
            stats: TunnelStats = await relay(tunnel, conn)
        finally:
            ctx.endpoints.release(plan.endpoint_key)
        # Source reporter: `received` = bytes from the client (request direction), `sent` = back to it.
        rec.bytes_sent, rec.bytes_recv = stats.sent, stats.received
        rec.error = stats.error or "" if stats.reset else ""
        ctx.metrics.close(labels, received=stats.sent, sent=stats.received, failed=stats.reset)
        ctx.access_log.write(rec)

    async def _outbound_tcp(self, conn: socket.socket, plan: Direct | Passthrough, labels: ConnLabels,
                            rec: AccessRecord) -> None:
        ctx = self.ctx
        up = await dial.connect(self.stock.get, plan.dst, timeout=ctx.connect_timeout)
        key = plan.endpoint_key if isinstance(plan, Direct) else None
        if key:
            ctx.endpoints.acquire(key)
        ctx.metrics.open(labels)
        try:
            stats = await splice(conn, up)
        finally:
            if key:
                ctx.endpoints.release(key)
        self._finish(labels, rec, stats, from_client="a")

    def _finish(self, labels: ConnLabels, rec: AccessRecord, stats: SpliceStats, from_client: str) -> None:
        up, down = (stats.a_to_b, stats.b_to_a) if from_client == "a" else (stats.b_to_a, stats.a_to_b)
        rec.bytes_sent, rec.bytes_recv = up, down
        rec.error = stats.error if stats.reset else ""
        self.ctx.metrics.close(labels, received=up, sent=down, failed=stats.reset)
        self.ctx.access_log.write(rec)

    # -- inbound: shared ------------------------------------------------------------------------------
    def _inbound_labels(self, src_ip: str, principal: str, snap: MeshSnapshot) -> tuple[ConnLabels, Workload | None]:
        src = snap.workload_by_ip(src_ip)
        labels = ConnLabels(reporter="destination", source=peer_of(src, principal),
                            destination=peer_of(self.workload, str(self.identity)), mtls=bool(principal))
        return labels, src

    def _service_of(self, port: int, labels: ConnLabels, rec: AccessRecord, snap: MeshSnapshot) -> None:
        for svc in snap.services_of(self.workload):
            if port in svc.ports.values():
                labels.service_host, labels.service_namespace, labels.service_name = (
                    svc.hostname, svc.namespace, svc.name)
                rec.dst_service = svc.hostname
                return

    async def _dial_app(self, port: int, client_ip: str) -> socket.socket:
        spoof = client_ip if self.spoof and client_ip != self.ip else None
        announce = (lambda ip, sport: self._announce(ip, sport, port)) if self.redirection.program else None
        return await dial.connect(self.stock.get, (self.ip, port), spoof_source=spoof, announce=announce,
                                  timeout=self.ctx.connect_timeout)

    def _announce(self, client_ip: str, client_port: int, app_port: int) -> dial.Callable[[], None]:
        prog = self.redirection.program
        assert prog is not None
        key = prog.agent_conn_key(self.redirection.pod.ip, client_ip, client_port, app_port)
        prog.announce_agent_conn(key)
        return lambda: prog.forget_agent_conn(key)

    # -- inbound plaintext (15006) ---------------------------------------------------------------------
    async def _inbound_plain(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        ctx = self.ctx
        snap = ctx.store.snapshot
        dst_ip, dst_port = original_destination(conn)
        labels, src = self._inbound_labels(peer[0], "", snap)
        rec = AccessRecord(direction="inbound", src_addr=_addr(peer), dst_addr=f"{dst_ip}:{dst_port}",
                           src_workload=src.name if src else "", src_namespace=src.namespace if src else "",
                           dst_workload=self.workload.name, dst_namespace=self.workload.namespace)
        self._service_of(dst_port, labels, rec, snap)
        info = ConnInfo(src_ip=peer[0], dst_ip=self.ip, dst_port=dst_port, src_port=int(peer[1]))
        decision = authorize(info, snap)
        if not decision.allowed:
            labels.response_flags = "DENY"
            rec.error = f"policy rejection: {decision}"
            ctx.metrics.refused(labels)
            ctx.access_log.write(rec)
            _rst_close(conn)
            return
        try:
            up = await self._dial_app(dst_port, peer[0])
        except (OSError, TimeoutError) as e:
            labels.response_flags = "CONNECT"
            rec.error = f"connecting to the application failed: {e}"
            ctx.metrics.refused(labels)
            ctx.access_log.write(rec)
            _rst_close(conn)
            return
        cid = self.live.add(info, lambda why: self._cut(conn, up), rec.src_addr)
        ctx.metrics.open(labels)
        try:
            stats = await splice(conn, up)
        finally:
            self.live.remove(cid)
        self._finish(labels, rec, stats, from_client="a")

    @staticmethod
    def _cut(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)

    # -- inbound HBONE (15008) --------------------------------------------------------------------------
    async def _server_cert(self, local: tuple[str, int]) -> WorkloadCert:
        return await self._cert()

    def _client_ip(self, info: ConnectInfo) -> str:
        """The tunnel's own TCP source: the calling pod's IP (its agent dials from inside that pod), or the
        waypoint's. Never the `forwarded` header, which the caller writes: trusting it would let any mesh
        workload claim another address and slip past an ipBlocks rule."""
        return info.peer_address[0]

    def _authorize_hbone(self, info: ConnectInfo) -> bool:
        ctx = self.ctx
        snap = ctx.store.snapshot
        client_ip = self._client_ip(info)
        port = info.destination[1]
        principal = str(info.peer_identity)
        labels, src = self._inbound_labels(client_ip, principal, snap)
        rec = AccessRecord(direction="inbound", src_addr=f"{client_ip}:{_src_port(info)}",
                           dst_addr=_addr(info.local_address), dst_hbone_addr=f"{self.ip}:{port}",
                           src_workload=src.name if src else "", src_namespace=src.namespace if src else "",
                           src_identity=principal, dst_workload=self.workload.name,
                           dst_namespace=self.workload.namespace, dst_identity=str(self.identity))
        self._service_of(port, labels, rec, snap)
        conn = ConnInfo(src_ip=client_ip, dst_ip=self.ip, dst_port=port, src_identity=info.peer_identity,
                        src_port=_src_port(info))
        decision = authorize(conn, snap)
        if not decision.allowed:
            labels.response_flags = "DENY"
            rec.error = f"policy rejection: {decision}"
            ctx.metrics.refused(labels)
            ctx.access_log.write(rec)
            return False
        self._hbone_meta[(info.connection_id, info.stream_id)] = _HboneStream(labels, rec, conn)
        return True

    async def _dial_app_hbone(self, info: ConnectInfo) -> socket.socket:
        key = (info.connection_id, info.stream_id)
        try:
            up = await self._dial_app(info.destination[1], self._client_ip(info))
        except (OSError, TimeoutError) as e:
            meta = self._hbone_meta.pop(key, None)
            if meta is not None:
                meta.labels.response_flags = "CONNECT"
                meta.rec.error = f"connecting to the application failed: {e}"
                self.ctx.metrics.refused(meta.labels)
                self.ctx.access_log.write(meta.rec)
            raise
        meta = self._hbone_meta.get(key)
        if meta is not None:
            meta.live_id = self.live.add(meta.conn, lambda why: self._cut(up), meta.rec.src_addr)
            self.ctx.metrics.open(meta.labels)
        return up

    def _hbone_closed(self, info: ConnectInfo, stats: TunnelStats) -> None:
        meta = self._hbone_meta.pop((info.connection_id, info.stream_id), None)
        if meta is None:
            return
        labels, rec = meta.labels, meta.rec
        self.live.remove(meta.live_id)
        # The relay's `sent` is app -> tunnel (back to the client), `received` tunnel -> app.
        rec.bytes_sent, rec.bytes_recv = stats.sent, stats.received
        rec.error = (stats.error or "reset") if stats.reset else ""
        self.ctx.metrics.close(labels, received=stats.received, sent=stats.sent, failed=stats.reset)
        self.ctx.access_log.write(rec)


def _baggage(w: Workload) -> Baggage:
    return workload_baggage(namespace=w.namespace, workload=w.name, service=w.canonical_name or w.name)


def _src_port(info: ConnectInfo) -> int:
    return int(info.peer_address[1])


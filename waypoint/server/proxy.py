"""The per-request pipeline of the waypoint, in Envoy's filter order:

    authorization -> routing -> user filters -> fault injection -> mirrors -> circuit breaker ->
    load balancing (outlier-ejected hosts left out) -> upstream attempts with retries and timeouts ->
    response header rules and filters -> metrics, access log, trace span

Every decision is made by the sans-IO cores (`waypoint.authz`, `waypoint.routing`, `waypoint.resilience`,
`waypoint.lb`); this module only does what they say, with real sockets and real time, and records what
happened in one `RequestRecord`. What a user sees must be what Envoy shows: the same status codes and
bodies for local replies, the same `x-envoy-*` headers, the same response flags in logs and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh.config import Workload
from waypoint.accesslog import AccessLog
from waypoint.authz import AuthzPolicy, evaluate
from waypoint.config.model import Backend, HeaderMutation, ServiceRef
from waypoint.config.store import ConfigStore, WaypointConfig
from waypoint.filters import Filter, FilterContext, FilterResponse
from waypoint.flags import LocalReply, ResponseFlag, cluster_not_found, no_healthy_upstream
from waypoint.lb import LbContext, request_hash
from waypoint.metrics import WaypointMetrics
from waypoint.record import Peer, RequestRecord
from waypoint.resilience.fault import decide_fault
from waypoint.resilience.retry import (
    DEFAULT_RETRY_POLICY,
    Finish,
    PerTryTimeout,
    Retry,
    RetryState,
    UpstreamReset,
    UpstreamResponse,
)
from waypoint.routing import Headers, RequestView, RouteDecision, apply_mutation, normalize_path, route
from waypoint.server.body import Body, BodyNotReplayable
from waypoint.server.clusters import Cluster, Clusters, Destination, EndpointInfo, Resolver, target_for
from waypoint.server.context import ConnectionContext
from waypoint.server.messages import HOP_BY_HOP, HTTP2, DownstreamRequest, RequestHead, Responder, ResponseHead
from waypoint.server.upstream import Exchange, UpstreamError, UpstreamPool
from waypoint.tracing import TraceContext, Tracer, ensure_request_id

log = logging.getLogger("waypoint.proxy")

# Request headers that steer Envoy itself; consumed here, never forwarded as the client sent them.
ENVOY_CONTROL = frozenset({
    "x-envoy-max-retries", "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names", "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count", "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-is-timeout-retry",
})
_STRIP_UPSTREAM = ENVOY_CONTROL | HOP_BY_HOP | {"host"}
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
BUFFER_EXCEEDED = LocalReply(507, b"exceeded request buffer limit while retrying upstream", (), frozenset(),
                             "request_payload_exceeded_retry_buffer_limit")


def grpc_timeout(value: str | None) -> float | None:
    """`grpc-timeout: 250m` -> 0.25 s (None when absent or malformed; 8 digits at most)."""
    if not value or len(value) < 2 or len(value) > 9 or value[-1] not in _GRPC_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _GRPC_UNITS[value[-1]]


def peer_of(wl: Workload | None, principal: str | None) -> Peer:
    if wl is None:
        return Peer(principal=principal or "unknown")
    labels = wl.labels
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or "unknown"
    return Peer(
        workload=wl.workload_name or wl.name or "unknown",
        namespace=wl.namespace or "unknown",
        principal=principal or wl.identity,
        app=app,
        version=labels.get("version") or labels.get("app.kubernetes.io/version") or "unknown",
        canonical_service=wl.canonical_name or (app if app != "unknown" else wl.name) or "unknown",
        canonical_revision=wl.canonical_revision or "latest",
        cluster=wl.cluster_id or "Kubernetes",
    )


@dataclass(slots=True)
class _Call:
    request: DownstreamRequest
    responder: Responder
    ctx: ConnectionContext
    rec: RequestRecord
    trace: TraceContext | None = None
    fctx: FilterContext | None = None
    raw_bytes: tuple[int, int] = (0, 0)


class Proxy:
    def __init__(self, *, config: ConfigStore, resolver: Resolver, clusters: Clusters, upstream: UpstreamPool,
                 metrics: WaypointMetrics, access_log: AccessLog, tracer: Tracer, filters: Sequence[Filter] = (),
                 rng: random.Random | None = None, mirror_limit: int = 64) -> None:
        self.config = config
        self.resolver = resolver
        self.clusters = clusters
        self.upstream = upstream
        self.metrics = metrics
        self.access_log = access_log
        self.tracer = tracer
        self.filters = list(filters)
        self.rng = rng or random.Random()
        self.loop = asyncio.get_running_loop()
        self.mirror_limit = mirror_limit
        self._mirrors: set[asyncio.Task[Any]] = set()
        self._authz: dict[tuple[int, ServiceRef | None, str], tuple[AuthzPolicy, ...]] = {}
        self._peers: dict[tuple[int, str | None, str | None], Peer] = {}

    # ---- entry points ------------------------------------------------------------------------------

    async def handle(self, request: DownstreamRequest, responder: Responder, ctx: ConnectionContext) -> None:
        head = request.head
        rec = RequestRecord(time.time(), self.loop.time(), head.method, head.path, head.protocol,
                            head.authority or "-")
        rec.bytes_received = head.header_bytes
        rec.downstream_local_address = ctx.destination_text
        if ctx.source is not None:
            rec.downstream_remote_address = f"{ctx.source[0]}:{ctx.source[1]}"
        rec.mutual_tls = ctx.peer_identity is not None
        rec.grpc = request.is_grpc
        call = _Call(request, responder, ctx, rec)
        try:
            await self._serve(call)
        except asyncio.CancelledError:
            rec.flags.add(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
            if not responder.head_sent:
                rec.response_code = 0
            raise
        except ConnectionError:
            rec.flags.add(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        finally:
            self._finish(call)

    async def refuse_connect(self, request: DownstreamRequest, responder: Responder,
                             ctx: ConnectionContext) -> None:
        head = request.head
        rec = RequestRecord(time.time(), self.loop.time(), head.method, head.path or "-", head.protocol,
                            head.authority or "-")
        call = _Call(request, responder, ctx, rec)
        try:
            self._send_local(call, LocalReply(403, b"", (), frozenset(), "upgrade_failed"))
        finally:
            self._finish(call)

    def protocol_error(self, ctx: ConnectionContext, status: int, details: str, flag: ResponseFlag | None,
                       bytes_sent: int, *, body: bytes = b"", protocol: str = "HTTP/1.1") -> None:
        rec = RequestRecord(time.time(), self.loop.time(), protocol=protocol)
        rec.response_code = status
        rec.details = details
        if flag is not None:
            rec.flags.add(flag)
        rec.bytes_sent = bytes_sent
        rec.downstream_local_address = ctx.destination_text
        rec.mutual_tls = ctx.peer_identity is not None
        if ctx.source is not None:
            rec.downstream_remote_address = f"{ctx.source[0]}:{ctx.source[1]}"
        rec.source = self._source_peer(ctx)
        dest = self.resolver.destination(*ctx.destination)
        if dest is not None:
            self._describe_destination(rec, dest)
        self._emit(rec, None)

    # ---- the pipeline ------------------------------------------------------------------------------

    async def _serve(self, call: _Call) -> None:
        request, ctx, rec = call.request, call.ctx, call.rec
        head = request.head
        path = head.path
        if not path.startswith("/") and not (head.method == "OPTIONS" and path == "*"):
            self._send_local(call, LocalReply(400, b"", (), frozenset({ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR}),
                                              "http1.invalid_url"))
            return
        if not head.authority:
            self._send_local(call, LocalReply(400, b"", (), frozenset({ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR}),
                                              "missing_host_header"))
            return
        headers = Headers(head.headers)
        rec.request_id = ensure_request_id(headers)
        rec.user_agent = headers.get("user-agent")
        rec.forwarded_for = headers.get("x-forwarded-for")
        rec.source = self._source_peer(ctx)
        dest = self.resolver.destination(*ctx.destination)
        if dest is None:
            self._send_local(call, cluster_not_found(503))
            return
        self._describe_destination(rec, dest)
        call.trace = self.tracer.start(headers, time.time_ns(), f"{rec.destination_service}:{dest.port}/*")
        rec.sampled = call.trace.sampled
        view = RequestView(head.method, normalize_path(path), head.authority, head.scheme, headers,
                           source_principal=ctx.peer_identity, source_ip=ctx.source_ip,
                           destination_ip=ctx.destination[0], destination_port=dest.port)
        config = self.config.snapshot()
        policies = self._policies(config, dest)
        if policies:
            verdict = evaluate(policies, view)
            if not verdict.allowed:
                self._send_local(call, verdict.reply())
                return
        decision = self._route(config, dest, view)
        if isinstance(decision, LocalReply):
            self._send_local(call, decision)
            return
        rec.route_name = decision.route_name
        backend = decision.backend
        port = backend.port or dest.port
        cluster = self.clusters.get(config, backend, port)
        if cluster is None:
            self._send_local(call, cluster_not_found(503))
            return
        rec.upstream_cluster = cluster.name
        upstream_headers = decision.upstream.headers
        if self.filters:
            fctx = FilterContext(head.method, decision.upstream.path, decision.upstream.authority, upstream_headers,
                                 decision.route_name, cluster.name, rec.destination_service, ctx.peer_identity,
                                 view.source_namespace, ctx.source_ip, request.is_grpc)
            call.fctx = fctx
            for flt in self.filters:
                hook = getattr(flt, "on_request", None)
                if hook is None:
                    continue
                result = hook(fctx)
                if inspect.isawaitable(result):
                    result = await result
                if isinstance(result, LocalReply):
                    self._send_local(call, result)
                    return
        fault = decide_fault(decision.fault, self.rng)
        if fault.delay is not None:
            rec.flags.add(ResponseFlag.DELAY_INJECTED)
            await asyncio.sleep(fault.delay)
        if fault.abort is not None:
            self._send_local(call, fault.abort)
            return
        for mirror in decision.mirrors:
            self._mirror(config, mirror, port, decision, request.body, head)
        hosts, infos = self._endpoints(dest, backend, port, cluster)
        if not hosts:
            self._send_local(call, no_healthy_upstream())
            return
        admitted = cluster.breaker.admit_request()
        if isinstance(admitted, LocalReply):
            self._send_local(call, admitted)
            return
        try:
            await self._forward(call, view, decision, cluster, hosts, infos)
        finally:
            admitted.release()

    def _route(self, config: WaypointConfig, dest: Destination, view: RequestView) -> RouteDecision | LocalReply:
        ref = dest.service_ref
        if ref is not None:
            return route(view, config.route_table(ref), rng=self.rng)
        wl = dest.workload
        assert wl is not None
        # Pod-addressed traffic is forwarded to that pod after policy, without Service routing.
        backend = Backend(host=str(wl.workload_ips[0]), namespace=wl.namespace, name=wl.name, port=dest.port)
        return RouteDecision(route_name="default", entry=None, backend=backend, upstream=view,
                             response_headers=HeaderMutation(), retry=DEFAULT_RETRY_POLICY)

    def _endpoints(self, dest: Destination, backend: Backend, port: int, cluster: Cluster
                   ) -> tuple[list[Any], dict[str, EndpointInfo]]:
        if dest.workload is not None and dest.service is None:
            from waypoint.lb import Endpoint

            info = EndpointInfo(dest.workload, str(dest.workload.workload_ips[0]), port)
            return [Endpoint(info.address)], {info.address: info}
        return self.resolver.endpoints(backend, port, dict(cluster.policy.subset_labels))

    def _policies(self, config: WaypointConfig, dest: Destination) -> tuple[AuthzPolicy, ...]:
        ref = dest.service_ref
        ns = dest.workload.namespace if dest.workload is not None else ""
        key = (config.version, ref, ns)
        cached = self._authz.get(key)
        if cached is None:
            cached = config.authz_policies(ref if ref is not None else ServiceRef(ns, ""))
            if len(self._authz) > 4096:
                self._authz.clear()
            self._authz[key] = cached
        return cached

    def _source_peer(self, ctx: ConnectionContext) -> Peer:
        version = self.resolver.snapshot.version
        key = (version, ctx.source_ip, ctx.peer_identity)
        peer = self._peers.get(key)
        if peer is None:
            wl = self.resolver.workload_by_ip(ctx.source_ip)
            if wl is not None and ctx.peer_identity is not None and wl.identity != ctx.peer_identity:
                wl = None  # the address claims a workload the certificate does not prove
            peer = peer_of(wl, ctx.peer_identity)
            if len(self._peers) > 4096:
                self._peers.clear()
            self._peers[key] = peer
        return peer

    def _workload_peer(self, wl: Workload) -> Peer:
        key = (self.resolver.snapshot.version, wl.uid, None)
        peer = self._peers.get(key)
        if peer is None:
            peer = peer_of(wl, wl.identity)
            self._peers[key] = peer
        return peer

    def _describe_destination(self, rec: RequestRecord, dest: Destination) -> None:
        svc = dest.service
        if svc is not None:
            rec.destination_service = svc.hostname
            rec.destination_service_name = svc.name
            rec.destination_service_namespace = svc.namespace
        elif dest.workload is not None:
            rec.destination_service = str(dest.workload.workload_ips[0])
            rec.destination_service_namespace = dest.workload.namespace

    # ---- upstream attempts -------------------------------------------------------------------------

    async def _forward(self, call: _Call, view: RequestView, decision: RouteDecision, cluster: Cluster,
                       hosts: list[Any], infos: dict[str, EndpointInfo]) -> None:
        loop = self.loop
        request, ctx, rec = call.request, call.ctx, call.rec
        head = request.head
        body = request.body
        upstream_view = decision.upstream
        if call.trace is not None:
            self.tracer.propagate(call.trace, upstream_view.headers)
        base = [(n, v) for n, v in upstream_view.headers.items() if n not in _STRIP_UPSTREAM]
        if "x-forwarded-proto" not in upstream_view.headers:
            base.append(("x-forwarded-proto", head.scheme or "http"))
        if head.upgrade is not None:
            base += [("connection", "upgrade"), ("upgrade", head.upgrade)]
        timeout = decision.timeout
        if request.is_grpc:
            gt = grpc_timeout(view.headers.get("grpc-timeout"))
            if gt is not None:
                timeout = gt if timeout is None else min(timeout, gt)
        state = RetryState.with_request_overrides(decision.retry, view.headers, now=loop.time(),
                                                  route_timeout=timeout, rng=self.rng)
        route_timeout = state.route_timeout
        body_watch: asyncio.Task[None] | None = None
        if route_timeout is not None and not body.complete:
            # Envoy arms the route timer only once the whole request has reached the router.
            state.deadline = None
            body_watch = loop.create_task(self._arm_when_complete(body, state, route_timeout))
        policy = state.policy
        lb = cluster.policy.lb
        hashed = request_hash(lb.hash_policy, view) if lb.hash_policy is not None else None
        picker = cluster.picker(policy.host_selection_max_attempts)
        avoid_previous = policy.retry_previous_hosts and lb.hash_policy is None
        http2 = head.protocol == HTTP2
        retry_permits: list[Any] = []

        def admit_retry() -> bool:
            permit = cluster.breaker.admit_retry()
            if permit is None:
                return False
            retry_permits.append(permit)
            return True

        exchange: Exchange | None = None
        rhead: ResponseHead | None = None
        final: Finish | None = None
        active: str | None = None
        attempt_started = 0.0
        try:
            while True:
                now = loop.time()
                plan = state.begin_attempt(now)
                rec.attempts = plan.attempt
                healthy = cluster.healthy(hosts)
                if not healthy:
                    final = Finish(reply=no_healthy_upstream(), attempts=plan.attempt)
                    break
                lbctx = LbContext(hashed.key if hashed is not None else None, cluster.active_requests)
                host = picker.pick(healthy, lbctx, avoid_previous)
                if host is None:
                    final = Finish(reply=no_healthy_upstream(), attempts=plan.attempt)
                    break
                info = infos[host.address]
                try:
                    reader = body.reader()
                except BodyNotReplayable:
                    final = Finish(reply=BUFFER_EXCEEDED, attempts=plan.attempt)
                    break
                up_head = RequestHead(head.method, upstream_view.path, upstream_view.authority,
                                      base + list(plan.headers), head.scheme, head.protocol, head.upgrade)
                active = host.address
                cluster.active[active] = cluster.active.get(active, 0) + 1
                rec.upstream_host = f"envoy://connect_originate/{info.address}"
                rec.destination = self._workload_peer(info.workload)
                exchange = rhead = None
                attempt_started = loop.time()
                outcome: UpstreamResponse | UpstreamReset | PerTryTimeout
                wait = self._attempt_timeout(state, plan.per_try_timeout, now)
                try:
                    if wait is None and state.deadline is None and body_watch is None:
                        exchange = await self.upstream.send(cluster.connections, target_for(info, http2), up_head,
                                                            reader, source=ctx.source,
                                                            dedicated=head.upgrade is not None)
                        rhead = await exchange.head
                    else:
                        async with asyncio.timeout(wait) as scope:
                            exchange = await self.upstream.send(cluster.connections, target_for(info, http2),
                                                                up_head, reader, source=ctx.source,
                                                                dedicated=head.upgrade is not None)
                            rhead = await self._await_head(exchange, state, scope, plan.per_try_timeout,
                                                           attempt_started)
                    outcome = UpstreamResponse(rhead.status, tuple(rhead.headers))
                    rec.upstream_service_time = str(int((loop.time() - attempt_started) * 1000))
                except UpstreamError as exc:
                    outcome = UpstreamReset(exc.reason, exc.request_sent)
                    rec.transport_failure = exc.detail or None
                except TimeoutError:
                    if exchange is not None:
                        exchange.abort()
                    if state.deadline is not None and loop.time() >= state.deadline - 0.0005:
                        self._release(cluster, active)
                        active = None
                        final = state.on_route_timeout()
                        break
                    outcome = PerTryTimeout()
                if cluster.outlier is not None:
                    cluster.outlier.record_outcome(host.address, outcome)
                step = state.on_outcome(outcome, loop.time(), admit_retry=admit_retry)
                if isinstance(step, Finish):
                    final = step
                    break
                # Retry: drop this attempt's response, wait the jittered backoff, go again.
                if exchange is not None:
                    exchange.abort()
                self._release(cluster, active)
                active = None
                if not body.replayable:
                    final = Finish(reply=BUFFER_EXCEEDED, attempts=plan.attempt)
                    break
                assert isinstance(step, Retry)
                if not await self._backoff(state, step.backoff):
                    final = state.on_route_timeout()
                    break
            assert final is not None
            rec.attempts = max(rec.attempts, final.attempts)
            rec.flags.update(final.flags)
            if final.reply is not None:
                if exchange is not None and final.response is None:
                    exchange.abort()
                self._send_local(call, final.reply)
                return
            assert exchange is not None and rhead is not None
            if rhead.status == 101 and head.upgrade is not None:
                await self._splice_upgrade(call, exchange, rhead)
                return
            await self._relay_response(call, decision, exchange, rhead, state, hashed.set_cookie if hashed else None)
        finally:
            if active is not None:
                self._release(cluster, active)
            for permit in retry_permits:
                permit.release()
            if body_watch is not None:
                body_watch.cancel()

    @staticmethod
    def _attempt_timeout(state: RetryState, per_try: float | None, now: float) -> float | None:
        left = state.remaining(now)
        if per_try is None:
            return left
        return per_try if left is None else min(per_try, left)

    async def _await_head(self, exchange: Exchange, state: RetryState, scope: asyncio.Timeout,
                          per_try: float | None, started: float) -> ResponseHead:
        """Wait for the response head; the route deadline may be armed meanwhile (streaming body)."""
        while True:
            deadline = state.deadline
            limit = started + per_try if per_try is not None else None
            if deadline is not None:
                limit = deadline if limit is None else min(limit, deadline)
            if scope.when() != limit:
                scope.reschedule(limit)
            if deadline is not None or exchange.head.done():
                return await exchange.head
            # No route deadline yet: wake up when the body completes to re-arm.
            done, _ = await asyncio.wait([exchange.head], timeout=0.05)
            if done:
                return exchange.head.result()

    async def _arm_when_complete(self, body: Body, state: RetryState, timeout: float) -> None:
        with contextlib.suppress(Exception):
            await body.wait_complete()
        if body.complete:
            state.deadline = self.loop.time() + timeout

    async def _backoff(self, state: RetryState, delay: float) -> bool:
        """Sleep the backoff; False when the route timeout expires first."""
        left = state.remaining(self.loop.time())
        if left is not None and left <= delay:
            await asyncio.sleep(left)
            return False
        await asyncio.sleep(delay)
        return True

    @staticmethod
    def _release(cluster: Cluster, address: str | None) -> None:
        if address is None:
            return
        n = cluster.active.get(address, 0) - 1
        if n <= 0:
            cluster.active.pop(address, None)
        else:
            cluster.active[address] = n

    # ---- responses ---------------------------------------------------------------------------------

    async def _relay_response(self, call: _Call, decision: RouteDecision, exchange: Exchange, rhead: ResponseHead,
                              state: RetryState, set_cookie: str | None) -> None:
        responder, rec = call.responder, call.rec
        headers = rhead.headers
        if not decision.response_headers.empty:
            headers = apply_mutation(Headers(headers), decision.response_headers).items()
        headers = [*headers, ("x-envoy-upstream-service-time", rec.upstream_service_time or "0")]
        if set_cookie is not None:
            headers.append(("set-cookie", set_cookie))
        if not any(n == "server" for n, _ in headers):
            headers.append(("server", "istio-envoy"))
        if self.filters and call.fctx is not None:
            headers = await self._response_filters(call, rhead.status, headers, local=False)
        rec.response_code = rhead.status
        if call.rec.grpc:
            for n, v in headers:
                if n == "grpc-status":
                    rec.grpc_status = v
        body = exchange.body
        end = body.complete and body.received == 0 and not body.trailers
        responder.send_head(ResponseHead(rhead.status, headers), end)
        if end:
            return
        reader = body.reader()
        deadline = state.deadline
        completed = False
        try:
            if deadline is None:
                await self._pump_response(reader, responder)
            else:
                async with asyncio.timeout_at(deadline):
                    await self._pump_response(reader, responder)
            completed = True
            trailers = body.trailers
            if trailers:
                if rec.grpc:
                    for n, v in trailers:
                        if n == "grpc-status":
                            rec.grpc_status = v
                responder.send_trailers(trailers)
            else:
                responder.send_data(b"", end_stream=True)
        except UpstreamError as exc:
            rec.flags.add(exc.reason.flag)
            rec.details = "upstream_reset_after_response_started{" + exc.reason.value.replace(" ", "_") + "}"
            responder.reset()
        except TimeoutError:
            rec.flags.add(ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
            rec.details = "upstream_response_timeout"
            responder.reset()
        finally:
            if not completed:
                exchange.abort()
        if completed and rec.details == "-":
            rec.details = "via_upstream"

    @staticmethod
    async def _pump_response(reader: Any, responder: Responder) -> None:
        while True:
            chunk = reader.read_nowait()
            if chunk is None:
                return
            if chunk == b"":
                chunk = await reader.read()
                if chunk is None:
                    return
            responder.send_data(chunk)
            await responder.drain()

    async def _splice_upgrade(self, call: _Call, exchange: Exchange, rhead: ResponseHead) -> None:
        """A WebSocket upgrade the upstream accepted: raw bytes both ways until both sides closed."""
        responder, rec = call.responder, call.rec
        rec.response_code = 101
        rec.details = "via_upstream"
        headers = [(n, v) for n, v in rhead.headers if n not in HOP_BY_HOP]
        responder.send_head(ResponseHead(101, headers), False)
        raw = getattr(responder, "raw", None)
        if raw is None:
            exchange.abort()
            return
        loop = self.loop
        done = loop.create_future()
        counts = [0, 0]
        ended = [False, False]

        def finish_side(i: int) -> None:
            ended[i] = True
            if all(ended) and not done.done():
                done.set_result(None)

        def down(data: bytes) -> None:
            counts[0] += len(data)
            exchange.write_raw(data)

        def down_eof() -> None:
            exchange.write_raw_eof()
            finish_side(0)

        def up(data: bytes) -> None:
            counts[1] += len(data)
            raw.write(data)

        def up_eof() -> None:
            raw.write_eof()
            finish_side(1)

        exchange.set_raw_handlers(up, up_eof)
        raw.start(down, down_eof)
        try:
            await asyncio.wait([done, raw.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            exchange.abort()
            raw.close()
            rec.bytes_received += counts[0]
            call.raw_bytes = (counts[0], counts[1])

    def _send_local(self, call: _Call, reply: LocalReply) -> None:
        responder, rec = call.responder, call.rec
        rec.flags.update(reply.flags)
        rec.details = reply.details or "-"
        if responder.head_sent or responder.gone:
            return
        if rec.grpc:
            headers = reply.grpc_headers()
            status = int(headers[0][1])
            rest = [(n, v) for n, v in headers[1:]]
            for n, v in rest:
                if n == "grpc-status":
                    rec.grpc_status = v
            rest.append(("server", "istio-envoy"))
            rec.response_code = status
            if self.filters and call.fctx is not None:
                rest = self._local_filters(call, status, rest)
            responder.send_head(ResponseHead(status, rest), True)
            return
        body = reply.body
        headers = reply.response_headers()
        headers += [("content-length", str(len(body))), ("server", "istio-envoy")]
        if self.filters and call.fctx is not None:
            headers = self._local_filters(call, reply.status, headers)
        rec.response_code = reply.status
        if call.request.head.method == "HEAD":
            body = b""
        responder.send_head(ResponseHead(reply.status, headers), not body)
        if body:
            responder.send_data(body, end_stream=True)

    def _local_filters(self, call: _Call, status: int, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Response hooks on a local reply (synchronous hooks only: a local reply never waits)."""
        assert call.fctx is not None
        resp = FilterResponse(status, Headers(headers), local=True)
        for flt in reversed(self.filters):
            hook = getattr(flt, "on_response", None)
            if hook is not None:
                result = hook(call.fctx, resp)
                if inspect.isawaitable(result):
                    result.close()  # type: ignore[attr-defined]
                    log.warning("filter %s: async on_response is skipped for local replies",
                                getattr(flt, "name", flt))
        return resp.headers.items()

    async def _response_filters(self, call: _Call, status: int, headers: list[tuple[str, str]],
                                local: bool) -> list[tuple[str, str]]:
        assert call.fctx is not None
        resp = FilterResponse(status, Headers(headers), local=local)
        for flt in reversed(self.filters):
            hook = getattr(flt, "on_response", None)
            if hook is not None:
                result = hook(call.fctx, resp)
                if inspect.isawaitable(result):
                    await result
        return resp.headers.items()

    # ---- mirrors -----------------------------------------------------------------------------------

    def _mirror(self, config: WaypointConfig, backend: Backend, port: int, decision: RouteDecision, body: Body,
                head: RequestHead) -> None:
        if len(self._mirrors) >= self.mirror_limit:
            return
        task = self.loop.create_task(self._shadow(config, backend, port, decision, body, head))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _shadow(self, config: WaypointConfig, backend: Backend, port: int, decision: RouteDecision,
                      body: Body, head: RequestHead) -> None:
        """Envoy shadows after the whole request arrived, to one endpoint, and ignores the answer."""
        try:
            await asyncio.wait_for(body.wait_complete(), 30)
            data = body.buffered()
            if data is None:
                return
            mport = backend.port or port
            cluster = self.clusters.get(config, backend, mport)
            if cluster is None:
                return
            hosts, infos = self.resolver.endpoints(backend, mport, dict(cluster.policy.subset_labels))
            healthy = cluster.healthy(hosts)
            if not healthy:
                return
            info = infos[healthy[self.rng.randrange(len(healthy))].address]
            up = decision.upstream
            headers = [(n, v) for n, v in up.headers.items() if n not in _STRIP_UPSTREAM]
            shadow = RequestHead(head.method, up.path, up.authority, headers, head.scheme, head.protocol)
            exchange = await self.upstream.send(cluster.connections, target_for(info, head.protocol == HTTP2),
                                                shadow, Body.of(data, body.trailers).reader())
            await asyncio.wait_for(exchange.head, 30)
            reader = exchange.body.reader()
            while await asyncio.wait_for(reader.read(), 30) is not None:
                pass
        except Exception as exc:
            log.debug("mirror to %s failed: %r", backend.host, exc)

    # ---- telemetry ---------------------------------------------------------------------------------

    def _finish(self, call: _Call) -> None:
        rec = call.rec
        responder = call.responder
        rec.bytes_received += call.request.body.received
        rec.bytes_sent = responder.bytes_sent + call.raw_bytes[1]
        self._emit(rec, call.trace)

    def _emit(self, rec: RequestRecord, trace: TraceContext | None) -> None:
        rec.duration_ms = int((self.loop.time() - rec.start) * 1000)
        try:
            self.metrics.record(rec)
            self.access_log.log(rec)
            self.tracer.finish(trace, rec, time.time_ns())
        except Exception:  # telemetry must never break a request
            log.exception("recording a request failed")

    async def close(self) -> None:
        for task in list(self._mirrors):
            task.cancel()
        if self._mirrors:
            await asyncio.gather(*self._mirrors, return_exceptions=True)

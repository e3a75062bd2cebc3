"""HBONE end to end over loopback: real TLS 1.3, real HTTP/2 (h2), real TCP upstreams.

Client pool -> HBONE server -> echo/reset servers; sizes from 0 B to 64 MiB compared by hash, both
directions at once, one stream and 100 concurrent streams over one pooled connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct

import pytest
from h2.errors import ErrorCodes

from mesh.hbone import (
    CLIENT_LIMITS,
    INPOD_MARK,
    ConnectionClosedError,
    HboneLimits,
    HbonePool,
    HboneServer,
    TunnelRefused,
    TunnelRequest,
    TunnelReset,
    any_authority,
    relay,
)
from mesh.hbone.errors import HandshakeError
from mesh.hbone.headers import TraceParent, parse_traceparent, workload_baggage
from tests.interop.hbone_env import (
    CLIENT_ID,
    SERVER_ID,
    TRUST_DOMAIN,
    ResetServer,
    echo_roundtrip,
    free_port,
    hbone_env,
    pattern,
    sample_metric,
)

MIB = 1024 * 1024


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 16384, 16385, 1 * MIB + 7, 64 * MIB])
async def test_round_trip_is_byte_exact_both_directions(size: int) -> None:
    async with hbone_env() as env:
        tunnel = await env.tunnel()
        payload = pattern(size, seed=size)
        echoed = await asyncio.wait_for(echo_roundtrip(tunnel, payload), 120)
        assert len(echoed) == size
        assert digest(echoed) == digest(payload)
        await asyncio.wait_for(tunnel.wait_closed(), 10)
        assert tunnel.error is None
        # The server saw the same byte counts, both ways, and the stream ended cleanly.
        await asyncio.sleep(0)
        for _ in range(100):
            if env.closed_tunnels:
                break
            await asyncio.sleep(0.01)
        info, stats = env.closed_tunnels[-1]
        assert (stats.sent, stats.received, stats.reset) == (size, size, False)
        assert info.peer_identity == CLIENT_ID
        for way in ("to_tunnel", "from_tunnel"):
            assert sample_metric(env.registry, "nodemesh_hbone_bytes_total", direction="inbound", way=way) == size


async def test_hundred_concurrent_streams_share_one_connection() -> None:
    async with hbone_env() as env:
        sizes = [0, 64 * MIB, *((i * 37_171) % MIB for i in range(98))]
        tunnels = await asyncio.gather(*(env.tunnel() for _ in sizes))
        assert len(env.pool.connections()) == 1
        assert len(env.server.connections) == 1
        payloads = [pattern(s, seed=i) for i, s in enumerate(sizes)]
        echoed = await asyncio.wait_for(
            asyncio.gather(*(echo_roundtrip(t, p) for t, p in zip(tunnels, payloads, strict=True))), 120)
        assert [digest(e) for e in echoed] == [digest(p) for p in payloads]
        assert env.echo.connections == 100


async def test_pool_opens_a_new_connection_when_streams_are_exhausted() -> None:
    async with hbone_env() as env:
        pool = HbonePool(bundle=env.ca.bundle, metrics=env.metrics, max_streams=3)
        try:
            tunnels = [await env.tunnel(pool=pool) for _ in range(7)]
            conns = pool.connections()
            assert len(conns) == 3  # 3 + 3 + 1
            assert sorted(len(c.tunnels) for c in conns) == [1, 3, 3]
            # Once streams end, their connection takes new ones again instead of dialling.
            for t in tunnels[:3]:
                await echo_roundtrip(t, b"bye")
                await t.wait_closed()
            await env.tunnel(pool=pool)
            assert len(pool.connections()) == 3
        finally:
            await pool.close(0.2)


async def test_pool_respects_peer_max_concurrent_streams() -> None:
    limits = HboneLimits(max_concurrent_streams=2)
    async with hbone_env(limits=limits) as env:
        tunnels = [await env.tunnel() for _ in range(5)]
        assert len(env.pool.connections()) == 3
        for t in tunnels:
            assert await echo_roundtrip(t, b"x" * 10) == b"x" * 10


async def test_pool_keys_on_source_identity_and_destination_identities() -> None:
    async with hbone_env() as env:
        other_cert = env.ca.issue_workload(SERVER_ID)  # a second source identity
        req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}")
        await env.pool.connect(env.client_cert, env.dst, [SERVER_ID], req)
        await env.pool.connect(other_cert, env.dst, [SERVER_ID], req)
        await env.pool.connect(env.client_cert, env.dst, [SERVER_ID, CLIENT_ID], req)
        await env.pool.connect(env.client_cert, env.dst, [SERVER_ID], req)
        assert len(env.pool.connections()) == 3


async def test_half_close_propagates_both_ways() -> None:
    async with hbone_env() as env:
        # client -> upstream: our END_STREAM becomes the echo server's EOF, which then half-closes back.
        tunnel = await env.tunnel()
        reader, writer = tunnel.streams()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert env.echo.received_eof == 0
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # upstream FIN came back as END_STREAM
        assert env.echo.received_eof == 1
        await asyncio.wait_for(tunnel.wait_closed(), 5)

        # upstream -> client first: a server that half-closes at once, yet still reads what we send.
        got: list[bytes] = []

        async def speak_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"hello")
            w.write_eof()
            got.append(await r.read())
            w.close()

        srv = await asyncio.start_server(speak_then_listen, "127.0.0.1", 0)
        try:
            tunnel = await env.tunnel(srv.sockets[0].getsockname()[1])
            reader, writer = tunnel.streams()
            assert await asyncio.wait_for(reader.read(), 5) == b"hello"  # EOF reached us, stream still open
            writer.write(b"after your eof")
            writer.write_eof()
            await asyncio.wait_for(tunnel.wait_closed(), 5)
            for _ in range(500):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [b"after your eof"]
        finally:
            srv.close()
            await srv.wait_closed()


async def test_upstream_reset_resets_the_stream() -> None:
    async with hbone_env() as env:
        rst = await ResetServer(after_bytes=3).start()
        try:
            tunnel = await env.tunnel(rst.port)
            reader, writer = tunnel.streams()
            writer.write(b"abc")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            assert tunnel.closed and isinstance(tunnel.error, TunnelReset)
            assert tunnel.error.error_code == ErrorCodes.CONNECT_ERROR
        finally:
            await rst.close()


async def test_stream_reset_by_client_resets_upstream_tcp() -> None:
    async with hbone_env() as env:
        seen: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

        async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                data = await r.read()
                seen.set_result(data)
            except (ConnectionError, OSError) as exc:
                seen.set_result(exc)
            w.close()

        srv = await asyncio.start_server(upstream, "127.0.0.1", 0)
        try:
            tunnel = await env.tunnel(srv.sockets[0].getsockname()[1])
            tunnel.write(b"partial")
            await asyncio.sleep(0.05)
            tunnel.reset(ErrorCodes.CANCEL)
            result = await asyncio.wait_for(seen, 5)
            assert isinstance(result, ConnectionResetError)  # a RST, not a clean EOF the app could trust
        finally:
            srv.close()
            await srv.wait_closed()


async def test_connect_info_carries_peer_identity_and_client_headers() -> None:
    seen = []

    def authorize(info):
        seen.append(info)
        return True

    async with hbone_env(authorize=authorize) as env:
        tp = TraceParent.generate()
        bag = workload_baggage(cluster="c1", namespace="default", workload="sleep", service="sleep", revision="v1")
        tunnel = await env.tunnel(baggage=bag, traceparent=tp)
        await echo_roundtrip(tunnel, b"x")
        info = seen[0]
        assert info.peer_identity == CLIENT_ID
        assert info.destination == ("127.0.0.1", env.echo.port)
        assert str(info.source_ip) == "127.0.0.1" and info.request.forwarded.for_port == 40000
        assert info.request.baggage.get("k8s.deployment.name") == "sleep"
        assert info.request.traceparent == tp and info.request.traceparent_received
        assert info.local_address == env.dst


async def test_missing_traceparent_gets_a_fresh_one() -> None:
    seen = []
    async with hbone_env(authorize=lambda info: seen.append(info) or True) as env:
        await env.tunnel()  # the helper always sends one; use the raw request API without
        req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}")
        headers = [h for h in req.headers() if h[0] != b"traceparent"]
        conn = env.pool.connections()[0]
        tunnel = await conn.open_tunnel(headers)
        tunnel.reset()
        assert not seen[1].request.traceparent_received
        parse_traceparent(str(seen[1].request.traceparent))


async def test_status_400_when_authority_is_not_the_accepted_address() -> None:
    async with hbone_env() as env:
        with pytest.raises(TunnelRefused) as exc:
            await env.tunnel(authority=f"127.0.0.2:{env.echo.port}")
        assert exc.value.status == 400
        assert sample_metric(env.registry, "nodemesh_hbone_stream_rejections_total",
                             direction="inbound", reason="ip_mismatch") == 1
        # The same connection still carries good tunnels.
        tunnel = await env.tunnel()
        assert await echo_roundtrip(tunnel, b"ok") == b"ok"
        assert len(env.pool.connections()) == 1


async def test_relaxed_address_policy_accepts_any_authority() -> None:
    """A waypoint serves any address (and service names) it is responsible for; routing picks upstream."""
    targets = []

    async def route(info):
        targets.append(str(info.authority))
        env_port = env.echo.port
        return socket.create_connection(("127.0.0.1", env_port))

    async with hbone_env(local_address_check=any_authority, allow_hostname_authority=True,
                         connect_upstream=route) as env:
        tunnel = await env.tunnel(authority="10.96.0.10:80")
        assert await echo_roundtrip(tunnel, b"waypoint") == b"waypoint"
        tunnel = await env.tunnel(authority="echo.default.svc.cluster.local:80")
        assert await echo_roundtrip(tunnel, b"by name") == b"by name"
        assert targets == ["10.96.0.10:80", "echo.default.svc.cluster.local:80"]


async def test_status_401_when_authorization_denies() -> None:
    calls = []

    async def authorize(info):
        calls.append(info.peer_identity)
        return False

    async with hbone_env(authorize=authorize) as env:
        with pytest.raises(TunnelRefused) as exc:
            await env.tunnel()
        assert exc.value.status == 401
        assert calls == [CLIENT_ID]
        assert env.echo.connections == 0  # denied before any upstream connection
        assert sample_metric(env.registry, "nodemesh_hbone_streams_total", direction="inbound", status="401") == 1


async def test_authorization_callback_failure_denies() -> None:
    def authorize(info):
        raise RuntimeError("policy store unavailable")

    async with hbone_env(authorize=authorize) as env:
        with pytest.raises(TunnelRefused) as exc:
            await env.tunnel()
        assert exc.value.status == 401


async def test_status_503_when_upstream_unreachable_and_200_only_after_connect() -> None:
    order: list[str] = []
    async with hbone_env() as env:
        with pytest.raises(TunnelRefused) as exc:
            await env.tunnel(free_port())
        assert exc.value.status == 503

        # 200 must not be sent before the upstream connection is made.
        gate = asyncio.Event()

        async def slow_dial(info):
            order.append("dialling")
            await gate.wait()
            sock = socket.create_connection(info.destination)
            order.append("connected")
            return sock

        env.server.connect_upstream = slow_dial
        opening = asyncio.ensure_future(env.tunnel())
        await asyncio.sleep(0.1)
        assert not opening.done() and order == ["dialling"]
        gate.set()
        tunnel = await asyncio.wait_for(opening, 5)
        assert order == ["dialling", "connected"]
        assert await echo_roundtrip(tunnel, b"late") == b"late"


async def test_client_refuses_server_with_unexpected_identity() -> None:
    async with hbone_env() as env:
        req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}")
        with pytest.raises(HandshakeError) as exc:
            await env.pool.connect(env.client_cert, env.dst, [CLIENT_ID], req)
        assert exc.value.reason == "identity_san"
        assert env.pool.connections() == []
        assert env.echo.connections == 0


async def test_pooled_connection_closes_after_idle_timeout() -> None:
    client_limits = HboneLimits(**{**CLIENT_LIMITS.__dict__, "idle_timeout": 0.3})
    async with hbone_env(client_limits=client_limits) as env:
        tunnel = await env.tunnel()
        await echo_roundtrip(tunnel, b"x")
        await tunnel.wait_closed()
        conn = env.pool.connections()[0]
        await asyncio.wait_for(conn.closed, 5)
        assert env.pool.connections() == []
        assert sample_metric(env.registry, "nodemesh_hbone_connections_closed_total",
                             direction="outbound", reason="idle") == 1
        # The next tunnel simply dials again.
        tunnel = await env.tunnel()
        assert await echo_roundtrip(tunnel, b"y") == b"y"


async def test_connection_without_ping_answers_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that stops answering (here: its process is stuck) is detected by PING and dropped."""
    client_limits = HboneLimits(**{**CLIENT_LIMITS.__dict__, "ping_interval": 0.1, "ping_timeout": 0.3})
    async with hbone_env(client_limits=client_limits) as env:
        tunnel = await env.tunnel()
        conn = env.pool.connections()[0]
        server_conn = next(iter(env.server.connections))
        server_conn.transport.pause_reading()  # the server stops reading: no PING ack ever comes
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            await asyncio.wait_for(conn.closed, 5)
        assert tunnel.closed and tunnel.error is not None
        assert sample_metric(env.registry, "nodemesh_hbone_protocol_errors_total",
                             direction="outbound", reason="ping_timeout") == 1
        assert "no PING answer" in caplog.text
        server_conn.transport.resume_reading()


async def test_graceful_shutdown_drains_in_flight_streams() -> None:
    async with hbone_env() as env:
        tunnel = await env.tunnel()
        reader, writer = tunnel.streams()
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        closing = asyncio.ensure_future(env.server.close(drain_timeout=10))
        await asyncio.sleep(0.1)
        # GOAWAY was received: no new streams on this connection...
        (conn,) = env.pool.connections()
        assert conn.session.draining and not conn.available
        # ...but the in-flight stream keeps working to its end.
        writer.write(b"during shutdown")
        assert await reader.readexactly(15) == b"during shutdown"
        writer.write_eof()
        assert await reader.read() == b""
        await asyncio.wait_for(closing, 10)
        assert tunnel.error is None


async def test_slow_reader_holds_the_sender_to_the_window() -> None:
    """Flow control end to end: an upstream that does not read stalls the client, nothing balloons."""
    async with hbone_env() as env:
        stall = asyncio.Event()

        async def lazy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await stall.wait()
            data = await r.read()
            w.write(len(data).to_bytes(8, "big"))
            w.close()

        srv = await asyncio.start_server(lazy, "127.0.0.1", 0, limit=65536)
        try:
            tunnel = await env.tunnel(srv.sockets[0].getsockname()[1])
            reader, writer = tunnel.streams()
            total = 32 * MIB
            chunk = b"z" * (256 * 1024)

            async def push() -> None:
                for _ in range(total // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()

            pusher = asyncio.ensure_future(push())
            await asyncio.sleep(0.5)
            assert not pusher.done()  # held back by flow control
            server_conn = next(iter(env.server.connections))
            buffered = sum(len(x) for x in server_conn.session.h2._out)
            assert buffered < 8 * MIB
            assert tunnel.pending <= 2 * MIB
            stall.set()
            await asyncio.wait_for(pusher, 60)
            assert int.from_bytes(await asyncio.wait_for(reader.readexactly(8), 60), "big") == total
        finally:
            srv.close()
            await srv.wait_closed()


async def test_server_presents_the_certificate_for_the_accepting_address() -> None:
    """The agent serves many pods: the certificate is chosen per local address, possibly async."""
    async with hbone_env() as env:
        asked = []

        async def provider(local):
            asked.append(local)
            await asyncio.sleep(0)
            return env.server_cert

        server = HboneServer(provider, TRUST_DOMAIN, env.ca.bundle, metrics=env.metrics)
        listener = await server.listen("127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}")
            tunnel = await env.pool.connect(env.client_cert, ("127.0.0.1", port), [SERVER_ID], req)
            assert await echo_roundtrip(tunnel, b"per-pod") == b"per-pod"
            assert asked == [("127.0.0.1", port)]
        finally:
            await server.close(1.0)


async def test_client_side_relay_splices_an_app_connection_into_a_tunnel() -> None:
    """What the agent's outbound listener does: app TCP <-> relay <-> tunnel, half-close and RST included."""
    async with hbone_env() as env:
        results: list = []

        async def outbound(sock: socket.socket) -> None:
            tunnel = await env.tunnel()
            results.append(await relay(tunnel, sock))

        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async def accept_one() -> None:
                sock, _ = await loop.sock_accept(listener)
                await outbound(sock)

            serving = asyncio.ensure_future(accept_one())
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            payload = pattern(3 * MIB + 11)
            writer.write(payload)
            writer.write_eof()  # app half-closes; the echo still answers everything
            echoed = await asyncio.wait_for(reader.read(-1), 30)
            assert digest(echoed) == digest(payload)
            writer.close()
            await asyncio.wait_for(serving, 10)
            assert (results[0].sent, results[0].received, results[0].reset) == (len(payload), len(payload), False)

            # The app resets its connection: the stream is reset, the upstream sees a reset too.
            rst = await ResetServer(after_bytes=0).start()
            seen: asyncio.Future = loop.create_future()

            async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    seen.set_result(await r.read())
                except (ConnectionError, OSError) as exc:
                    seen.set_result(exc)

            srv = await asyncio.start_server(upstream, "127.0.0.1", 0)
            try:
                async def outbound_to_upstream() -> None:
                    sock, _ = await loop.sock_accept(listener)
                    tunnel = await env.tunnel(srv.sockets[0].getsockname()[1])
                    results.append(await relay(tunnel, sock))

                serving = asyncio.ensure_future(outbound_to_upstream())
                app = socket.create_connection(listener.getsockname())
                app.sendall(b"half a request")
                await asyncio.sleep(0.2)
                app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                app.close()  # RST
                await asyncio.wait_for(serving, 10)
                assert results[1].reset
                assert isinstance(await asyncio.wait_for(seen, 10), ConnectionResetError)
            finally:
                srv.close()
                await srv.wait_closed()
                await rst.close()
        finally:
            listener.close()


async def test_client_socket_is_marked_and_bound_to_the_source_ip() -> None:
    """SO_MARK 0x539 keeps the agent's own socket out of the pod's redirection; the bind sets the source."""
    async with hbone_env() as env:
        pool = HbonePool(bundle=env.ca.bundle, metrics=env.metrics, mark=INPOD_MARK)
        try:
            req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}")
            tunnel = await pool.connect(env.client_cert, env.dst, [SERVER_ID], req, source_ip="127.0.0.7")
            assert await echo_roundtrip(tunnel, b"marked") == b"marked"
            (conn,) = pool.connections()
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == INPOD_MARK
            assert sock.getsockname()[0] == "127.0.0.7"
            (server_conn,) = env.server.connections
            assert server_conn.peer_address[0] == "127.0.0.7"
            # A different source IP is a different pool key, hence another connection.
            await pool.connect(env.client_cert, env.dst, [SERVER_ID], req, source_ip="127.0.0.8")
            assert len(pool.connections()) == 2
        finally:
            await pool.close(0.2)


async def test_client_pool_close_drains_its_in_flight_streams() -> None:
    async with hbone_env() as env:
        tunnel = await env.tunnel()
        reader, writer = tunnel.streams()
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        closing = asyncio.ensure_future(env.pool.close(drain_timeout=10))
        await asyncio.sleep(0.1)
        writer.write(b"two")  # the server got our GOAWAY but keeps serving this stream
        assert await reader.readexactly(3) == b"two"
        writer.write_eof()
        assert await reader.read() == b""
        await asyncio.wait_for(closing, 10)
        assert tunnel.error is None
        with pytest.raises(ConnectionClosedError):
            await env.tunnel()

"""The waypoint shell end to end on loopback: real HBONE (mTLS + HTTP/2 CONNECT) in and out, real
HTTP/1.1, h2c, gRPC-shaped, WebSocket and plain TCP traffic, real upstream servers behind real HBONE
servers standing in for the destination agents. What is checked is what a client or an operator sees:
status codes, bodies, headers, access-log lines and metrics."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re

import pytest

from mesh.hbone import TunnelRefused
from tests.test_waypoint_server_env import CLIENT_ID, grpc_frame, waypoint_env
from waypoint.server.context import ServerLimits

pytestmark = pytest.mark.timeout(60)

# Istio's default TEXT access log format, field by field.
LOG_RE = re.compile(
    r'^\[(?P<start>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "(?P<method>\S+) (?P<path>\S+) (?P<proto>\S+)" '
    r'(?P<code>\d+) (?P<flags>\S+) (?P<details>\S+) (?P<term>\S+) "(?P<tfr>[^"]*)" (?P<rx>\d+) (?P<tx>\d+) '
    r'(?P<dur>\d+) (?P<ust>\S+) "(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<authority>[^"]*)" '
    r'"(?P<uhost>[^"]*)" (?P<cluster>\S+) (?P<ulocal>\S+) (?P<dlocal>\S+) (?P<dremote>\S+) (?P<sni>\S+) '
    r'(?P<route>\S+)\n$')


def log_fields(env, index: int = -1) -> dict:
    m = LOG_RE.match(env.log_lines[index])
    assert m, env.log_lines[index]
    return m.groupdict()


async def test_http1_request_carries_envoy_headers_and_is_logged_in_istio_format():
    async with waypoint_env() as env:
        client = await env.h1()
        r = await client.request("GET", "/hello?x=1", [("user-agent", "curl/8"), ("x-request-id", "rid-1")])
        assert r.status == 200
        seen = r.json()
        assert seen["path"] == "/hello?x=1"
        assert seen["headers"]["x-envoy-attempt-count"] == "1"
        assert seen["headers"]["x-request-id"] == "rid-1"
        assert re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$", seen["headers"]["traceparent"])
        assert "x-envoy-expected-rq-timeout-ms" not in seen["headers"]  # no timeout by default
        assert int(r.headers["x-envoy-upstream-service-time"]) >= 0
        f = log_fields(env)
        assert (f["method"], f["path"], f["proto"], f["code"], f["flags"]) == ("GET", "/hello?x=1", "HTTP/1.1",
                                                                               "200", "-")
        assert f["details"] == "via_upstream" and f["rid"] == "rid-1" and f["ua"] == "curl/8"
        assert f["authority"] == "web.default.svc.cluster.local"
        pod = env.pods[r.headers["x-pod"]]
        assert f["uhost"].startswith(f"envoy://connect_originate/{pod.ip}:")
        assert f["cluster"] == "inbound-vip|80|http|web.default.svc.cluster.local"
        assert f["dlocal"] == f"{env.vip('web')}:80" and f["dremote"].startswith("127.0.9.1:")
        head_size = sum(len(n) + len(v) + 4 for n, v in r.header_list)
        assert len(r.body) + head_size < int(f["tx"]) < len(r.body) + head_size + 64  # wire bytes, head included


async def test_keepalive_and_large_bodies_arrive_byte_exact():
    async with waypoint_env() as env:
        client = await env.h1()
        for size in (0, 1, 65_537, 3 * 1024 * 1024):
            payload = os.urandom(size)
            r = await client.request("POST", "/upload", body=payload)
            assert r.status == 200
            assert (r.json()["body_len"], r.json()["body_sha"]) == (size, hashlib.sha256(payload).hexdigest())
        r = await client.request("GET", "/bytes/2000000")
        assert r.status == 200 and r.body == b"x" * 2_000_000
        assert len(env.log_lines) == 5


async def test_h2c_grpc_streams_with_trailers_and_trailers_only_errors():
    async with waypoint_env() as env:
        client = await env.h2()
        grpc = [("content-type", "application/grpc"), ("te", "trailers")]
        replies = await asyncio.gather(*(client.request("POST", "/pkg.Echo/Say", grpc, grpc_frame(b"m%d" % i))
                                         for i in range(20)))
        for i, r in enumerate(replies):
            assert r.status == 200
            assert r.body.startswith(grpc_frame(b"m%d" % i)) and r.body.endswith(r.headers["x-pod"].encode())
            assert r.trailers["grpc-status"] == "0"
        failed = await client.request("POST", "/pkg.Echo/Fail", grpc, grpc_frame(b"x"))
        assert (failed.status, failed.headers["grpc-status"]) == (200, "14")
        await client.close()
        assert env.metric("istio_requests_total", grpc_response_status="0", request_protocol="grpc",
                          reporter="waypoint") == 20
        assert env.metric("istio_requests_total", grpc_response_status="14", request_protocol="grpc") == 1
        assert log_fields(env)["proto"] == "HTTP/2"


async def test_websocket_upgrade_is_passed_through():
    async with waypoint_env() as env:
        client = await env.h1()
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (f"GET /ws HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        client.writer.write(handshake.encode())
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
                                  .digest()).decode()
        assert f"sec-websocket-accept: {accept}".encode() in head.lower().replace(accept.lower().encode(),
                                                                                    accept.encode())
        mask = os.urandom(4)
        payload = b"hello"
        frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        client.writer.write(frame)
        reply = await asyncio.wait_for(client.reader.readexactly(2), 10)
        assert reply[0] == 0x81
        text = await asyncio.wait_for(client.reader.readexactly(reply[1]), 10)
        assert text.endswith(b":hello") and text.split(b":")[0].decode() in env.pods
        client.writer.write(bytes([0x88, 0x80]) + mask)  # close
        await asyncio.sleep(0.1)


async def test_plain_tcp_and_server_first_protocols_are_forwarded_at_l4():
    async with waypoint_env(limits=ServerLimits(detection_timeout=0.2)) as env:
        tunnel = await env.tunnel("echo", 9000)
        reader, writer = tunnel.streams()
        # Server-first: the client says nothing; after detection gives up, the greeting comes through.
        greeting = await asyncio.wait_for(reader.readline(), 10)
        assert greeting.startswith(b"hello from web-v")
        writer.write(b"\x16\x03\x01 not http at all")
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest == b"\x16\x03\x01 not http at all"
        # Client-first non-HTTP bytes are detected as TCP at once.
        tunnel = await env.tunnel("echo", 9000)
        reader, writer = tunnel.streams()
        writer.write(b"SSH-2.0-OpenSSH\r\n")
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
        assert data.endswith(b"SSH-2.0-OpenSSH\r\n")
        await asyncio.sleep(0.05)
        assert env.metric("istio_tcp_connections_opened_total", reporter="waypoint") == 2
        assert env.metric("istio_tcp_received_bytes_total") == len(b"\x16\x03\x01 not http at all") + 17


async def test_malformed_request_gets_400_and_the_waypoint_keeps_serving():
    async with waypoint_env() as env:
        client = await env.h1()
        out = await asyncio.wait_for(client.raw(b"GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n"), 10)
        assert out.startswith(b"HTTP/1.1 400 ")
        assert log_fields(env)["flags"] == "DPE" and log_fields(env)["details"] == "http1.codec_error"
        client = await env.h1()
        assert (await client.request("GET", "/")).status == 200


async def test_oversized_headers_get_431():
    async with waypoint_env(limits=ServerLimits(max_request_headers=4096)) as env:
        client = await env.h1()
        out = await asyncio.wait_for(client.raw(b"GET / HTTP/1.1\r\nHost: web\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n"),
                                     10)
        assert out.startswith(b"HTTP/1.1 431 ")
        client = await env.h1()
        assert (await client.request("GET", "/")).status == 200


async def test_slow_client_times_out_with_408_and_does_not_block_others():
    async with waypoint_env(limits=ServerLimits(request_headers_timeout=0.3, stream_idle_timeout=0.3)) as env:
        slow = await env.h1()
        slow.writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n")  # never finishes its head
        other = await env.h1()
        assert (await other.request("GET", "/")).status == 200
        out = await asyncio.wait_for(slow.raw(b""), 10)
        assert out.startswith(b"HTTP/1.1 408 ") and out.endswith(b"request timeout")
        # A body that stalls: 408 `stream timeout`, flag SI.
        stalled = await env.h1()
        stalled.writer.write(b"POST / HTTP/1.1\r\nHost: web\r\ncontent-length: 100\r\n\r\nabc")
        out = await asyncio.wait_for(stalled.raw(b""), 10)
        assert out.startswith(b"HTTP/1.1 408 ") or out == b""
        assert any(" SI " in line for line in env.log_lines)


async def test_connect_for_a_service_not_bound_to_this_waypoint_is_refused():
    async with waypoint_env() as env:
        with pytest.raises(TunnelRefused) as err:
            await env.tunnel("plain", 80)
        assert err.value.status == 401
        with pytest.raises(TunnelRefused):
            await env.tunnel(authority="127.254.0.1:80")  # not in the mesh at all


async def test_unreachable_endpoints_give_503_uf_after_the_default_retries():
    async with waypoint_env() as env:
        for pod in env.pods.values():  # the app stops listening: the destination agent refuses the CONNECT
            for runner in pod.runners:
                await runner.cleanup()
            pod.runners.clear()
        client = await env.h1()
        r = await client.request("GET", "/")
        assert r.status == 503
        assert r.body.startswith(b"upstream connect error or disconnect/reset before headers. retried and the latest "
                                 b"reset reason: remote connection failure")
        f = log_fields(env)
        assert f["flags"] == "UF,URX" and f["code"] == "503"
        assert env.metric("istio_requests_total", response_code="503", response_flags="UF,URX") == 1


async def test_no_ready_endpoint_gives_503_no_healthy_upstream():
    async with waypoint_env() as env:
        from mesh.config import ConfigSet

        snap = env.mesh.snapshot
        env.mesh.replace("test", ConfigSet((), tuple(snap.services.values())))
        client = await env.h1()
        r = await client.request("GET", "/")
        assert (r.status, r.body) == (503, b"no healthy upstream")
        assert log_fields(env)["flags"] == "UH"


async def test_metrics_carry_istio_labels_for_both_sides():
    async with waypoint_env() as env:
        client = await env.h1()
        for _ in range(3):
            assert (await client.request("GET", "/")).status == 200
        labels = dict(reporter="waypoint", source_workload="sleep", source_workload_namespace="default",
                      source_principal=str(CLIENT_ID), source_app="sleep", destination_service_name="web",
                      destination_service="web.default.svc.cluster.local", destination_service_namespace="default",
                      request_protocol="http", response_code="200", response_flags="-",
                      connection_security_policy="mutual_tls", destination_app="web")
        assert env.metric("istio_requests_total", **labels) == 3
        assert env.metric("istio_request_duration_milliseconds_count", **labels) == 3
        assert env.metric("istio_response_bytes_count", **labels) == 3
        assert env.metric("istio_request_duration_milliseconds_bucket", le="+Inf", **labels) == 3
        assert env.metric("istio_requests_total", destination_workload="web-v1") + env.metric(
            "istio_requests_total", destination_workload="web-v2") == 3

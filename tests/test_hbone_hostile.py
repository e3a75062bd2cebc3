"""Hostile input against a real HBONE server: every case ends with the right answer (HTTP status, GOAWAY
or TLS alert), a log line and a counter, while a good tunnel keeps talking on its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from datetime import timedelta

import h2.events as h2ev
import pytest
from cryptography import x509
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from mesh.ca import CertificateAuthority
from mesh.hbone import HboneLimits, dial_tcp
from mesh.hbone.tls import restrict_tls13_suites
from mesh.identity import SpiffeId
from tests.interop.hbone_env import (
    CLIENT_ID,
    KeepTalking,
    RawH2,
    connect_headers,
    free_port,
    hbone_env,
    odd_leaf,
    sample_metric,
    ssl_client_context,
    workload_context,
)

LIMITS = HboneLimits(connect_header_timeout=1.0, tls_handshake_timeout=1.0)


@pytest.fixture
async def env():
    async with hbone_env(limits=LIMITS) as e:
        yield e


def counter(env, name: str, **labels: str) -> float:
    return sample_metric(env.registry, f"nodemesh_hbone_{name}_total", **labels)


@pytest.mark.parametrize(("headers", "reason"), [
    (connect_headers("127.0.0.1:1", method=b"GET", extra=[(b":scheme", b"https"), (b":path", b"/")]), "method"),
    ([(b":method", b"CONNECT")], "no_authority"),
    (connect_headers("not-an-ip:80"), "bad_authority"),
    (connect_headers("127.0.0.1"), "bad_authority"),
    (connect_headers("127.0.0.1:99999"), "bad_authority"),
    (connect_headers("[::1:80"), "bad_authority"),
    (connect_headers("127.0.0.1:0"), "bad_authority"),
    (connect_headers("127.0.0.1:80", extra=[(b":path", b"/")]), "malformed_headers"),
    (connect_headers("127.0.0.1:80", extra=[(b"connection", b"close")]), "malformed_headers"),
    (connect_headers("127.0.0.1:80", extra=[(b"X-Upper", b"1")]), "malformed_headers"),
    ([(b":authority", b"127.0.0.1:80"), (b":method", b"CONNECT"), (b":method", b"CONNECT")], "malformed_headers"),
])
async def test_bad_request_gets_400_and_the_connection_lives_on(env, caplog, headers, reason) -> None:
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        try:
            with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
                sid = peer.request(headers)
                assert await peer.response(sid) == 400
            assert "refused with 400" in caplog.text
            assert counter(env, "stream_rejections", direction="inbound", reason=reason) == 1
            # Same connection, next stream: a proper CONNECT still works.
            sid = peer.request(connect_headers(f"127.0.0.1:{env.echo.port}"))
            assert await peer.response(sid) == 200
            peer.h2.send_data(sid, b"still here", end_stream=True)
            peer.flush()
            got = await peer.until(lambda e: isinstance(e, h2ev.DataReceived) and e.stream_id == sid)
            assert got.data == b"still here"
        finally:
            peer.close()
        await good.checkpoint()


async def test_oversized_header_block_gets_goaway(env, caplog) -> None:
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        await peer.until(lambda e: isinstance(e, h2ev.RemoteSettingsChanged))
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            peer.request(connect_headers("127.0.0.1:80", extra=[(b"x-big", b"a" * 100_000)]))
            goaway = await peer.goaway()
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert "header block" in caplog.text
        assert counter(env, "protocol_errors", direction="inbound", reason="header_too_large") == 1
        peer.close()
        await good.checkpoint()


async def test_header_list_over_limit_after_decompression_gets_goaway(env) -> None:
    """Small on the wire, huge once decoded (many fields): HPACK's list-size limit ends it."""
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        await peer.until(lambda e: isinstance(e, h2ev.RemoteSettingsChanged))
        extra = [(b"x-%d" % i, b"v") for i in range(3000)]
        peer.request(connect_headers("127.0.0.1:80", extra=extra))
        goaway = await peer.goaway()
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert counter(env, "protocol_errors", direction="inbound", reason="header_too_large") == 1
        peer.close()
        await good.checkpoint()


async def test_client_silent_after_tls_is_cut_off(env, caplog) -> None:
    async with KeepTalking(env) as good:
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            peer = await RawH2.connect(env.port, workload_context(env.client_cert), preface=False)
            peer.auto_flush = False  # parse the server's frames, send nothing at all
            peer.h2.initiate_connection()
            peer.h2.data_to_send()
            goaway = await peer.goaway()
            assert goaway.error_code == ErrorCodes.NO_ERROR
            assert await peer.closed() == b""  # and then the connection is closed
        assert "no complete CONNECT header block" in caplog.text
        assert counter(env, "protocol_errors", direction="inbound", reason="header_timeout") == 1
        peer.close()
        await good.checkpoint()


async def test_slow_header_block_is_cut_off(env) -> None:
    """HEADERS without END_HEADERS and never a CONTINUATION: the same timeout applies."""
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        sid = peer.request(connect_headers(f"127.0.0.1:{env.echo.port}"))
        assert await peer.response(sid) == 200  # a first, complete request
        # HEADERS on stream 3 without END_HEADERS: the block "continues" forever.
        peer.send_headers_raw(3, connect_headers(f"127.0.0.1:{env.echo.port}"), end_headers=False)
        goaway = await peer.goaway()
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert counter(env, "protocol_errors", direction="inbound", reason="header_timeout") == 1
        peer.close()
        await good.checkpoint()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64,
                                     b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
async def test_garbage_instead_of_preface_gets_goaway(env, caplog, garbage) -> None:
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert), preface=False)
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            peer.send_raw(garbage)
            # Parse the server's bytes as a client would: SETTINGS, then GOAWAY(PROTOCOL_ERROR).
            peer.h2.initiate_connection()
            peer.h2.data_to_send()
            goaway = await peer.goaway()
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        assert "preamble" in caplog.text
        assert counter(env, "protocol_errors", direction="inbound", reason="bad_preface") == 1
        peer.close()
        await good.checkpoint()


async def test_frame_over_max_size_gets_goaway(env) -> None:
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        sid = peer.request(connect_headers(f"127.0.0.1:{env.echo.port}"))
        assert await peer.response(sid) == 200
        length = 2 * 1024 * 1024  # declared beyond our 1 MiB SETTINGS_MAX_FRAME_SIZE; body never sent
        peer.send_raw(length.to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big"))
        goaway = await peer.goaway()
        assert goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
        assert counter(env, "protocol_errors", direction="inbound", reason="frame_too_large") == 1
        peer.close()
        await good.checkpoint()


async def test_flow_control_violation_gets_goaway(env) -> None:
    """DATA beyond the stream window while the CONNECT is still pending (nothing is acknowledged yet)."""
    gate = asyncio.Event()
    stuck_port = free_port()

    async def slow_dial(info):
        if info.destination[1] == stuck_port:
            await gate.wait()
            raise OSError("never mind")
        return await dial_tcp(info)

    env.server.connect_upstream = slow_dial
    async with KeepTalking(env) as good:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        try:
            await peer.until(lambda e: isinstance(e, h2ev.RemoteSettingsChanged))
            sid = peer.request(connect_headers(f"127.0.0.1:{stuck_port}"))
            frame = 1024 * 1024
            for _ in range(5):  # 5 MiB into a 4 MiB stream window, bypassing h2's own accounting
                peer.send_raw(frame.to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + b"\0" * frame)
            goaway = await peer.goaway(timeout=20)
            assert goaway.error_code == ErrorCodes.FLOW_CONTROL_ERROR
            assert counter(env, "protocol_errors", direction="inbound", reason="flow_control") == 1
        finally:
            gate.set()
            peer.close()
        await good.checkpoint()


async def test_streams_beyond_the_advertised_limit_are_refused_not_fatal() -> None:
    async with hbone_env(limits=HboneLimits(max_concurrent_streams=2)) as env:
        peer = await RawH2.connect(env.port, workload_context(env.client_cert))
        await peer.until(lambda e: isinstance(e, h2ev.RemoteSettingsChanged))
        # Behave as if the server's SETTINGS had not arrived: open a third stream anyway.
        peer.h2.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 10
        peer.h2.remote_settings.acknowledge()
        first = [peer.request(connect_headers(f"127.0.0.1:{env.echo.port}")) for _ in range(2)]
        extra = peer.request(connect_headers(f"127.0.0.1:{env.echo.port}"))
        reset = await peer.until(lambda e: isinstance(e, h2ev.StreamReset) and e.stream_id == extra)
        assert reset.error_code == ErrorCodes.REFUSED_STREAM
        for sid in first:
            assert await peer.response(sid) == 200
        assert counter(env, "stream_rejections", direction="inbound", reason="refused_stream") == 1
        peer.close()


# ---- TLS and identity --------------------------------------------------------------------------------


async def _tls_outcome(port: int, ctx: ssl.SSLContext) -> str:
    """What a client sees: 'goaway:<code>', 'alert:<text>', 'eof' or 'reset'."""
    try:
        peer = await RawH2.connect(port, ctx)
    except ssl.SSLError as exc:
        return f"alert:{exc}"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    try:
        goaway = await peer.goaway()
        return f"goaway:{int(goaway.error_code)}"
    except ssl.SSLError as exc:
        return f"alert:{exc}"
    except (EOFError, asyncio.IncompleteReadError):
        return "eof"
    except ConnectionResetError:
        return "reset"
    finally:
        peer.close()


async def test_certificate_from_another_trust_domain_gets_a_tls_alert(env, caplog) -> None:
    foreign = CertificateAuthority.create("evil.example")
    cert = foreign.issue_workload(SpiffeId.parse("spiffe://evil.example/ns/default/sa/sleep"))
    async with KeepTalking(env) as good:
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            outcome = await _tls_outcome(env.port, workload_context(cert, env.ca.bundle.roots_pem()))
        assert outcome.startswith("alert:") and "unknown ca" in outcome
        assert "handshake refused" in caplog.text
        assert counter(env, "handshake_failures", direction="inbound", reason="unknown_ca") == 1
        await good.checkpoint()


async def test_trusted_root_but_foreign_trust_domain_gets_goaway() -> None:
    """Both roots trusted (e.g. during a migration), but the peer's SPIFFE ID is not in our domain."""
    foreign = CertificateAuthority.create("evil.example")
    async with hbone_env() as env:
        env.server.bundle = env.ca.bundle.merge(foreign.bundle)
        cert = foreign.issue_workload(SpiffeId.parse("spiffe://evil.example/ns/default/sa/sleep"))
        roots = env.ca.bundle.roots_pem()
        async with KeepTalking(env) as good:
            outcome = await _tls_outcome(env.port, workload_context(cert, roots))
            assert outcome == f"goaway:{int(ErrorCodes.INADEQUATE_SECURITY)}"
            assert counter(env, "handshake_failures", direction="inbound", reason="identity_trust_domain") == 1
            await good.checkpoint()


@pytest.mark.parametrize(("names", "reason"), [
    ([x509.DNSName("sleep.default.svc")], "identity_no_uri_san"),
    ([], "identity_no_uri_san"),
    ([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/a"),
      x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/b")], "identity_multiple_uri_sans"),
    ([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/pod/x")], "identity_bad_spiffe_id"),
])
async def test_certificate_with_wrong_san_gets_goaway(env, caplog, names, reason) -> None:
    chain, key = odd_leaf(env.ca, names)
    ctx = ssl_client_context(chain, key, env.ca.bundle.roots_pem())
    async with KeepTalking(env) as good:
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            outcome = await _tls_outcome(env.port, ctx)
        assert outcome == f"goaway:{int(ErrorCodes.INADEQUATE_SECURITY)}"
        assert "client certificate refused" in caplog.text
        assert counter(env, "handshake_failures", direction="inbound", reason=reason) == 1
        await good.checkpoint()


async def test_expired_certificate_gets_a_tls_alert(env, caplog) -> None:
    chain, key = odd_leaf(env.ca, [x509.UniformResourceIdentifier(str(CLIENT_ID))],
                          not_after_delta=timedelta(minutes=-1), not_before_delta=timedelta(hours=-2))
    async with KeepTalking(env) as good:
        with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
            outcome = await _tls_outcome(env.port, ssl_client_context(chain, key, env.ca.bundle.roots_pem()))
        assert outcome.startswith("alert:") and "certificate expired" in outcome
        assert counter(env, "handshake_failures", direction="inbound", reason="cert_expired") == 1
        assert "expired" in caplog.text
        await good.checkpoint()


async def test_no_client_certificate_gets_a_tls_alert(env) -> None:
    async with KeepTalking(env) as good:
        outcome = await _tls_outcome(env.port, ssl_client_context(b"", b"", env.ca.bundle.roots_pem()))
        assert outcome.startswith("alert:") and "certificate required" in outcome
        assert counter(env, "handshake_failures", direction="inbound", reason="no_client_cert") == 1
        await good.checkpoint()


async def test_tls12_and_missing_alpn_are_refused(env) -> None:
    async with KeepTalking(env) as good:
        ctx = workload_context(env.client_cert)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        outcome = await _tls_outcome(env.port, ctx)
        assert outcome.startswith("alert:") and "protocol version" in outcome
        ctx = workload_context(env.client_cert)
        ctx.set_alpn_protocols(["http/1.1"])
        assert await _tls_outcome(env.port, ctx) == f"goaway:{int(ErrorCodes.INADEQUATE_SECURITY)}"
        assert counter(env, "handshake_failures", direction="inbound", reason="alpn") == 1
        await good.checkpoint()


async def test_tcp_client_that_never_starts_tls_is_cut_off(env) -> None:
    async with KeepTalking(env) as good:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert counter(env, "handshake_failures", direction="inbound", reason="handshake_timeout") == 1
        # Plain text instead of a ClientHello fails at once.
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            while await asyncio.wait_for(reader.read(4096), 10):
                pass
        writer.close()
        await good.checkpoint()
        assert sum(counter(env, "handshake_failures", direction="inbound", reason=r)
                   for r in ("not_tls", "tls_error", "handshake_aborted")) == 1


async def test_client_offering_only_chacha20_gets_a_tls_alert(env) -> None:
    """HBONE allows the AES-GCM suites only (ztunnel's list), even though OpenSSL would take ChaCha20."""
    ctx = workload_context(env.client_cert)
    if not restrict_tls13_suites(ctx, ("TLS_CHACHA20_POLY1305_SHA256",)):
        pytest.skip("this Python cannot restrict TLS 1.3 suites, so it cannot play the ChaCha-only client")
    async with KeepTalking(env) as good:
        outcome = await _tls_outcome(env.port, ctx)
        assert outcome.startswith("alert:") and "handshake failure" in outcome
        assert counter(env, "handshake_failures", direction="inbound", reason="cipher") == 1
        await good.checkpoint()

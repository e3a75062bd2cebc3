"""Interoperability with independent HTTP/2 implementations, run for real on loopback.

* Node.js's ``http2`` module (nghttp2) as a CONNECT client, with a workload certificate, against our
  server: byte-exact echo on many concurrent streams, and our 400 seen by a foreign client.
* ``nghttpx`` in HTTP/2 proxy mode (``-s``, TLS 1.3, h2, client certificates required) as the CONNECT
  server that our client tunnels through; it hands CONNECT to ``tinyproxy`` (HTTP/1 forward proxy),
  which dials the echo server. Different window sizes and a 16 KiB max frame make this a flow-control
  test of our client as well.

Each peer gets its own temporary config and ephemeral ports, and is killed in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.hbone import HbonePool, TunnelRefused, TunnelRequest
from tests.interop.hbone_env import SERVER_ID, free_port, hbone_env, sample_metric

HERE = Path(__file__).parent / "interop"
NODE = shutil.which("node")
NGHTTPX = shutil.which("nghttpx")
TINYPROXY = shutil.which("tinyproxy")


def _node_sha(size: int, seed: int) -> str:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return hashlib.sha256(bytes(out[:size])).hexdigest()


async def _run_node(config: dict, tmp: Path) -> dict:
    path = tmp / "node-config.json"
    path.write_text(json.dumps(config))
    proc = await asyncio.create_subprocess_exec(NODE, str(HERE / "h2_connect_client.js"), str(path),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.skipif(NODE is None, reason="node is installed by scripts/bootstrap.sh")
async def test_node_http2_client_against_our_server(tmp_path: Path) -> None:
    async with hbone_env() as env:
        cert, key, roots = env.client_cert.write_files(tmp_path / "client")
        sizes = [0, 1, 70_000, 3 * 1024 * 1024 + 5, *[(i * 91_397) % 400_000 for i in range(20)]]
        streams = [{"authority": f"127.0.0.1:{env.echo.port}", "size": s, "seed": i} for i, s in enumerate(sizes)]
        result = await _run_node({
            "host": "127.0.0.1", "port": env.port, "cert": str(cert), "key": str(key), "ca": str(roots),
            "expectedSan": str(SERVER_ID), "streams": streams,
            "extraHeaders": {"forwarded": 'for="127.0.0.1:5555"',
                             "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        }, tmp_path)
        assert result["alpn"] == "h2" and result["tlsVersion"] == "TLSv1.3"
        assert result["cipher"] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
        for i, (r, size) in enumerate(zip(result["results"], sizes, strict=True)):
            assert r["status"] == 200, r
            assert r["received"] == size, (i, r)
            assert r["recvSha"] == r["sentSha"] == _node_sha(size, i)
        assert len(env.server.connections) <= 1  # all streams on one connection
        infos = [info for info, _ in env.closed_tunnels]
        assert {str(i.peer_identity) for i in infos} == {"spiffe://cluster.local/ns/default/sa/sleep"}
        assert all(i.request.traceparent_received and i.request.forwarded.for_port == 5555 for i in infos)


@pytest.mark.skipif(NODE is None, reason="node is installed by scripts/bootstrap.sh")
async def test_node_http2_client_sees_our_refusals(tmp_path: Path) -> None:
    async with hbone_env(authorize=lambda info: info.destination[1] != 1111) as env:
        cert, key, roots = env.client_cert.write_files(tmp_path / "client")
        streams = [
            {"authority": "not-an-address:80", "size": 10, "seed": 0},
            {"authority": "127.0.0.1:1111", "size": 10, "seed": 1},  # denied by policy
            {"authority": f"127.0.0.1:{free_port()}", "size": 10, "seed": 2},  # nothing listens
            {"authority": f"127.0.0.1:{env.echo.port}", "size": 100_000, "seed": 3},
        ]
        result = await _run_node({"host": "127.0.0.1", "port": env.port, "cert": str(cert), "key": str(key),
                                  "ca": str(roots), "expectedSan": str(SERVER_ID), "streams": streams}, tmp_path)
        assert [r["status"] for r in result["results"]] == [400, 401, 503, 200]
        assert result["results"][3]["recvSha"] == _node_sha(100_000, 3)
        for status in ("400", "401", "503", "200"):
            assert sample_metric(env.registry, "nodemesh_hbone_streams_total", direction="inbound",
                                 status=status) == 1


async def echo_exact(tunnel, payload: bytes) -> bytes:
    """Send and read back exactly ``len(payload)`` bytes, then end the stream.

    Unlike our server, the nghttpx + tinyproxy chain does not turn END_STREAM into a TCP half-close
    (seen here: the echo server never gets EOF), so the reply is read by length, not to EOF.
    """
    reader, writer = tunnel.streams()

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i : i + 100_000])
            await writer.drain()

    sender = asyncio.ensure_future(send())
    got = await reader.readexactly(len(payload))
    await sender
    writer.write_eof()
    tunnel.reset()
    return got


async def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{proc.args[0]} did not listen on {port}")


@contextlib.asynccontextmanager
async def _process(args: list[str], port: int, log: Path) -> AsyncIterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await _wait_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@contextlib.asynccontextmanager
async def nghttpx_chain(env, tmp: Path, *, verify_client: bool = True) -> AsyncIterator[int]:
    """nghttpx -s (h2 over TLS, client certs verified) -> tinyproxy -> the env's echo server."""
    tiny_port, ngx_port = free_port(), free_port()
    tiny_conf = tmp / "tinyproxy.conf"
    tiny_conf.write_text(f"Port {tiny_port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 200\nAllow 127.0.0.1\n"
                         "LogLevel Warning\nDisableViaHeader Yes\n")
    cert, key, roots = env.server_cert.write_files(tmp / "nghttpx")
    args = [NGHTTPX, "--conf=/dev/null", "-s", f"--frontend=127.0.0.1,{ngx_port}",
            f"--backend=127.0.0.1,{tiny_port}", "--workers=1", "--no-ocsp",
            "--backend-connections-per-host=512",  # default 8: every CONNECT holds one backend connection
            "--tls-min-proto-version=TLSv1.3", "--tls-max-proto-version=TLSv1.3",
            f"--errorlog-file={tmp / 'nghttpx-error.log'}", "--accesslog-file=/dev/null",
            "--log-level=WARN"]
    if verify_client:
        args += ["--verify-client", f"--verify-client-cacert={roots}"]
    args += [str(key), str(cert)]
    async with _process([TINYPROXY, "-d", "-c", str(tiny_conf)], tiny_port, tmp / "tinyproxy.log"), \
            _process(args, ngx_port, tmp / "nghttpx.out"):
        yield ngx_port


needs_nghttpx = pytest.mark.skipif(NGHTTPX is None or TINYPROXY is None,
                                   reason="nghttpx and tinyproxy are installed by scripts/bootstrap.sh")


@needs_nghttpx
async def test_our_client_tunnels_through_nghttpx(tmp_path: Path) -> None:
    async with hbone_env() as env, nghttpx_chain(env, tmp_path) as port:
        pool = HbonePool(bundle=env.ca.bundle, metrics=env.metrics)
        try:
            req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}", src_addr=("127.0.0.1", 1234))
            sizes = [0, 1, 16_384, 16_385, 5 * 1024 * 1024 + 3, *[(i * 77_777) % 300_000 for i in range(16)]]
            tunnels = [await pool.connect(env.client_cert, ("127.0.0.1", port), [SERVER_ID], req) for _ in sizes]
            assert len(pool.connections()) == 1  # all over one h2 connection to nghttpx
            conn = pool.connections()[0]
            assert conn.session.h2.max_outbound_frame_size == 16_384  # nghttpx's own settings govern us
            payloads = [hashlib.sha256(b"%d" % i).digest() * (s // 32 + 1) for i, s in enumerate(sizes)]
            payloads = [p[:s] for p, s in zip(payloads, sizes, strict=True)]
            echoed = await asyncio.wait_for(
                asyncio.gather(*(echo_exact(t, p) for t, p in zip(tunnels, payloads, strict=True))), 120)
            for got, sent in zip(echoed, payloads, strict=True):
                assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
            assert env.echo.connections == len(sizes)  # every tunnel really went through tinyproxy
        finally:
            await pool.close(0.2)


@needs_nghttpx
async def test_nghttpx_refusal_reaches_our_client(tmp_path: Path) -> None:
    """tinyproxy cannot reach the target: the non-200 status comes back as TunnelRefused."""
    async with hbone_env() as env, nghttpx_chain(env, tmp_path) as port:
        pool = HbonePool(bundle=env.ca.bundle, metrics=env.metrics)
        try:
            req = TunnelRequest(authority=f"127.0.0.1:{free_port()}")
            with pytest.raises(TunnelRefused) as exc:
                await pool.connect(env.client_cert, ("127.0.0.1", port), [SERVER_ID], req)
            assert exc.value.status >= 500
            # The connection survives the refused stream.
            req = TunnelRequest(authority=f"127.0.0.1:{env.echo.port}")
            tunnel = await pool.connect(env.client_cert, ("127.0.0.1", port), [SERVER_ID], req)
            assert await echo_exact(tunnel, b"after refusal") == b"after refusal"
            assert len(pool.connections()) == 1
        finally:
            await pool.close(0.2)

"""HBONE throughput and latency, side by side with plain TCP, a Python relay and stunnel4, in one run.

Paths, all on loopback, each proxy hop in its own process (as the agents on two nodes would be):

* ``direct``       generator -> sink
* ``py-relay``     generator -> Python TCP relay (asyncio Protocols) -> sink
* ``stunnel``      generator -> stunnel4 client -> TLS 1.3 -> stunnel4 server -> sink   (a C TLS tunnel)
* ``hbone``        generator -> HBONE client (pool + relay) -> TLS 1.3 + HTTP/2 -> HBONE server -> sink

Bulk: one TCP connection moving ``BULK_MIB`` MiB one way, median MB/s over ``RUNS`` runs (paths
interleaved per round so machine noise hits all alike). Latency: 1 KiB request/response, p50/p99 over
``PINGS`` exchanges on one established connection; for HBONE also with a new tunnel per request over the
pooled connection (CONNECT + 200 + 1 KiB each way), the way the agent carries short connections.
Results: ``bench/results/hbone.md`` and ``hbone.json``. Bounded: every step has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BULK_MIB = int(os.environ.get("HBONE_BENCH_MIB", "512"))
RUNS = int(os.environ.get("HBONE_BENCH_RUNS", "5"))
PINGS = int(os.environ.get("HBONE_BENCH_PINGS", "2000"))
STEP_TIMEOUT = 120.0
CHUNK = 1 << 20


# ---- roles run in child processes ------------------------------------------------------------------


def _announce(*ports: int) -> None:
    print("PORTS " + " ".join(str(p) for p in ports), flush=True)


def role_sink() -> None:
    """Discard server (bulk) and echo server (latency), blocking threads: cheap and predictable."""
    sink = socket.create_server(("127.0.0.1", 0), backlog=128)
    echo = socket.create_server(("127.0.0.1", 0), backlog=128)

    def discard(conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        n = 0
        with conn:
            while True:
                k = conn.recv_into(buf)
                if not k:
                    break
                n += k
            with contextlib.suppress(OSError):
                conn.sendall(n.to_bytes(8, "big"))  # report the count back, then close

    def echo_conn(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)

    def serve(listener: socket.socket, handler: object) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    threading.Thread(target=serve, args=(sink, discard), daemon=True).start()
    threading.Thread(target=serve, args=(echo, echo_conn), daemon=True).start()
    _announce(sink.getsockname()[1], echo.getsockname()[1])
    threading.Event().wait()


class _Splice(asyncio.Protocol):
    """One side of a plain TCP<->TCP relay with backpressure and half-close (the Python baseline)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Splice | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        else:
            self.eof = True
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve_plain_relay(target: int) -> int:
    loop = asyncio.get_running_loop()

    def accept() -> _Splice:
        down = _Splice()

        async def dial() -> None:
            up = _Splice()
            up.peer, down.peer = down, up
            try:
                await loop.create_connection(lambda: up, "127.0.0.1", target)
            except OSError:
                if down.transport is not None:
                    down.transport.close()
                return
            for chunk in down.pending:
                up.transport.write(chunk)  # type: ignore[union-attr]
            down.pending.clear()
            if down.eof:
                up.transport.write_eof()  # type: ignore[union-attr]

        task = loop.create_task(dial())
        down.dialing = task  # type: ignore[attr-defined]  # keep a reference until it is done
        return down

    server = await loop.create_server(accept, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1]


async def serve_hbone_outbound(cert: object, server: tuple[str, int], server_id: str, target: tuple[str, int]
                               ) -> int:
    """What the agent's outbound listener does: accept TCP, open a pooled tunnel, relay."""
    from prometheus_client import CollectorRegistry

    from mesh.hbone import HboneMetrics, HbonePool, TunnelRequest, relay

    pool = HbonePool(bundle=cert.roots, metrics=HboneMetrics(CollectorRegistry()))  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[object]] = set()

    async def handle(sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
            req = TunnelRequest(authority=f"{target[0]}:{target[1]}", src_addr=(peer[0], peer[1]))
            tunnel = await pool.connect(cert, server, [server_id], req)  # type: ignore[arg-type]
            await relay(tunnel, sock)
        except Exception as exc:
            print(f"outbound relay failed: {exc!r}", file=sys.stderr, flush=True)
            sock.close()

    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)

    async def accept_loop() -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(handle(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    tasks.add(loop.create_task(accept_loop()))
    return listener.getsockname()[1]


async def role_py_relay(targets: list[int]) -> None:
    ports = [await serve_plain_relay(t) for t in targets]
    _announce(*ports)
    await asyncio.Event().wait()


async def role_hbone_server(certdir: str) -> None:
    from prometheus_client import CollectorRegistry

    from mesh.hbone import HboneMetrics, HboneServer
    from mesh.identity import WorkloadCert

    cert = WorkloadCert.read_files(certdir)
    server = HboneServer(lambda local: cert, cert.identity.trust_domain, cert.roots,
                         metrics=HboneMetrics(CollectorRegistry()))
    listener = await server.listen("127.0.0.1", 0)
    _announce(listener.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


async def role_hbone_client(certdir: str, server_port: int, server_id: str, targets: list[int]) -> None:
    from mesh.identity import WorkloadCert

    cert = WorkloadCert.read_files(certdir)
    ports = [await serve_hbone_outbound(cert, ("127.0.0.1", server_port), server_id, ("127.0.0.1", t))
             for t in targets]
    _announce(*ports)
    await asyncio.Event().wait()


async def role_hbone_pingpong(certdir: str, server_port: int, server_id: str, echo_port: int, count: int) -> None:
    """New tunnel per 1 KiB request over one pooled connection; prints latencies (seconds) as JSON."""
    from prometheus_client import CollectorRegistry

    from mesh.hbone import HboneMetrics, HbonePool, TunnelRequest
    from mesh.identity import WorkloadCert

    cert = WorkloadCert.read_files(certdir)
    pool = HbonePool(bundle=cert.roots, metrics=HboneMetrics(CollectorRegistry()))
    payload = b"x" * 1024
    samples = []
    req = TunnelRequest(authority=f"127.0.0.1:{echo_port}", src_addr=("127.0.0.1", 1))
    for _ in range(count):
        t0 = time.perf_counter()
        tunnel = await pool.connect(cert, ("127.0.0.1", server_port), [server_id], req)
        reader, writer = tunnel.streams()
        writer.write(payload)
        await reader.readexactly(len(payload))
        samples.append(time.perf_counter() - t0)
        writer.write_eof()
        await reader.read()
        await tunnel.wait_closed()
    cipher = pool.connections()[0].transport.get_extra_info("cipher")[0] if pool.connections() else None
    await pool.close(1.0)
    print(json.dumps({"samples": samples, "cipher": cipher}), flush=True)


# ---- the parent: spawn, measure, report --------------------------------------------------------------


class Proc:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=env, start_new_session=True)

    def ports(self, timeout: float = 30.0) -> list[int]:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                err = self.p.stderr.read() if self.p.stderr else ""
                raise RuntimeError(f"{self.p.args} exited: {err[-2000:]}")
            if line.startswith("PORTS "):
                return [int(x) for x in line.split()[1:]]
        raise TimeoutError(f"{self.p.args} did not announce its ports")

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


def _child(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.bench_hbone", *args]


def bulk(port: int, mib: int) -> float:
    """Send ``mib`` MiB through ``port``; the sink replies with its count when it saw EOF. Returns MB/s."""
    block = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT) as s:
        t0 = time.perf_counter()
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            chunk = s.recv(8 - len(got))
            if not chunk:
                raise RuntimeError("path closed before the sink reported its byte count")
            got += chunk
        elapsed = time.perf_counter() - t0
    count = int.from_bytes(got, "big")
    if count != mib * CHUNK:
        raise RuntimeError(f"sink received {count} bytes, expected {mib * CHUNK}")
    return mib * CHUNK / elapsed / 1e6


def pingpong(port: int, count: int) -> list[float]:
    payload = b"x" * 1024
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm-up
            s.sendall(payload)
            _recv_exact(s, len(payload))
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(payload)
            _recv_exact(s, len(payload))
            samples.append(time.perf_counter() - t0)
    return samples


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("connection closed mid-response")
        buf += chunk
    return bytes(buf)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes (and their threads) so far, from /proc."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def _stunnel_configs(tmp: Path, cert: Path, key: Path, sink: int, echo: int) -> tuple[Path, Path, list[int]]:
    ports = [_free_port() for _ in range(4)]
    common = "foreground = yes\npid =\ndebug = 3\nsslVersionMin = TLSv1.3\n"
    srv = tmp / "stunnel-server.conf"
    srv.write_text(common + f"cert = {cert}\nkey = {key}\n"
                   f"[sink]\naccept = 127.0.0.1:{ports[0]}\nconnect = 127.0.0.1:{sink}\n"
                   f"[echo]\naccept = 127.0.0.1:{ports[1]}\nconnect = 127.0.0.1:{echo}\n")
    cli = tmp / "stunnel-client.conf"
    cli.write_text(common + "client = yes\n"
                   f"[sink]\naccept = 127.0.0.1:{ports[2]}\nconnect = 127.0.0.1:{ports[0]}\n"
                   f"[echo]\naccept = 127.0.0.1:{ports[3]}\nconnect = 127.0.0.1:{ports[1]}\n")
    return srv, cli, ports[2:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def main() -> int:
    from mesh.ca import CertificateAuthority
    from mesh.identity import SpiffeId

    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    procs: list[Proc] = []
    tmp = Path(tempfile.mkdtemp(prefix="nodemesh-bench-hbone-"))
    os.chmod(tmp, 0o700)
    try:
        ca = CertificateAuthority.create("cluster.local")
        server_id = "spiffe://cluster.local/ns/default/sa/sink"
        cdir, sdir = tmp / "client", tmp / "server"
        ca.issue_workload(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/source")).write_files(cdir)
        scert, _skey, _ = ca.issue_workload(SpiffeId.parse(server_id)).write_files(sdir)

        sinkp = Proc(_child("--role", "sink"))
        procs.append(sinkp)
        sink, echo = sinkp.ports()
        relayp = Proc(_child("--role", "py-relay", "--targets", f"{sink},{echo}"))
        procs.append(relayp)
        relay_ports = relayp.ports()
        hsrv = Proc(_child("--role", "hbone-server", "--certdir", str(sdir)))
        procs.append(hsrv)
        (hbone_port,) = hsrv.ports()
        hcli = Proc(_child("--role", "hbone-client", "--certdir", str(cdir), "--server-port", str(hbone_port),
                           "--server-id", server_id, "--targets", f"{sink},{echo}"))
        procs.append(hcli)
        hbone_ports = hcli.ports()
        paths: dict[str, list[int]] = {"direct": [sink, echo], "py-relay": relay_ports, "hbone": hbone_ports}
        pids: dict[str, list[int]] = {"direct": [], "py-relay": [relayp.p.pid], "hbone": [hsrv.p.pid, hcli.p.pid]}
        if stunnel:
            srv_conf, cli_conf, st_ports = _stunnel_configs(tmp, scert, sdir / "key.pem", sink, echo)
            st_srv, st_cli = Proc([stunnel, str(srv_conf)]), Proc([stunnel, str(cli_conf)])
            procs += [st_srv, st_cli]
            for p in st_ports:
                _wait_listening(p)
            paths["stunnel"] = st_ports
            pids["stunnel"] = [st_srv.p.pid, st_cli.p.pid]

        results: dict[str, dict[str, object]] = {name: {"bulk_mbps": []} for name in paths}
        cipher = None
        for ports in paths.values():  # warm-up: first connection, TLS handshakes, caches
            bulk(ports[0], 16)
        for _ in range(RUNS):
            for name, ports in paths.items():
                cpu0 = _cpu_seconds(pids[name])
                results[name]["bulk_mbps"].append(bulk(ports[0], BULK_MIB))  # type: ignore[union-attr]
                cpu = _cpu_seconds(pids[name]) - cpu0
                results[name].setdefault("cpu_s_per_gb", []).append(  # type: ignore[union-attr]
                    cpu / (BULK_MIB * CHUNK / 1e9))
        for name, ports in paths.items():
            lat = pingpong(ports[1], PINGS)
            results[name]["p50_ms"] = _pct(lat, 0.50)
            results[name]["p99_ms"] = _pct(lat, 0.99)
        pp = subprocess.run(_child("--role", "hbone-pingpong", "--certdir", str(cdir), "--server-port",
                                   str(hbone_port), "--server-id", server_id, "--targets", str(echo),
                                   "--count", str(min(PINGS, 1000))),
                            capture_output=True, text=True, timeout=STEP_TIMEOUT, cwd=ROOT)
        if pp.returncode == 0:
            out = json.loads(pp.stdout.strip().splitlines()[-1])
            lat = out["samples"]
            results["hbone (tunnel per request)"] = {"p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99)}
            cipher = out["cipher"]
        else:
            print(pp.stderr[-2000:], file=sys.stderr)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"# HBONE benchmark ({BULK_MIB} MiB bulk x {RUNS} runs, {PINGS} x 1 KiB ping-pong)", "",
             f"Machine: {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.2f}. "
             "Proxy CPU = CPU seconds the path's proxy processes spent per GB moved (lower is better). "
             f"HBONE negotiated {cipher}; stunnel4 runs TLS 1.3 with OpenSSL's default order, whose first "
             "suite is TLS_AES_256_GCM_SHA384.", "",
             "| path | bulk MB/s (median) | bulk runs | proxy CPU s/GB | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        runs = r.get("bulk_mbps") or []
        med = f"{statistics.median(runs):.0f}" if runs else "-"
        each = " ".join(f"{x:.0f}" for x in runs) if runs else "-"
        cpu = r.get("cpu_s_per_gb") or []
        cpu_text = f"{statistics.median(cpu):.2f}" if cpu and name != "direct" else "-"
        lines.append(f"| {name} | {med} | {each} | {cpu_text} | {r.get('p50_ms', float('nan')):.3f} | "
                     f"{r.get('p99_ms', float('nan')):.3f} |")
    if "stunnel" in results and results["stunnel"]["bulk_mbps"]:
        ratio = statistics.median(results["hbone"]["bulk_mbps"]) / statistics.median(  # type: ignore[arg-type]
            results["stunnel"]["bulk_mbps"])  # type: ignore[arg-type]
        lines += ["", f"HBONE / stunnel bulk throughput: {ratio:.2f}x"]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hbone.md").write_text(table + "\n")
    (RESULTS / "hbone.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("--certdir")
    ap.add_argument("--server-port", type=int)
    ap.add_argument("--server-id")
    ap.add_argument("--targets", default="")
    ap.add_argument("--count", type=int, default=1000)
    a = ap.parse_args(argv)
    targets = [int(x) for x in a.targets.split(",") if x]
    if a.role is None:
        return main()
    if a.role == "sink":
        role_sink()
    elif a.role == "py-relay":
        asyncio.run(role_py_relay(targets))
    elif a.role == "hbone-server":
        asyncio.run(role_hbone_server(a.certdir))
    elif a.role == "hbone-client":
        asyncio.run(role_hbone_client(a.certdir, a.server_port, a.server_id, targets))
    elif a.role == "hbone-pingpong":
        asyncio.run(role_hbone_pingpong(a.certdir, a.server_port, a.server_id, targets[0], a.count))
    else:
        raise SystemExit(f"unknown role {a.role}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))

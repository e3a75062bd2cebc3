"""The waypoint under load beside haproxy and the direct path, in one run.

1 KiB HTTP/1.1 responses, 16 keep-alive connections from `wrk`, all on loopback, each hop its own process:

* ``direct``    wrk -> nginx
* ``haproxy``   wrk -> haproxy (HTTP mode, one thread) -> nginx                         (a C L7 proxy)
* ``waypoint``  wrk -> client agent (TCP -> HBONE) -> waypoint (HBONE in, L7, HBONE out)
                -> destination agent (HBONE -> TCP) -> nginx                             (the mesh path)

The waypoint runs from its CLI (`nodemesh waypoint`) with a ztunnel-format mesh config and a default
route (Istio's default retry policy, LEAST_REQUEST). The two agents are small Python HBONE relays
standing in for the node agents; they compete for the same two cores, so the waypoint's req/s here is a
floor. CPU-seconds per 1000 requests and RSS are the proxy process's own (haproxy, or the waypoint
alone), read from /proc. Paths are interleaved per round; medians over ``RUNS`` rounds of ``SECONDS``
each. Results: ``bench/results/waypoint.md`` and ``waypoint.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = int(os.environ.get("WAYPOINT_BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("WAYPOINT_BENCH_SECONDS", "5"))
CONNECTIONS = 16
BODY = b"x" * 1024
POD_IP = "127.0.77.2"
VIP = "127.255.77.1"
CLK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- roles run in child processes ------------------------------------------------------------------


async def _dest_agent(ca_dir: str, port: int) -> None:
    """The destination node's agent: HBONE in, TCP to the pod."""
    from mesh.ca import CertificateAuthority
    from mesh.hbone import HboneServer
    from mesh.identity import SpiffeId

    ca = CertificateAuthority.load(ca_dir)
    cert = ca.issue_workload(SpiffeId("cluster.local", "default", "web"))
    server = HboneServer(lambda _l: cert, "cluster.local", ca.bundle)
    await server.listen(POD_IP, port)
    print("READY", flush=True)
    await asyncio.Event().wait()


async def _client_agent(ca_dir: str, listen: int, waypoint: int) -> None:
    """The client node's agent: TCP in, one HBONE tunnel per connection to the waypoint."""
    from mesh.ca import CertificateAuthority
    from mesh.hbone import HbonePool, TunnelRequest, relay
    from mesh.identity import SpiffeId

    ca = CertificateAuthority.load(ca_dir)
    cert = ca.issue_workload(SpiffeId("cluster.local", "default", "sleep"))
    pool = HbonePool(bundle=ca.bundle)
    wp_id = [SpiffeId("cluster.local", "default", "waypoint")]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket").dup()
        peer = writer.get_extra_info("peername")
        writer.transport.pause_reading()
        writer.transport.abort()  # the dup keeps the connection; the relay takes it over
        try:
            tunnel = await pool.connect(cert, ("127.0.0.1", waypoint), wp_id,
                                        TunnelRequest(authority=f"{VIP}:80", src_addr=("127.0.77.9", peer[1])))
            await relay(tunnel, sock)
        except Exception:
            sock.close()

    await asyncio.start_server(handle, "127.0.0.1", listen)
    print("READY", flush=True)
    await asyncio.Event().wait()


def _role(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", required=True)
    p.add_argument("--ca")
    p.add_argument("--port", type=int)
    p.add_argument("--waypoint", type=int)
    args = p.parse_args(argv)
    if args.role == "dest":
        asyncio.run(_dest_agent(args.ca, args.port))
    elif args.role == "client":
        asyncio.run(_client_agent(args.ca, args.port, args.waypoint))


# ---- the run -------------------------------------------------------------------------------------


class Proc:
    def __init__(self, argv: list[str], ready: str | None = None, timeout: float = 30.0, **kw: object) -> None:
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, **kw)  # type: ignore[call-overload]
        if ready is not None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                line = self.p.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError(f"{argv[0]} exited before it was ready")
                if ready in line:
                    break
            else:
                raise RuntimeError(f"{argv[0]} not ready in {timeout}s")

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not come up")


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(url: str, seconds: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "--timeout", "5s", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "requests": total, "p50_ms": p50, "p99_ms": p99,
            "non2xx": int(errors.group(1)) if errors else 0, "socket_errors": socket_errors.group(1) if socket_errors
            else ""}


def nginx_conf(tmp: Path, port: int) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  keepalive_requests 1000000;
  server {{
    listen {POD_IP}:{port};
    location / {{ default_type text/plain; return 200 "{BODY.decode()}"; }}
  }}
}}
""")
    return conf


def haproxy_conf(tmp: Path, port: int, backend: int) -> Path:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server s1 {POD_IP}:{backend}
""")
    return conf


def mesh_config(tmp: Path, nginx_port: int) -> Path:
    doc = {
        "workloads": [
            {"uid": "bench//v1/Pod/default/web", "name": "web", "namespace": "default", "serviceAccount": "web",
             "workloadIps": [POD_IP], "protocol": "HBONE", "labels": {"app": "web"},
             "services": {"default/web.default.svc.cluster.local": {80: nginx_port}}},
            {"uid": "bench//v1/Pod/default/sleep", "name": "sleep", "namespace": "default",
             "serviceAccount": "sleep", "workloadIps": ["127.0.77.9"], "protocol": "HBONE"},
        ],
        "services": [{"name": "web", "namespace": "default", "hostname": "web.default.svc.cluster.local",
                      "vips": [f"/{VIP}"], "ports": {80: nginx_port},
                      "waypoint": {"destination": "default/waypoint.default.svc.cluster.local"}}],
    }
    path = tmp / "mesh.json"
    path.write_text(json.dumps(doc))
    return path


def main() -> int:
    for tool in ("wrk", "haproxy", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench_waypoint: {tool} is not installed (scripts/bootstrap.sh installs it)", file=sys.stderr)
            return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="wpbench-") as tmpdir:
        tmp = Path(tmpdir)
        from mesh.ca import CertificateAuthority

        ca_dir = tmp / "ca"
        CertificateAuthority.init_dir(ca_dir)
        (tmp / "routes").mkdir()
        nginx_port, haproxy_port, hbone_port = free_port(POD_IP), free_port(), free_port(POD_IP)
        wp_port, client_port, admin_port = free_port(), free_port(), free_port()
        try:
            procs.append(Proc(["nginx", "-c", str(nginx_conf(tmp, nginx_port))]))
            wait_port(POD_IP, nginx_port)
            haproxy = Proc(["haproxy", "-f", str(haproxy_conf(tmp, haproxy_port, nginx_port)), "-db"])
            procs.append(haproxy)
            wait_port("127.0.0.1", haproxy_port)
            me = str(Path(__file__).resolve())
            dest = Proc([py, me, "--role", "dest", "--ca", str(ca_dir), "--port", str(hbone_port)], "READY")
            procs.append(dest)
            waypoint = Proc([py, "-c", "import sys; from bench.bench_waypoint import run_waypoint; run_waypoint()",
                             "--name", "default/waypoint", "--config-dir", str(tmp / "routes"),
                             "--mesh-config", str(mesh_config(tmp, nginx_port)), "--ca", str(ca_dir),
                             "--listen", f"127.0.0.1:{wp_port}", "--hbone-port", str(hbone_port),
                             "--admin", f"127.0.0.1:{admin_port}", "--access-log", "off"], "ready on",
                            cwd=str(ROOT))
            procs.append(waypoint)
            client = Proc([py, me, "--role", "client", "--ca", str(ca_dir), "--port", str(client_port),
                           "--waypoint", str(wp_port)], "READY")
            procs.append(client)
            paths = {
                "direct": (f"http://{POD_IP}:{nginx_port}/", None),
                "haproxy": (f"http://127.0.0.1:{haproxy_port}/", haproxy.pid),
                "waypoint": (f"http://127.0.0.1:{client_port}/", waypoint.pid),
            }
            for url, _ in paths.values():  # warm-up: connections, pools, caches
                wrk(url, 1)
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
            for _ in range(RUNS):
                for name, (url, pid) in paths.items():
                    before = cpu_seconds(pid) if pid else 0.0
                    agents = (cpu_seconds(client.pid) + cpu_seconds(dest.pid)) if name == "waypoint" else 0.0
                    result = wrk(url, SECONDS)
                    if pid:
                        result["cpu_s_per_1k"] = (cpu_seconds(pid) - before) / max(result["requests"], 1) * 1000
                        result["rss_mib"] = rss_mib(pid)
                    if name == "waypoint":
                        spent = cpu_seconds(client.pid) + cpu_seconds(dest.pid) - agents
                        result["agents_cpu_s_per_1k"] = spent / max(result["requests"], 1) * 500  # per agent
                    runs[name].append(result)
        finally:
            for proc in reversed(procs):
                proc.stop()
    table = {}
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("rps", "p50_ms", "p99_ms")}
        if "cpu_s_per_1k" in results[0]:
            med["cpu_s_per_1k"] = statistics.median(r["cpu_s_per_1k"] for r in results)
            med["rss_mib"] = max(r["rss_mib"] for r in results)
        if "agents_cpu_s_per_1k" in results[0]:
            med["agents_cpu_s_per_1k"] = statistics.median(r["agents_cpu_s_per_1k"] for r in results)
        med["non2xx"] = sum(r["non2xx"] for r in results)
        table[name] = med
    lines = [f"# waypoint: 1 KiB HTTP/1.1, {CONNECTIONS} connections, median of {RUNS} x {SECONDS}s", "",
             "| path | req/s | p50 ms | p99 ms | CPU-s / 1000 req (proxy) | RSS MiB (proxy) | non-2xx |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in table.items():
        cpu = f"{m['cpu_s_per_1k']:.3f}" if "cpu_s_per_1k" in m else "-"
        rss = f"{m['rss_mib']:.0f}" if "rss_mib" in m else "-"
        lines.append(f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {cpu} | {rss} | "
                     f"{int(m['non2xx'])} |")
    ratio = table["waypoint"]["rps"] / table["haproxy"]["rps"] if table["haproxy"]["rps"] else 0.0
    lines += ["", f"waypoint req/s = {ratio:.0%} of haproxy's (goal >= 50%); "
                  f"waypoint CPU = {table['waypoint']['cpu_s_per_1k']:.3f} CPU-s per 1000 requests (goal <= 0.25).",
              f"Each stand-in agent (a bare HBONE relay, no L7) spent {table['waypoint']['agents_cpu_s_per_1k']:.3f} "
              "CPU-s per 1000 requests on the same path: the waypoint terminates and originates HBONE, so about "
              "twice that is tunnel cost before any HTTP work."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "waypoint.md").write_text(text)
    (RESULTS / "waypoint.json").write_text(json.dumps({"table": table, "runs": runs}, indent=2))
    print(text)
    return 0


def run_waypoint() -> None:
    """`nodemesh waypoint` through its CLI module (the console entry point may not be wired here)."""
    import logging

    from waypoint.cli import register

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="nodemesh")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["waypoint", *sys.argv[1:]])
    profile = os.environ.get("WAYPOINT_PROFILE")  # a path: write cProfile stats of the waypoint there
    if not profile:
        raise SystemExit(args.func(args))
    import cProfile

    prof = cProfile.Profile()
    try:
        rc = prof.runcall(args.func, args)
    finally:
        prof.dump_stats(profile)
    raise SystemExit(rc)


if __name__ == "__main__":
    if "--role" in sys.argv:
        sys.path.insert(0, str(ROOT))
        _role(sys.argv[1:])
    else:
        sys.exit(main())

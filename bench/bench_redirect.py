"""Connection setup through redirection: eBPF (sk_lookup) vs nftables (REDIRECT) vs none.

What is measured is the kernel's steering, not a proxy: each connection is a TCP handshake
plus one byte sent by whoever accepted it, then an RST close (no TIME_WAIT build-up). With
redirection the acceptor is the agent's listener (15001 for the pod's outbound, 15006 for
inbound); without it, the application's own listener on 8080. Everything runs in one lab:

* outbound: pod ``client`` connects to ``server:8080``; captured in client's namespace;
* inbound: pod ``peer`` (never redirected) connects to ``server:8080``; captured in server's.

Per run and mode: ``CONNS`` sequential connections per direction, timed one by one
(latency = connect() until the first byte arrived) and in total (rate). Modes are
interleaved within each run so drift on this shared 2-core machine hits them alike; the
report gives medians over ``RUNS`` runs. Also measured: eBPF program compile+load time and
per-pod install/remove time of each backend.

Run as root: ``.venv/bin/python -m bench.bench_redirect``. Results:
``bench/results/redirect.{md,json}``. Bounded: at most ``DEADLINE_S`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from ipaddress import IPv4Network
from pathlib import Path

from agent.redirect import PodNetInfo, RedirectController
from agent.redirect.ebpf import SkLookupProgram, detach_pinned, ensure_bpffs, pinned_links
from mesh.lab import Lab, load_topology
from mesh.netns import NetnsWorker, socket_in_netns

CONNS = 1000
RUNS = 5
POD_CYCLES = 20
DEADLINE_S = 240.0
RESULTS = Path(__file__).parent / "results"
MODES = ("none", "ebpf", "nftables")
TOPOLOGY = {
    "nodes": [
        {"name": "node-a", "pods": [{"name": "client"}, {"name": "peer"}]},
        {"name": "node-b", "pods": [{"name": "server"}]},
    ]
}
LINGER_RST = struct.pack("ii", 1, 0)


class Acceptor:
    """Accepts on one listening socket, sends one byte, closes; on its own thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(True)
        sock.settimeout(0.2)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError):
                conn.sendall(b"x")
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def dial(ip: str, port: int, n: int, deadline: float) -> tuple[list[float], float]:
    """n sequential connections from the calling thread's namespace: latencies (s), wall time."""
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        s.settimeout(5)
        a = time.perf_counter()
        s.connect((ip, port))
        if s.recv(1) != b"x":
            raise RuntimeError("acceptor sent nothing")
        lat.append(time.perf_counter() - a)
        s.close()
    return lat, time.perf_counter() - t0


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def pod_info(p) -> PodNetInfo:
    return PodNetInfo(
        uid=p.uid, netns=p.netns_path, ip=p.ip, name=p.name, namespace=p.namespace,
        node_addresses=(IPv4Network(f"{p.gateway}/32"),),
    )


def main() -> int:
    if os.geteuid() != 0:
        print("bench_redirect: must run as root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + DEADLINE_S
    name = "br" + secrets.token_hex(3)
    root = f"/sys/fs/bpf/nodemesh-bench-{secrets.token_hex(3)}"
    state = tempfile.mkdtemp(prefix="nodemesh-bench-")
    lab = Lab.up(load_topology(TOPOLOGY), name=name)
    acceptors: list[Acceptor] = []
    results: dict[str, object] = {"conns_per_run": CONNS, "runs": RUNS}
    try:
        client, server = lab.pod("client"), lab.pod("server")
        pods = [pod_info(client), pod_info(server)]

        # Compile + load cost of the eBPF program (once per agent process).
        ensure_bpffs(root)
        compile_s = []
        for _ in range(3):
            t = time.perf_counter()
            SkLookupProgram().close()
            compile_s.append(time.perf_counter() - t)
        results["ebpf_compile_load_ms"] = round(statistics.median(compile_s) * 1e3, 1)

        ctls = {b: RedirectController(backend=b, bpffs_root=root, state_dir=state) for b in ("ebpf", "nftables")}
        for c in ctls.values():
            c.prepare()

        # Per-pod install and remove cost.
        churn: dict[str, dict[str, float]] = {}
        for b, ctl in ctls.items():
            ins, rem = [], []
            for _ in range(POD_CYCLES):
                t = time.perf_counter()
                ctl.install(pods[0])
                ins.append(time.perf_counter() - t)
                t = time.perf_counter()
                ctl.remove(pods[0].uid)
                rem.append(time.perf_counter() - t)
            churn[b] = {"install_ms": round(statistics.median(ins) * 1e3, 2),
                        "remove_ms": round(statistics.median(rem) * 1e3, 2)}
        results["pod_churn"] = churn

        app = socket_in_netns(server.netns_path)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        app.bind(("0.0.0.0", 8080))
        app.listen(1024)
        acceptors.append(Acceptor(app))
        workers = {n: NetnsWorker(lab.pod(n).netns_path) for n in ("client", "peer")}

        samples: dict[str, dict[str, list]] = {m: {"out_lat": [], "in_lat": [], "out_rate": [], "in_rate": []}
                                               for m in MODES}
        for run in range(RUNS):
            for mode in MODES:
                if time.monotonic() > deadline:
                    break
                local: list[Acceptor] = []
                if mode != "none":
                    reds = [ctls[mode].install(p) for p in pods]
                    local = [Acceptor(reds[0].listeners.outbound), Acceptor(reds[1].listeners.inbound)]
                try:
                    for direction, src in (("out", "client"), ("in", "peer")):
                        lat, wall = workers[src].run(dial, server.ip, 8080, CONNS, deadline)
                        samples[mode][f"{direction}_lat"].append(lat)
                        samples[mode][f"{direction}_rate"].append(len(lat) / wall)
                finally:
                    for a in local:
                        a.stop()
                    if mode != "none":
                        for p in pods:
                            ctls[mode].remove(p.uid)
            print(f"run {run + 1}/{RUNS} done", file=sys.stderr)
        for w in workers.values():
            w.close()
        for c in ctls.values():
            c.close()

        table: dict[str, dict[str, float]] = {}
        for mode in MODES:
            row: dict[str, float] = {}
            for d in ("out", "in"):
                runs_lat = samples[mode][f"{d}_lat"]
                if not runs_lat:
                    continue
                row[f"{d}_p50_us"] = round(statistics.median(pct(r, 0.50) for r in runs_lat) * 1e6, 1)
                row[f"{d}_p99_us"] = round(statistics.median(pct(r, 0.99) for r in runs_lat) * 1e6, 1)
                row[f"{d}_conn_per_s"] = round(statistics.median(samples[mode][f"{d}_rate"]))
            table[mode] = row
        results["setup"] = table
    finally:
        for a in acceptors:
            a.stop()
        lab.down()
        for path in pinned_links(root).values():
            detach_pinned(path)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "redirect.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Connection setup through redirection (medians over runs)",
        "",
        f"{CONNS} sequential connections per run and direction, {RUNS} runs, modes interleaved.",
        "Latency: connect() to first byte from the acceptor. Rate: connections per second, one client.",
        "",
        "| mode | outbound p50 µs | outbound p99 µs | outbound conn/s "
        "| inbound p50 µs | inbound p99 µs | inbound conn/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in results["setup"].items():  # type: ignore[union-attr]
        lines.append(
            f"| {mode} | {row.get('out_p50_us')} | {row.get('out_p99_us')} | {row.get('out_conn_per_s')} | "
            f"{row.get('in_p50_us')} | {row.get('in_p99_us')} | {row.get('in_conn_per_s')} |"
        )
    lines += [
        "",
        f"eBPF program compile + load: {results['ebpf_compile_load_ms']} ms (once per agent process).",
        "",
        "| backend | install one pod (ms) | remove one pod (ms) |",
        "|---|---|---|",
    ]
    for b, c in results["pod_churn"].items():  # type: ignore[union-attr]
        lines.append(f"| {b} | {c['install_ms']} | {c['remove_ms']} |")
    (RESULTS / "redirect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

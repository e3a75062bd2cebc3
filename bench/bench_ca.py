"""CA signing throughput under a burst: a node with 100 new pods asks for 100 certificates at once.

Compared side by side in the same run, medians over several runs:

* ``nodemesh CA``: ``nodemesh ca serve`` in its own process (the real CLI), 100 concurrent CSRs over
  mutual TLS from one node agent's client, placement checked for each (a placement file of 100 pods);
  *cold* = a fresh client (100 new TLS connections), *warm* = the same client again (kept-alive);
* ``agent end to end``: the agent's CertificateManager asked for 100 identities at once, i.e. key
  generation + CSR + signing + chain verification on the agent side;
* ``cfssl serve`` (Cloudflare's CA server, Debian's golang-cfssl) over mutual TLS with the same
  intermediate, the same 100 CSRs (no placement check; this old build drops URI SANs);
* ``in-process core``: ``CertificateAuthority.sign_csr`` with no network, the floor.

Goal: the burst fully served in under 1 s. Results: ``bench/results/ca.{md,json}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from mesh.ca import CertificateAuthority
from mesh.ca.client import CAClient
from mesh.certmanager import CertificateManager
from mesh.identity import SpiffeId, build_csr, generate_private_key

BURST = 100
RUNS = 5
DEADLINE_S = 180.0  # the whole benchmark, whatever happens
RESULTS = Path(__file__).parent / "results"
TD = "cluster.local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _burst(fn, items) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(fn(i) for i in items))
    elapsed = time.perf_counter() - start
    assert len(results) == len(items)
    return elapsed


def _row(name: str, times: list[float], note: str = "") -> dict:
    med = statistics.median(times)
    return {"name": name, "runs": len(times), "median_s": med, "min_s": min(times), "max_s": max(times),
            "certs_per_s": BURST / med, "under_1s": med < 1.0, "note": note}


async def _bench(work: Path) -> list[dict]:
    ca = CertificateAuthority.init_dir(work / "ca", TD)
    ids = [SpiffeId(TD, "burst", f"pod-{i}") for i in range(BURST)]
    (work / "placement.json").write_text(json.dumps({"nodes": {"node-a": [str(i) for i in ids]}}))
    node = ca.issue_node("node-a")
    csrs = [build_csr(i, generate_private_key()) for i in ids]
    deadline = time.monotonic() + DEADLINE_S
    rows: list[dict] = []

    # -- in-process core (no network) --
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        for csr in csrs:
            ca.sign_csr(csr)
        times.append(time.perf_counter() - start)
    rows.append(_row("in-process core (sign_csr x100)", times, "no network, no placement"))

    # -- nodemesh CA, the real CLI in its own process --
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.ca.cli", "ca", "serve", "--ca-dir", str(work / "ca"), "--listen",
         f"127.0.0.1:{port}", "--placement", f"file:{work / 'placement.json'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_port(port)
        url = f"https://127.0.0.1:{port}"
        cold, warm, e2e = [], [], []
        for _ in range(RUNS):
            if time.monotonic() > deadline:
                break
            async with CAClient(url, node, timeout=60) as client:
                cold.append(await _burst(client.sign_csr, csrs))
                warm.append(await _burst(client.sign_csr, csrs))
            async with CAClient(url, node, timeout=60) as client, CertificateManager(client.fetch) as manager:
                e2e.append(await _burst(lambda i, m=manager: m.get(i, timeout=60), ids))
        rows.append(_row("nodemesh CA, cold client (mTLS, placement)", cold, "100 new TLS connections"))
        rows.append(_row("nodemesh CA, warm client (mTLS, placement)", warm, "kept-alive connections"))
        rows.append(_row("agent end to end (CertificateManager.get x100)", e2e,
                         "keygen + CSR + sign + verify, cold client"))
    finally:
        _stop(proc)

    # -- cfssl serve, same intermediate, mutual TLS --
    cfssl = shutil.which("cfssl")
    if cfssl is None:
        rows.append({"name": "cfssl serve", "note": "not installed (apt-get install golang-cfssl)"})
        return rows
    serving = ca.issue_server(["nodemesh-ca"])
    serving.write_files(work / "cfssl-tls")
    (work / "cfssl.json").write_text(json.dumps({"signing": {"default": {
        "expiry": "24h", "usages": ["digital signature", "server auth", "client auth"]}}}))
    port = _free_port()
    proc = subprocess.Popen(
        [cfssl, "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", str(work / "ca" / "ca-cert.pem"),
         "-ca-key", str(work / "ca" / "ca-key.pem"), "-config", str(work / "cfssl.json"), "-loglevel", "5",
         "-tls-cert", str(work / "cfssl-tls" / "cert-chain.pem"), "-tls-key", str(work / "cfssl-tls" / "key.pem"),
         "-mutual-tls-ca", str(work / "ca" / "root-cert.pem")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_port(port)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        node.load_into(ctx)
        bodies = [{"certificate_request": c.decode()} for c in csrs]
        url = f"https://127.0.0.1:{port}/api/v1/cfssl/sign"

        async def sign(session: aiohttp.ClientSession, body: dict) -> str:
            async with session.post(url, json=body) as resp:
                data = await resp.json(content_type=None)
                if not data.get("success"):
                    raise RuntimeError(f"cfssl refused: {data.get('errors')}")
                return data["result"]["certificate"]

        cold, warm = [], []
        timeout = aiohttp.ClientTimeout(total=60)
        for _ in range(RUNS):
            if time.monotonic() > deadline:
                break
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=100),
                                             timeout=timeout) as session:
                cold.append(await _burst(lambda b, s=session: sign(s, b), bodies))
                warm.append(await _burst(lambda b, s=session: sign(s, b), bodies))
        rows.append(_row("cfssl serve, cold client (mTLS)", cold, "no placement check; drops URI SANs"))
        rows.append(_row("cfssl serve, warm client (mTLS)", warm, "no placement check; drops URI SANs"))
    finally:
        _stop(proc)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"CA burst: {BURST} concurrent certificate requests from one node, median of {RUNS} runs "
             f"({os.cpu_count()} CPUs)", "",
             "| peer | median s | min s | max s | certs/s | < 1 s | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['name']} | - | - | - | - | - | {r['note']} |")
            continue
        lines.append(f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                     f"{r['certs_per_s']:.0f} | {'yes' if r['under_1s'] else 'NO'} | {r['note']} |")
    return "\n".join(lines)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="nodemesh-bench-ca-"))
    try:
        rows = asyncio.run(asyncio.wait_for(_bench(work), DEADLINE_S + 30))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = _table(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ca.md").write_text(table + "\n")
    (RESULTS / "ca.json").write_text(json.dumps({"burst": BURST, "runs": RUNS, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

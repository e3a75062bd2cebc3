"""Helpers for the redirection tests (this module holds no tests itself).

``Relay`` stands in for the agent's L4 proxy, which is not part of the redirection
layer: it accepts on a pod's 15001/15006 listeners, records what it saw (the original
destination, the peer), and forwards bytes to the original destination from a marked
socket in the pod's namespace. It speaks plain TCP where the real agent speaks HBONE,
so these tests exercise capture, not the tunnel.

Run as ``python -m tests.test_redirect_support agent ...`` it is a tiny agent process
for the restart and crash tests: it installs (or re-adopts) redirection, prints one JSON
line, relays until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from agent.redirect import PodNetInfo, PodRedirection, RedirectController, original_destination
from agent.redirect.exclusions import CaptureExclusions

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Accepted:
    pod: str
    listener: str  # "outbound" (15001) or "inbound" (15006)
    peer: tuple[str, int]
    original_dst: tuple[str, int]


@dataclass
class Relay:
    """Forwards captured connections; see the module docstring. Use as a context manager."""

    pods: list[PodRedirection]
    accepted: list[Accepted] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[asyncio.base_events.Server] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Relay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        for red in self.pods:
            for kind, lst in (("outbound", red.listeners.outbound), ("inbound", red.listeners.inbound)):
                # asyncio would close the listener on server.close(); hand it a duplicate so
                # the controller stays the owner of the original socket.
                dup = lst.dup()
                dup.setblocking(False)
                self._servers.append(
                    await asyncio.start_server(
                        lambda r, w, red=red, kind=kind: self._handle(r, w, red, kind), sock=dup
                    )
                )

    async def _stop(self) -> None:
        for s in self._servers:
            s.close()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, red: PodRedirection, kind: str
    ) -> None:
        sock = writer.get_extra_info("socket")
        try:
            dst = original_destination(sock)
            with self._lock:
                self.accepted.append(Accepted(red.pod.name, kind, writer.get_extra_info("peername"), dst))
            up = red.socket()
            up.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(up, dst), 10)
            r2, w2 = await asyncio.open_connection(sock=up)
        except Exception:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
        for w in (writer, w2):
            w.close()

    def seen(self) -> list[Accepted]:
        with self._lock:
            return list(self.accepted)


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        pass


def pod_info(pod: Any, annotations: dict[str, str] | None = None) -> PodNetInfo:
    """A lab pod as the controller wants it (the node's gateway is its node address)."""
    return PodNetInfo(
        uid=pod.uid,
        netns=pod.netns_path,
        ip=pod.ip,
        name=pod.name,
        namespace=pod.namespace,
        exclusions=CaptureExclusions.from_annotations(annotations or pod.annotations),
        node_addresses=(IPv4Network(f"{pod.gateway}/32"),),
    )


def start_echo(lab: Any, where: str, port: int) -> subprocess.Popen[str]:
    proc = lab.popen(where, [PY, "-m", "mesh.lab.echo", "serve", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening"), line
    return proc


def echo_from(lab: Any, where: str, ip: str, port: int, size: int = 4096) -> dict[str, Any]:
    """Run the unmodified echo client inside ``where``; its JSON result, or {'error': ...}."""
    res = lab.exec(
        where, [PY, "-m", "mesh.lab.echo", "send", ip, str(port), str(size)], capture_output=True, text=True, timeout=30
    )
    if res.stdout.strip():
        return json.loads(res.stdout.splitlines()[0])  # a result, or {"error": ...} for a failed connection
    return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send and read back the same number of bytes on an echo connection (bounded by a timeout)."""
    sock.sendall(payload)
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < len(payload) and time.monotonic() < deadline:
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            break
        buf += c
    return buf


# --- the helper agent process ---------------------------------------------------------------


def _agent_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["install", "adopt", "solo"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--bpffs-root", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--pods", default="[]", help="JSON list of {uid,netns,ip,name,namespace,gateway,annotations}")
    ap.add_argument("--exit", action="store_true", help="print the result and exit instead of relaying")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    ctl = RedirectController(backend=args.backend, bpffs_root=args.bpffs_root, state_dir=args.state_dir)
    try:
        if args.mode == "adopt":
            reds = ctl.adopt_existing()
        else:
            reds = []
            for p in json.loads(args.pods):
                reds.append(
                    ctl.install(
                        PodNetInfo(
                            uid=p["uid"],
                            netns=p["netns"],
                            ip=p["ip"],
                            name=p.get("name", ""),
                            namespace=p.get("namespace", ""),
                            exclusions=CaptureExclusions.from_annotations(p.get("annotations")),
                            node_addresses=(IPv4Network(f"{p['gateway']}/32"),),
                        )
                    )
                )
    except Exception as exc:
        print(f"ERROR {exc}", file=sys.stderr, flush=True)
        return 3
    print(
        json.dumps(
            {
                "backend": ctl.backend,
                "fallback": ctl.fallback_reason,
                "pods": [{"uid": r.uid, "adopted": r.adopted} for r in reds],
            }
        ),
        flush=True,
    )
    if args.exit:
        if args.mode == "solo":
            ctl.remove_all()
        ctl.close()
        return 0
    with Relay(reds):
        while True:
            time.sleep(3600)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "agent":
    sys.exit(_agent_main(sys.argv[2:]))

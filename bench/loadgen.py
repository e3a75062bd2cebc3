"""Load tools for the mesh benchmark, run inside lab pods: a server, a bulk sender and an open-loop client.

* ``serve SINK_PORT ECHO_PORT``: a discard sink (replies with the byte count it got, as 8 bytes, once it
  sees EOF, so the sender knows every byte arrived) and an echo server, one blocking thread per
  connection. Prints ``READY`` once both listen.
* ``bulk HOST PORT MIB``: one TCP connection, ``MIB`` MiB one way, timed until the sink's count came back.
* ``rate HOST PORT --rate R --conns N --seconds S``: 1 KiB request/response at a fixed rate over ``N``
  connections, open loop. Request ``k`` is due at ``t0 + k/R`` on connection ``k % N`` and is sent then
  whether or not the previous answer on that connection came back (requests pipeline), and its latency
  is counted from when it was *due*, not from when it went out. A slow path therefore cannot slow the
  schedule down and hide its own stalls (no coordinated omission: the wrk2 method).

Clients print ``START`` when the measured part begins (after connecting and warming up, so whoever
samples CPU counters around a run does it at the right moment), then one JSON line. The select() loop is
used rather than epoll because epoll's timeout has millisecond granularity, which would add up to 1 ms of
send lag to every request; select() waits in microseconds. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 1 << 20
REQUEST_SIZE = 1024


# ---- server --------------------------------------------------------------------------------------


def _discard(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    n = 0
    with conn:
        while k := conn.recv_into(buf):
            n += k
        with contextlib.suppress(OSError):
            conn.sendall(n.to_bytes(8, "big"))


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _accept_forever(listener: socket.socket, handler: object) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]


def serve(sink_port: int, echo_port: int, host: str = "0.0.0.0") -> None:
    sink = socket.create_server((host, sink_port), backlog=128)
    echo = socket.create_server((host, echo_port), backlog=128)
    threading.Thread(target=_accept_forever, args=(sink, _discard), daemon=True).start()
    threading.Thread(target=_accept_forever, args=(echo, _echo), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()


# ---- bulk ----------------------------------------------------------------------------------------


def bulk(host: str, port: int, mib: int, timeout: float = 120.0,
         on_start: Callable[[], None] | None = None) -> dict[str, float]:
    """Send ``mib`` MiB; the sink's count must match. Returns MB/s (10^6 bytes per second)."""
    block = os.urandom(CHUNK)
    with socket.create_connection((host, port), timeout=timeout) as s:
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            chunk = s.recv(8 - len(got))
            if not chunk:
                raise ConnectionError("the path closed before the sink reported its byte count")
            got += chunk
        elapsed = time.perf_counter() - t0
    count = int.from_bytes(got, "big")
    if count != mib * CHUNK:
        raise ConnectionError(f"the sink received {count} bytes, {mib * CHUNK} were sent")
    return {"mbps": mib * CHUNK / elapsed / 1e6, "bytes": count, "seconds": elapsed}


# ---- open-loop request/response -------------------------------------------------------------------


@dataclass
class _Conn:
    sock: socket.socket
    due: deque[float] = field(default_factory=deque)  # due times of requests not yet answered
    out: bytearray = field(default_factory=bytearray)  # bytes not yet taken by the kernel
    got: int = 0  # bytes of the current (oldest unanswered) response already received


def _warm(sock: socket.socket, payload: bytes, count: int) -> None:
    """Closed-loop exchanges before the clock starts: tunnels, pools and caches are set up by then."""
    for _ in range(count):
        sock.sendall(payload)
        need = len(payload)
        while need:
            chunk = sock.recv(need)
            if not chunk:
                raise ConnectionError("the server closed during warm-up")
            need -= len(chunk)


def rate_run(host: str, port: int, rate: float, conns: int, seconds: float, size: int = REQUEST_SIZE,
             warmup: int = 20, grace: float = 10.0, on_start: Callable[[], None] | None = None,
             ) -> dict[str, object]:
    """Fixed-rate requests; latencies (microseconds) from each request's due time to its full answer."""
    if rate <= 0 or conns <= 0 or seconds <= 0:
        raise ValueError("rate, conns and seconds must be positive")
    payload = os.urandom(size)
    total = int(rate * seconds)
    sel = selectors.SelectSelector()
    peers: list[_Conn] = []
    latencies: list[int] = []
    max_lag = 0.0
    try:
        for _ in range(conns):
            s = socket.create_connection((host, port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _warm(s, payload, warmup)
            s.setblocking(False)
            c = _Conn(s)
            peers.append(c)
            sel.register(s, selectors.EVENT_READ, c)
        buf = bytearray(65536)
        if on_start is not None:
            on_start()
        interval = 1.0 / rate
        t0 = time.perf_counter() + 0.01
        deadline = t0 + seconds + grace
        k = 0
        done = 0
        while done < total:
            now = time.perf_counter()
            if now > deadline:
                break
            while k < total and t0 + k * interval <= now:
                c = peers[k % conns]
                due = t0 + k * interval
                max_lag = max(max_lag, now - due)
                c.due.append(due)
                if c.out:
                    c.out += payload
                else:
                    try:
                        sent = c.sock.send(payload)
                    except BlockingIOError:
                        sent = 0
                    if sent < size:
                        c.out += payload[sent:]
                        sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                k += 1
            wait = max(0.0, t0 + k * interval - time.perf_counter()) if k < total else 0.05
            for key, events in sel.select(min(wait, 0.05)):
                c = key.data
                if events & selectors.EVENT_WRITE and c.out:
                    try:
                        sent = c.sock.send(c.out)
                    except BlockingIOError:
                        sent = 0
                    del c.out[:sent]
                    if not c.out:
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                if events & selectors.EVENT_READ:
                    try:
                        n = c.sock.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        raise ConnectionError("the server closed a connection during the run")
                    arrived = time.perf_counter()
                    c.got += n
                    while c.got >= size and c.due:
                        c.got -= size
                        latencies.append(int((arrived - c.due.popleft()) * 1e6))
                        done += 1
        elapsed = time.perf_counter() - t0
    finally:
        for c in peers:
            with contextlib.suppress(Exception):
                sel.unregister(c.sock)
            c.sock.close()
        sel.close()
    return {
        "requests": total,
        "completed": done,
        "lost": total - done,
        "seconds": elapsed,
        "achieved_rate": done / elapsed if elapsed > 0 else 0.0,
        "max_send_lag_us": int(max_lag * 1e6),
        "latencies_us": sorted(latencies),
    }


# ---- command line ----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("sink_port", type=int)
    s.add_argument("echo_port", type=int)
    b = sub.add_parser("bulk")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("mib", type=int)
    r = sub.add_parser("rate")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--rate", type=float, default=1000.0)
    r.add_argument("--conns", type=int, default=4)
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--size", type=int, default=REQUEST_SIZE)
    a = ap.parse_args(argv)

    def started() -> None:
        print("START", flush=True)

    try:
        if a.cmd == "serve":
            serve(a.sink_port, a.echo_port)
            return 0
        if a.cmd == "bulk":
            out: dict[str, object] = dict(bulk(a.host, a.port, a.mib, on_start=started))
        else:
            out = rate_run(a.host, a.port, a.rate, a.conns, a.seconds, a.size, on_start=started)
    except (OSError, ValueError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

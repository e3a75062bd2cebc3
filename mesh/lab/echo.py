"""A tiny TCP echo server and client run inside lab pods, for the demo and tests.

`python -m mesh.lab.echo serve PORT` echoes every connection until EOF, then half-closes back.
`python -m mesh.lab.echo send HOST PORT [SIZE] [PARALLEL]` sends SIZE pseudo-random bytes on each of
PARALLEL connections, reads the echoes, and prints one JSON line per connection with the byte count,
whether the echo matched, the peer the server saw and the server's own address (its first line), and the
local address the client used; a failed connection prints its error instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading


def serve(port: int, host: str = "0.0.0.0") -> None:
    srv = socket.create_server((host, port), reuse_port=False, backlog=128)
    print(f"listening {host}:{port}", flush=True)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=_echo, args=(conn, peer), daemon=True).start()


def _echo(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        # The first line tells the client which source address the server saw.
        local = conn.getsockname()
        conn.sendall(f"{peer[0]}:{peer[1]} {local[0]}:{local[1]}\n".encode())
        while True:
            data = conn.recv(262144)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def send(host: str, port: int, size: int = 65536, timeout: float = 10.0) -> dict[str, object]:
    payload = os.urandom(size)
    with socket.create_connection((host, port), timeout=timeout) as s:
        local = s.getsockname()
        out = hashlib.sha256()
        got = bytearray()

        def writer() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        while True:
            chunk = s.recv(262144)
            if not chunk:
                break
            got += chunk
        t.join(timeout)
    head, _, body = bytes(got).partition(b"\n")
    out.update(body)
    saw, _, server = head.decode(errors="replace").partition(" ")
    return {
        "bytes": len(body),
        "match": out.digest() == hashlib.sha256(payload).digest(),
        "server_saw": saw,
        "server": server,
        "local": f"{local[0]}:{local[1]}",
    }


def send_many(host: str, port: int, size: int, parallel: int, timeout: float = 10.0) -> list[dict[str, object]]:
    results: list[dict[str, object]] = [{} for _ in range(parallel)]

    def one(i: int) -> None:
        try:
            results[i] = send(host, port, size, timeout)
        except OSError as e:
            results[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 3)
    return results


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if len(argv) >= 3 and argv[0] == "send":
        size = int(argv[3]) if len(argv) > 3 else 65536
        parallel = int(argv[4]) if len(argv) > 4 else 1
        results = send_many(argv[1], int(argv[2]), size, parallel)
        for r in results:
            print(json.dumps(r))
        return 0 if all("error" not in r for r in results) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The lab's API server process: the test double, reachable from the lab's nodes and from the host.

`python -m mesh.lab.kubeserve` runs inside the first node's namespace (so `lab down`, which kills every
process of the lab's namespaces, also stops it) and serves the API on that node's fabric address, where
agents and the CA of every node reach it as they would reach a cluster's API server. kubectl on the host
cannot reach the fabric, so the parent hands over a listening socket it bound on 127.0.0.1 in the host's
namespace (`--host-fd`); connections accepted there are relayed to the API port. Nothing of the lab is
configured in the host's namespace: the only thing there is that one loopback listener.

The state is populated once from the lab state file (`sync_lab`); afterwards the cluster is changed
through the API (kubectl, `lab add-pod`), as a real one is. A unix control socket (mode 0600) offers
the test hooks a real server does not have, one JSON request per line:

- `{"op": "add-token", "token": T, "user": {"username", "uid", "groups", "extra"}}`
- `{"op": "drop-watches"}`, `{"op": "compact"}`, `{"op": "refuse-watches", "value": true}`
- `{"op": "stop"}` / `{"op": "start"}`: the API port goes away and comes back; the objects are kept, as
  etcd keeps them across an API server restart
- `{"op": "patch", "resource": "namespaces", "namespace": null, "name": "default", "patch": {...}}`:
  a merge patch straight into the store (works while the API port is stopped)
- `{"op": "inject-raw", "resource": "pods", "namespace": ..., "name": ..., "object": ...}` and
  `{"op": "inject-line", "line": "..."}`: malformed data for the clients' error handling, and
  `{"op": "delete", "resource": ..., "namespace": ..., "name": ...}` to take it away again
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from mesh.kube.apiserver import ApiError, ApiServer, sync_lab
from mesh.kube.apiserver.patch import MERGE_PATCH

log = logging.getLogger("nodemesh.lab.kube")


class LabApiServer:
    def __init__(self, host: str, port: int, state: dict[str, Any]) -> None:
        self.host = host
        self.port = port
        self.server = ApiServer(host, port)
        sync_lab(self.server.store, state)
        self.running = False
        self._served = False

    async def start(self) -> None:
        if self.running:
            return
        if self._served:  # a restart: a new server process would start from etcd, i.e. the same objects
            previous = self.server
            self.server = ApiServer(self.host, self.port, store=previous.store)
            for token, user in previous.tokens.items():
                self.server.add_token(token, user)
        await self.server.start()
        self.running = self._served = True

    async def stop(self) -> None:
        if self.running:
            await self.server.stop()
            self.running = False

    def _rtype(self, resource: str) -> Any:
        for t in self.server.store.registry.types:
            if t.plural == resource:
                return t
        raise ValueError(f"resource {resource!r} is not served")

    async def control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        s = self.server
        if op == "ping":
            return {"running": self.running}
        if op == "add-token":
            if not isinstance(req.get("token"), str) or not isinstance(req.get("user"), dict):
                raise ValueError("add-token: needs token (string) and user (object)")
            s.add_token(req["token"], req["user"])
            return {}
        if op == "drop-watches":
            return {"dropped": s.drop_watches(abort=bool(req.get("abort", True)))}
        if op == "compact":
            s.compact()
            return {}
        if op == "refuse-watches":
            s.refuse_watches = bool(req.get("value", True))
            return {}
        if op == "send-bookmarks":
            s.send_bookmarks()
            return {}
        if op == "stop":
            await self.stop()
            return {}
        if op == "start":
            await self.start()
            return {}
        if op == "patch":
            obj = s.store.patch(self._rtype(str(req.get("resource"))), req.get("namespace"), str(req.get("name")),
                                MERGE_PATCH, req.get("patch"))
            return {"resourceVersion": obj["metadata"]["resourceVersion"]}
        if op == "inject-raw":
            s.store.inject_raw(self._rtype(str(req.get("resource"))), str(req.get("namespace") or ""),
                               str(req.get("name")), req.get("object"))
            return {}
        if op == "delete":
            s.store.delete(self._rtype(str(req.get("resource"))), req.get("namespace"), str(req.get("name")))
            return {}
        if op == "inject-line":
            s.inject_watch_line(str(req.get("line", "")).encode() + b"\n")
            return {}
        raise ValueError(f"unknown op {op!r}")


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def serve(args: argparse.Namespace) -> int:
    state = json.loads(Path(args.state).read_text())
    api = LabApiServer(args.host, args.port, state)
    await api.start()

    async def host_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(api.host, api.port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))

    host_server = None
    if args.host_fd is not None:
        sock = socket.socket(fileno=args.host_fd)
        sock.setblocking(False)
        host_server = await asyncio.start_server(host_client, sock=sock)

    async def control_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                    reply = {"ok": True, **(await api.control(req))}
                except (ValueError, ApiError) as err:
                    reply = {"ok": False, "error": getattr(err, "message", None) or str(err)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        writer.close()

    old = os.umask(0o177)
    try:
        control = await asyncio.start_unix_server(control_client, path=args.control)
    finally:
        os.umask(old)
    host_url = None
    if host_server is not None:
        h, p = host_server.sockets[0].getsockname()[:2]
        host_url = f"http://{h}:{p}"
    print(json.dumps({"url": api.server.url, "hostUrl": host_url, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    control.close()
    if host_server is not None:
        host_server.close()
    await api.stop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh.lab.kubeserve", description=__doc__.splitlines()[0])
    p.add_argument("--state", required=True, help="the lab state file")
    p.add_argument("--host", required=True, help="address to serve the API on (the first node's fabric address)")
    p.add_argument("--port", type=int, default=6443)
    p.add_argument("--host-fd", type=int, help="an inherited listening socket (host side) to relay to the API")
    p.add_argument("--control", required=True, help="path of the control socket")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

"""Running the test double outside an asyncio program: in a background thread, or as its own process.

`BackgroundApiServer` serves from a private event loop in a daemon thread, for synchronous callers (the lab
CLI, synchronous tests). `main()` is `python -m mesh.kube.apiserver`: it serves until SIGTERM/SIGINT,
optionally populated from a lab state file and writing a kubeconfig for kubectl.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mesh.kube.apiserver.lab import LabStateError, sync_lab
from mesh.kube.apiserver.server import ApiServer, UserInfo
from mesh.kube.kubeconfig import write_kubeconfig

T = TypeVar("T")
log = logging.getLogger(__name__)


class BackgroundApiServer:
    """An ApiServer on its own loop in a daemon thread; `call()` runs a function on that loop."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-apiserver", daemon=True)
        self.server: ApiServer | None = None

    def start(self, timeout: float = 10.0) -> BackgroundApiServer:
        self._thread.start()

        async def make() -> ApiServer:
            return await ApiServer(**self._kwargs).start()

        self.server = asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def call(self, fn: Callable[[ApiServer], T], timeout: float = 10.0) -> T:
        """Run `fn(server)` on the server's loop (the store is not thread-safe) and return its result."""
        assert self.server is not None
        server = self.server

        async def run() -> T:
            return fn(server)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("API server did not stop cleanly within %ss", timeout)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> BackgroundApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _load_tokens(path: str) -> dict[str, UserInfo]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--tokens: cannot read {path}: {err}") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise SystemExit("--tokens: expected a JSON object {token: {username, uid, groups}}")
    return {str(k): UserInfo(str(v.get("username", "")), str(v.get("uid", "")), tuple(v.get("groups") or ()))
            for k, v in data.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mesh.kube.apiserver",
                                description="A test double of the Kubernetes API server for the nodemesh lab.")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 0), help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--state", help="a lab state file (JSON) to populate the cluster from")
    p.add_argument("--kubeconfig", help="write a kubeconfig for this server here (mode 0600)")
    p.add_argument("--tokens", help="JSON file {token: {username, uid, groups}} for bearer auth and TokenReview")
    p.add_argument("--require-auth", action="store_true", help="refuse requests without a known bearer token")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="... and this key (PEM)")
    p.add_argument("--bookmark-interval", type=float, default=60.0, help="seconds between watch bookmarks")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    host, port = args.listen
    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("--tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    tokens = _load_tokens(args.tokens) if args.tokens else {}
    server = ApiServer(host, port, tokens=tokens, require_auth=args.require_auth, ssl_context=ssl_context,
                       bookmark_interval=args.bookmark_interval)
    if args.state:
        try:
            counts = sync_lab(server.store, json.loads(Path(args.state).read_text()))
        except (OSError, ValueError, LabStateError) as err:
            print(f"--state: {err}", file=sys.stderr)
            return 2
        log.info("populated from %s: %s", args.state, counts)
    await server.start()
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, server.url)
    print(json.dumps({"url": server.url, "kubeconfig": args.kubeconfig}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))

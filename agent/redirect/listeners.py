"""The agent's listening sockets inside a pod's network namespace, and the one function
that tells where a captured connection was going.

The sockets are created on a thread that has entered the pod's namespace
(:mod:`mesh.netns`), so they live there: the pod's IP is their address, exactly as if
the pod had opened them, but the agent process owns them. They are handed back
already listening and non-blocking, ready for ``loop.create_server(sock=...)`` or
``asyncio.start_server(sock=...)``.

Every socket carries ``SO_MARK 0x539`` (children accepted from a listener inherit it for
their replies), which is what keeps the agent's own traffic out of the capture, and
``SO_REUSEADDR`` + ``SO_REUSEPORT``, so that a new agent process can bind the same
ports while an old one still drains (the handover ztunnel does the same way).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from agent.redirect.model import HBONE_PORT, INBOUND_PORT, MESH_MARK, OUTBOUND_PORT
from mesh.netns import NetnsRef, run_in_netns

SO_ORIGINAL_DST = 80  # SOL_IP; linux/netfilter_ipv4.h
IP_TRANSPARENT = 19  # SOL_IP; linux/in.h
LISTEN_BACKLOG = 1024


@dataclass
class PodListeners:
    """The three listeners of one pod; ``close`` closes them all."""

    outbound: socket.socket  # 15001: the pod's own outbound TCP
    inbound: socket.socket  # 15006: plaintext inbound to any app port
    hbone: socket.socket  # 15008: HBONE (mTLS) inbound, reached directly

    def by_port(self) -> dict[int, socket.socket]:
        return {OUTBOUND_PORT: self.outbound, INBOUND_PORT: self.inbound, HBONE_PORT: self.hbone}

    def close(self) -> None:
        for s in (self.outbound, self.inbound, self.hbone):
            s.close()

    @property
    def closed(self) -> bool:
        return all(s.fileno() == -1 for s in (self.outbound, self.inbound, self.hbone))


def mark_socket(sock: socket.socket) -> None:
    """Tag a socket as the agent's, so no capture rule ever touches its traffic."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MESH_MARK)


def _listener(port: int, backlog: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        mark_socket(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if port == OUTBOUND_PORT:
            # A captured outbound connection is accepted with the *remote* destination as
            # its local address; the kernel only routes the SYN-ACK from such a foreign
            # source for a transparent socket (children inherit the flag).
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        # 0.0.0.0: sk_lookup delivers to the socket whatever its address, and nftables'
        # REDIRECT lands on 127.0.0.1 (outbound) or the pod IP (inbound); one bind fits both.
        s.bind(("0.0.0.0", port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def create_listeners(netns: NetnsRef, backlog: int = LISTEN_BACKLOG) -> PodListeners:
    """Open 15001, 15006 and 15008 in ``netns``; all or nothing."""

    def make() -> PodListeners:
        made: list[socket.socket] = []
        try:
            for port in (OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT):
                made.append(_listener(port, backlog))
        except OSError as exc:
            for s in made:
                s.close()
            port = (OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT)[len(made)]
            raise OSError(exc.errno, f"cannot listen on port {port} in the pod namespace: {exc.strerror}") from None
        return PodListeners(outbound=made[0], inbound=made[1], hbone=made[2])

    return run_in_netns(netns, make)


def marked_socket(family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket the capture rules never touch; call it inside a pod's namespace for the agent's own
    connections from that pod (they leave with the pod's IP)."""
    s = socket.socket(family, type)
    try:
        mark_socket(s)
    except BaseException:
        s.close()
        raise
    return s


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the client meant to connect, for a connection accepted on 15001 or 15006.

    With sk_lookup steering the connection keeps its addresses, so ``getsockname()`` *is*
    the original destination. With nftables' REDIRECT the local address was rewritten to a
    listener port, and conntrack knows the original (``SO_ORIGINAL_DST``). A local port
    that is one of the listener ports tells the two apart; a client that really dialled
    15001/15006 gets that port back (the proxy refuses such a self-call).
    """
    host, port = sock.getsockname()[:2]
    if port not in (OUTBOUND_PORT, INBOUND_PORT):
        return host, port
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return host, port
        raise
    dport = struct.unpack_from("!H", raw, 2)[0]
    dhost = socket.inet_ntoa(raw[4:8])
    return dhost, dport

"""Connections the agent opens on a pod's behalf, from inside that pod's network namespace.

Every socket is made in the pod's namespace (by `PodRedirection.socket()`, which marks it 0x539 so no
capture rule touches it): outbound traffic leaves with the pod's own address, and the connection to the
application arrives from where the client really is. Towards the application the client's address is
kept with IP_TRANSPARENT, as ztunnel does, so the app, its logs and its own ACLs see the real client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

SOL_IP = 0
IP_TRANSPARENT = 19
IP_FREEBIND = 15
CONNECT_TIMEOUT = 10.0

SocketFactory = Callable[[], Awaitable[socket.socket]]


# Called with the bound (source ip, source port) before connect(); returns what undoes it after.
Announce = Callable[[str, int], Callable[[], None]]


async def connect(
    factory: SocketFactory,
    dst: tuple[str, int],
    *,
    spoof_source: str | None = None,
    announce: Announce | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> socket.socket:
    """A connected non-blocking socket to `dst`; with `spoof_source`, it carries that source address.

    `announce` tells the redirection layer about the connection between bind() and connect(), so its SYN,
    which looks like the client's own, is not captured back to the agent.
    Raises OSError (refused, unreachable) or TimeoutError; the socket is closed on failure.
    """
    loop = asyncio.get_running_loop()
    sock = await factory()
    undo: Callable[[], None] | None = None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if spoof_source is not None:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
            sock.bind((spoof_source, 0))
            if announce is not None:
                undo = announce(spoof_source, sock.getsockname()[1])
        await asyncio.wait_for(loop.sock_connect(sock, dst), timeout)
    except BaseException:
        sock.close()
        raise
    finally:
        if undo is not None:
            undo()
    return sock

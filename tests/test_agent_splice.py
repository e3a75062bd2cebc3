"""The plain TCP relay: byte-exact both ways, half-close propagated, a reset propagated as a reset."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from agent.proxy.splice import splice


async def _pair_through_splice():
    """client <-> [accepted | splice | dialled] <-> server, all on loopback."""
    loop = asyncio.get_running_loop()
    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    front.setblocking(False)
    back.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, front.getsockname())
    accepted, _ = await loop.sock_accept(front)
    upstream = socket.socket()
    upstream.setblocking(False)
    await loop.sock_connect(upstream, back.getsockname())
    server, _ = await loop.sock_accept(back)
    front.close()
    back.close()
    task = asyncio.ensure_future(splice(accepted, upstream))
    return client, server, task


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, 65536, 8 * 1024 * 1024])
async def test_bytes_cross_exactly_both_ways_and_counts_match(size):
    loop = asyncio.get_running_loop()
    client, server, task = await _pair_through_splice()
    up, down = os.urandom(size), os.urandom(size // 2)

    async def client_side():
        await loop.sock_sendall(client, up)
        client.shutdown(socket.SHUT_WR)
        return await _read_all(client)

    async def server_side():
        got = await _read_all(server)  # ends only if the client's half-close was propagated
        await loop.sock_sendall(server, down)
        server.shutdown(socket.SHUT_WR)
        return got

    got_down, got_up = await asyncio.wait_for(asyncio.gather(client_side(), server_side()), 30)
    stats = await asyncio.wait_for(task, 10)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert got_down == down
    assert (stats.a_to_b, stats.b_to_a, stats.reset) == (size, size // 2, False)
    client.close()
    server.close()


async def test_a_reset_on_one_side_resets_the_other():
    loop = asyncio.get_running_loop()
    client, server, task = await _pair_through_splice()
    await loop.sock_sendall(client, b"hello")
    assert await loop.sock_recv(server, 5) == b"hello"
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.close()  # RST
    stats = await asyncio.wait_for(task, 10)
    assert stats.reset
    with pytest.raises(ConnectionResetError):
        while await asyncio.wait_for(loop.sock_recv(client, 100), 5):
            pass
    client.close()

"""Every accepted HBONE connection sends small frames at once (no Nagle), also on a listener made elsewhere.

The agent's 15008 listener is created inside a pod's namespace as a plain `socket(AF_INET, SOCK_STREAM)`
(proto 0), for which asyncio does not turn Nagle off by itself; a reply then waited for the peer's delayed
ACK, which added about a millisecond to every pipelined request through the mesh.
"""

from __future__ import annotations

import socket

from tests.interop.hbone_env import SERVER_ID, echo_roundtrip, hbone_env


async def test_accepted_connections_have_nodelay_on_a_proto_zero_listener():
    async with hbone_env() as env:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0, as the agent's in-pod one
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        await env.server.serve_socket(listener)
        from mesh.hbone import TunnelRequest

        dst = ("127.0.0.1", listener.getsockname()[1])
        tunnel = await env.pool.connect(env.client_cert, dst, [SERVER_ID],
                                        TunnelRequest(authority=f"127.0.0.1:{env.echo.port}"))
        assert await echo_roundtrip(tunnel, b"x" * 100) == b"x" * 100
        accepted = [c.transport.get_extra_info("socket") for c in env.server.connections if c.transport]
        assert accepted, "the server holds the accepted connection"
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)

"""HBONE: the mutual-TLS HTTP/2 CONNECT tunnel every node-to-node byte travels in.

Layers, bottom up (see ``docs/hbone.md``):

* ``headers``, ``protocol``: parse/format the CONNECT headers; decide 200/400 per request (sans-IO).
* ``h2conn``, ``session``: HTTP/2 via ``h2`` tuned for bulk transfer; events and flow control (sans-IO).
* ``tls``: TLS 1.3 contexts and SPIFFE identity checks.
* ``connection``, ``tunnel``, ``relay``: the asyncio shell: one connection, its tunnels, TCP splicing.
* ``server``, ``client``, ``pool``: what the agent and the waypoint use.
"""

from mesh.hbone.client import HboneClient, TunnelRequest
from mesh.hbone.connection import HboneConnection
from mesh.hbone.constants import (
    CLIENT_LIMITS,
    HBONE_PORT,
    INPOD_MARK,
    SERVER_LIMITS,
    HboneLimits,
)
from mesh.hbone.errors import (
    ConnectionClosedError,
    HandshakeError,
    HboneError,
    HeaderError,
    TunnelRefused,
    TunnelReset,
)
from mesh.hbone.headers import Authority, Baggage, Forwarded, TraceParent, workload_baggage
from mesh.hbone.metrics import HboneMetrics
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.relay import relay
from mesh.hbone.server import HboneServer, any_authority, authority_matches_local_address, dial_tcp
from mesh.hbone.tunnel import ConnectInfo, Tunnel, TunnelStats, TunnelWriter

__all__ = [
    "CLIENT_LIMITS",
    "HBONE_PORT",
    "INPOD_MARK",
    "SERVER_LIMITS",
    "Authority",
    "Baggage",
    "ConnectInfo",
    "ConnectionClosedError",
    "Forwarded",
    "HandshakeError",
    "HboneClient",
    "HboneConnection",
    "HboneError",
    "HboneLimits",
    "HboneMetrics",
    "HbonePool",
    "HboneServer",
    "HeaderError",
    "PoolKey",
    "TraceParent",
    "Tunnel",
    "TunnelRefused",
    "TunnelRequest",
    "TunnelReset",
    "TunnelStats",
    "TunnelWriter",
    "any_authority",
    "authority_matches_local_address",
    "dial_tcp",
    "relay",
    "workload_baggage",
]

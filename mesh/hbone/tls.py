"""TLS for HBONE: contexts as ztunnel configures rustls, and the identity checks after the handshake.

* TLS 1.3 only, AES-GCM suites only, ALPN ``h2``, no session tickets (resumption would let a
  connection skip the client-certificate check), client certificate required.
* OpenSSL verifies the chain against the trust bundle's roots; it knows nothing of SPIFFE, so after the
  handshake the peer leaf is re-verified with ``mesh.identity`` and its URI SAN checked: on the server,
  against the trust domain (who exactly connected is authorization's business); on the client, against
  the identities the destination is expected to have.
* Python 3.11 has no API for TLS 1.3 ciphersuites. :func:`restrict_tls13_suites` sets them through
  OpenSSL directly when it safely can, so a peer offering only ChaCha20 gets a handshake alert;
  :func:`check_negotiated` re-checks the outcome either way, so the policy holds even without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import ssl
import sys
from asyncio import sslproto
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime

from mesh.hbone.constants import ALPN_H2, TLS13_CIPHERSUITES
from mesh.hbone.errors import HandshakeError
from mesh.identity import (
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCert,
    spiffe_id_from_cert,
    verify_chain,
    verify_peer_chain,
)

log = logging.getLogger("mesh.hbone.tls")

_suites_supported: bool | None = None


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int | None:
    # CPython's PySSLContext starts with PyObject_HEAD followed by ``SSL_CTX *ctx``.
    if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return None
    if not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return None
    return ctypes.c_void_p.from_address(id(context) + 2 * ctypes.sizeof(ctypes.c_void_p)).value


def restrict_tls13_suites(context: ssl.SSLContext, suites: Sequence[str] = TLS13_CIPHERSUITES) -> bool:
    """Limit TLS 1.3 ciphersuites through ``SSL_CTX_set_ciphersuites``; False when that is unavailable."""
    global _suites_supported
    if _suites_supported is False:
        return False
    try:
        import _ssl

        pointer = _ssl_ctx_pointer(context)
        if not pointer:
            _suites_supported = False
            return False
        lib = ctypes.CDLL(_ssl.__file__)
        fn = lib.SSL_CTX_set_ciphersuites
        fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        fn.restype = ctypes.c_int
        if fn(pointer, ":".join(suites).encode("ascii")) != 1:
            _suites_supported = False
            return False
    except (OSError, AttributeError, ImportError) as exc:
        log.debug("TLS 1.3 ciphersuites cannot be restricted here (%s); relying on the post-handshake check", exc)
        _suites_supported = False
        return False
    offered = {c["name"] for c in context.get_ciphers() if c.get("protocol") == "TLSv1.3"}
    _suites_supported = offered == set(suites)
    return _suites_supported


def _base_context(purpose: int, cert: WorkloadCert, bundle: TrustBundle | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols([ALPN_H2])
    cert.load_into(ctx, verify=False)
    roots = bundle if bundle is not None else cert.roots
    ctx.load_verify_locations(cadata=roots.roots_pem().decode("ascii"))
    restrict_tls13_suites(ctx)
    return ctx


def server_context(cert: WorkloadCert, bundle: TrustBundle | None = None) -> ssl.SSLContext:
    """Presents ``cert``; requires a client certificate chaining to ``bundle`` (default: the cert's roots)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, cert, bundle)
    ctx.num_tickets = 0
    return ctx


def client_context(cert: WorkloadCert, bundle: TrustBundle | None = None) -> ssl.SSLContext:
    """Presents ``cert``; the server's SAN is checked by :func:`server_identity` (no hostname, no SNI)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert, bundle)
    ctx.check_hostname = False
    return ctx


class ContextCache:
    """SSL contexts keyed by certificate: loading a key costs file writes, a cert serves many connections."""

    def __init__(self, server_side: bool, size: int = 256) -> None:
        self._server_side = server_side
        self._size = size
        # Values hold the bundle itself, so the id() in the key cannot be reused by another bundle.
        self._items: OrderedDict[tuple[int, str, int], tuple[TrustBundle | None, ssl.SSLContext]] = OrderedDict()

    def get(self, cert: WorkloadCert, bundle: TrustBundle | None = None) -> ssl.SSLContext:
        key = (cert.serial_number, str(cert.identity), id(bundle))
        hit = self._items.get(key)
        if hit is not None and hit[0] is bundle:
            self._items.move_to_end(key)
            return hit[1]
        ctx = server_context(cert, bundle) if self._server_side else client_context(cert, bundle)
        self._items[key] = (bundle, ctx)
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return ctx


def check_negotiated(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    """TLS 1.3, an AES-GCM suite and ALPN ``h2``, or HandshakeError (the connection must be dropped)."""
    version = ssl_object.version()
    if version != "TLSv1.3":
        raise HandshakeError(f"negotiated {version}, only TLSv1.3 is allowed", reason="tls_version")
    cipher = ssl_object.cipher()
    if cipher is None or cipher[0] not in TLS13_CIPHERSUITES:
        raise HandshakeError(f"negotiated cipher {cipher and cipher[0]} is not an AES-GCM suite", reason="cipher")
    alpn = ssl_object.selected_alpn_protocol()
    if alpn != ALPN_H2:
        raise HandshakeError(f"peer did not negotiate ALPN h2 (got {alpn!r})", reason="alpn")


def _leaf(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes:
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise HandshakeError("peer presented no certificate", reason="no_certificate")
    return der


def client_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, bundle: TrustBundle, trust_domain: str,
                    now: datetime | None = None) -> SpiffeId:
    """Server side: the connecting workload's SPIFFE ID, which must be in our trust domain."""
    try:
        return verify_peer_chain([_leaf(ssl_object)], bundle, trust_domain, now)
    except IdentityError as exc:
        raise HandshakeError(f"client certificate refused: {exc}", reason=f"identity_{exc.code}") from exc


def server_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, bundle: TrustBundle,
                    expected: Sequence[SpiffeId | str], now: datetime | None = None) -> SpiffeId:
    """Client side: the server's SPIFFE ID, which must be one of ``expected`` (ztunnel's upstream SANs)."""
    try:
        path = verify_chain([_leaf(ssl_object)], bundle, now)
        identity = spiffe_id_from_cert(path[0])
    except IdentityError as exc:
        raise HandshakeError(f"server certificate refused: {exc}", reason=f"identity_{exc.code}") from exc
    wanted = {str(e) for e in expected}
    if str(identity) not in wanted:
        raise HandshakeError(
            f"server identity {identity} is not one of the expected {sorted(wanted)}", reason="identity_san")
    return identity


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, but a failed handshake sends OpenSSL's alert before the socket closes.

    Stock asyncio drops the alert (it closes without flushing the TLS output), so a client with a bad
    certificate would only see a reset instead of "unknown ca" / "certificate expired".
    """

    def _do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except sslproto.SSLAgainErrors:
            self._process_outgoing()
        except ssl.SSLError as exc:
            with contextlib.suppress(Exception):
                self._process_outgoing()
            self._on_handshake_complete(exc)
        else:
            self._on_handshake_complete(None)


async def start_tls_server(transport: asyncio.Transport, protocol: asyncio.BaseProtocol,
                           context: ssl.SSLContext, handshake_timeout: float) -> asyncio.Transport:
    """``loop.start_tls(server_side=True)`` with alerts delivered; the protocol's ``connection_made`` is
    not called (the caller starts it once it has checked the peer)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    tls = _AlertingSSLProtocol(loop, protocol, context, waiter, server_side=True, server_hostname=None,
                               ssl_handshake_timeout=handshake_timeout, call_connection_made=False)
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    return tls._app_transport

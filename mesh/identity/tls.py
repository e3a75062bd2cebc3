"""``ssl.SSLContext`` set-ups for mutual TLS between mesh components.

Chain and hostname checks: OpenSSL verifies the chain against the roots; it cannot check SPIFFE IDs, so
``check_hostname`` stays off for SPIFFE peers and the caller runs ``verify_peer_chain`` on the peer leaf
(``getpeercert(binary_form=True)``) after the handshake.
"""

from __future__ import annotations

import ssl

from mesh.identity.credentials import Credentials


def mtls_server_context(creds: Credentials, alpn: list[str] | None = None) -> ssl.SSLContext:
    """TLS 1.3 server that requires a client certificate chaining to ``creds.roots``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    creds.load_into(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def mtls_client_context(creds: Credentials, alpn: list[str] | None = None,
                        check_hostname: bool = False) -> ssl.SSLContext:
    """TLS 1.3 client presenting ``creds`` and verifying the server chain against ``creds.roots``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    creds.load_into(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx

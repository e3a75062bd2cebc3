"""The node agent's client for the CA's signing API.

It authenticates with the node certificate (or, against a CA run with ``--auth tokenreview``, with the
node agent's service-account token: ``mesh.ca.kube.TokenCredentials``), checks the CA's serving
certificate against the node's roots
and the CA's DNS name, generates a fresh P-256 key per request (the key never leaves the agent), and
verifies what comes back (chain to our roots, the identity asked for) before handing out a WorkloadCert.

Errors split by what the caller should do: :class:`CAUnavailable` (transport failure, timeout, 5xx: retry
with backoff) and :class:`CADenied` (the CA said no, with its code and reason).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import aiohttp
from cryptography import x509

from mesh.ca.api import BUNDLE_PATH, DEFAULT_SERVER_NAME, SIGN_PATH
from mesh.ca.authority import NodeCredentials
from mesh.identity import (
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCert,
    build_csr,
    generate_private_key,
    verify_peer_chain,
)
from mesh.identity.pem import certs_from_pem

# OpenSSL alert reasons a TLS server sends when it refuses our client certificate, in words.
_TLS_REFUSALS = {
    "CERTIFICATE_EXPIRED": ("node_cert_expired", "the CA refused our node certificate: it has expired"),
    "CERTIFICATE_REQUIRED": ("unauthenticated", "the CA requires a client (node) certificate"),
    "UNKNOWN_CA": ("node_cert_invalid", "the CA does not trust the issuer of our node certificate"),
    "BAD_CERTIFICATE": ("node_cert_invalid", "the CA refused our node certificate"),
    "CERTIFICATE_UNKNOWN": ("node_cert_invalid", "the CA refused our node certificate"),
    "CERTIFICATE_VERIFY_FAILED": ("ca_cert_invalid", "the CA's own certificate does not verify against our roots"),
}


class CAClientError(Exception):
    """A certificate could not be obtained; ``code`` is the CA's (or the client's) reason code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class CAUnavailable(CAClientError):
    """The CA could not be reached or failed; worth retrying later."""


class CADenied(CAClientError):
    """The CA answered and refused (HTTP 4xx, or our node certificate was refused in the TLS handshake)."""


def _explain_tls(exc: BaseException) -> CAClientError | None:
    """Turn an SSL error anywhere in ``exc``'s cause chain into a sentence, if it is a certificate refusal."""
    current: BaseException | None = exc
    visited: set[int] = set()
    while current is not None and id(current) not in visited:
        visited.add(id(current))
        text = f"{getattr(current, 'reason', '') or ''} {current}".upper()
        for marker, (code, message) in _TLS_REFUSALS.items():
            if marker in text:
                return CADenied(code, message)
        current = current.__cause__ or current.__context__
    return None


@dataclass(frozen=True)
class SignedChain:
    chain: list[x509.Certificate]  # leaf first
    roots: TrustBundle


class ClientCredentials(Protocol):
    """What the client authenticates with: ``NodeCredentials`` (a client certificate) or
    ``TokenCredentials`` (roots only, plus an ``auth_headers()`` method read at every request)."""

    @property
    def roots(self) -> TrustBundle: ...

    def load_into(self, context: ssl.SSLContext, verify: bool = True) -> ssl.SSLContext: ...


class CAClient:
    """One per agent; reuses one HTTPS connection pool. Close with ``aclose`` (or ``async with``)."""

    def __init__(
        self,
        url: str,
        credentials: NodeCredentials | ClientCredentials,
        *,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = 10.0,
        ttl: timedelta | None = None,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError(f"CA url {url!r} must start with https://")
        self.url = url.rstrip("/")
        self.credentials = credentials
        self.server_name = server_name
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.ttl = ttl
        self._ssl = self._ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = True  # the CA's serving cert carries DNS name `server_name`; workload certs never do
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.credentials.load_into(ctx)
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=100), timeout=self.timeout
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> CAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        session = self._get_session()
        auth_headers = getattr(self.credentials, "auth_headers", None)
        headers = auth_headers() if auth_headers is not None else None  # a token, re-read for every request
        try:
            async with session.request(method, self.url + path, json=payload, headers=headers,
                                       server_hostname=self.server_name) as resp:
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
                if resp.status == 200 and isinstance(body, dict):
                    return body
                code = body.get("error", "http_error") if isinstance(body, dict) else "http_error"
                message = body.get("message", "") if isinstance(body, dict) else ""
                message = f"CA answered {resp.status}: {message or resp.reason} ({code})"
                if resp.status >= 500 or resp.status == 429:
                    raise CAUnavailable(code, message, resp.status)
                raise CADenied(code, message, resp.status)
        except CAClientError:
            raise
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            explained = _explain_tls(exc)
            if explained is not None:
                raise explained from exc
            raise CAUnavailable("unreachable", f"CA at {self.url} unreachable: {exc or type(exc).__name__}") from exc

    async def sign_csr(self, csr_pem: bytes, ttl: timedelta | None = None) -> SignedChain:
        """Send a CSR; return the chain (verified against our roots) and the bundle the CA sent."""
        payload: dict[str, object] = {"csr": csr_pem.decode("ascii")}
        ttl = ttl or self.ttl
        if ttl is not None:
            payload["ttlSeconds"] = max(1, int(ttl.total_seconds()))
        body = await self._request("POST", SIGN_PATH, payload)
        try:
            chain = [c for pem in body["certChain"] for c in certs_from_pem(pem, "certChain")]
            ca_roots = TrustBundle.from_pem("".join(body["trustBundle"]))
        except (KeyError, TypeError, IdentityError) as exc:
            raise CAUnavailable("bad_response", f"CA response is malformed: {exc}") from exc
        return SignedChain(chain=chain, roots=ca_roots)

    async def fetch(self, identity: SpiffeId, ttl: timedelta | None = None) -> WorkloadCert:
        """A new key and certificate for ``identity``; the chain must verify against our own roots."""
        key = generate_private_key()
        signed = await self.sign_csr(build_csr(identity, key), ttl)
        ours = self.credentials.roots
        try:
            got = verify_peer_chain(signed.chain, ours, identity.trust_domain)
        except IdentityError as exc:
            raise CAUnavailable("bad_response", f"certificate from the CA does not verify: {exc}") from exc
        if got != identity:
            raise CAUnavailable("bad_response", f"CA returned a certificate for {got}, asked for {identity}")
        bundle = ours.merge(signed.roots).with_intermediates(signed.chain[1:])
        return WorkloadCert(key=key, chain=signed.chain, roots=bundle, identity=identity)

    async def trust_bundle(self) -> TrustBundle:
        body = await self._request("GET", BUNDLE_PATH)
        try:
            return TrustBundle.from_pem("".join(body["roots"]), "".join(body.get("intermediates", [])) or None)
        except (KeyError, TypeError, IdentityError) as exc:
            raise CAUnavailable("bad_response", f"CA trust bundle is malformed: {exc}") from exc

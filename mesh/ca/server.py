"""The CA's HTTPS signing service (aiohttp), mutual TLS only.

Who may ask: a client certificate issued by this CA to a node (``nodemesh ca issue-node``), checked twice:
by OpenSSL during the handshake (chain to the root, validity), and again per request in Python (so a node
certificate that expires during a kept-alive connection stops working, and a workload certificate can
never pass as a node). What it may get: a certificate for an identity that has a pod on that node, per the
placement source, which is read at every request (cheap: re-parsed only when changed).

Every refusal is logged with the node and the reason and counted in
``nodemesh_ca_certificates_denied_total{reason}``; nothing is signed before all checks passed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from mesh.ca.api import (
    BUNDLE_PATH,
    DEFAULT_SERVER_NAME,
    HEALTH_PATH,
    MAX_BODY_BYTES,
    SIGN_PATH,
    STATUS_BY_CODE,
    SignRequest,
    describe_validation_error,
)
from mesh.ca.authority import DEFAULT_WORKLOAD_TTL, CertificateAuthority, check_ttl
from mesh.ca.metrics import CAMetrics
from mesh.ca.nodeid import parse_node_uri
from mesh.ca.placement import PlacementError, PlacementSource
from mesh.identity import IdentityError, SpiffeId, mtls_server_context, uri_sans, verify_chain
from mesh.identity.credentials import Credentials

log = logging.getLogger("nodemesh.ca")

SERVING_CERT_TTL = timedelta(days=7)
_X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's flag; the ssl module has no name for it


class Refusal(Exception):
    """A request the CA will not serve; ``code`` maps to an HTTP status through ``STATUS_BY_CODE``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WorkloadPrincipal:
    """An authenticator's answer for a workload asking for itself (not a node agent): it may obtain exactly
    the identity of its own service account, wherever it runs, as Istio's CA lets a workload do. Waypoints
    in a cluster get their certificate this way."""

    namespace: str
    service_account: str


class NodeAuthenticator(Protocol):
    """Who is asking: returns the node name (or an awaitable of it, for one that asks another service, as
    ``mesh.ca.kube.TokenReviewAuthenticator`` does) or raises Refusal. One with ``client_certificates =
    False`` makes the CA's TLS ask for no client certificate."""

    def authenticate(self, request: web.Request) -> str | WorkloadPrincipal | Awaitable[str | WorkloadPrincipal]: ...


async def _authenticate(authenticator: NodeAuthenticator, request: web.Request) -> str | WorkloadPrincipal:
    result = authenticator.authenticate(request)
    return await result if inspect.isawaitable(result) else result


class NodeCertificateAuthenticator:
    """The node name from the client certificate's ``spiffe://<td>/nodemesh/node/<name>`` URI SAN."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def authenticate(self, request: web.Request) -> str:
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise Refusal("unauthenticated", "no client certificate; present a node certificate from this CA")
        try:
            path = verify_chain([der], self.ca.bundle, purpose=ExtendedKeyUsageOID.CLIENT_AUTH)
        except IdentityError as exc:
            code = "node_cert_expired" if exc.code == "expired" else "node_cert_invalid"
            raise Refusal(code, f"node certificate refused: {exc}") from None
        uris = uri_sans(path[0])
        if len(uris) != 1:
            raise Refusal("not_a_node", "client certificate is not a node certificate (needs one node URI SAN)")
        try:
            return parse_node_uri(uris[0], self.ca.trust_domain)
        except IdentityError:
            raise Refusal("not_a_node", f"client certificate identity {uris[0]} is not a node of this CA") from None


def _pem(cert: object) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")  # type: ignore[attr-defined]


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    """The port actually bound (``asked`` may be 0 for "any free port")."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked


def _error(code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=STATUS_BY_CODE.get(code, 400))


class CAServer:
    """Owns the aiohttp app, its TLS context and its metrics; ``start``/``stop`` for tests and the CLI."""

    def __init__(
        self,
        ca: CertificateAuthority,
        placement: PlacementSource,
        *,
        ttl: timedelta | float = DEFAULT_WORKLOAD_TTL,
        registry: CollectorRegistry | None = None,
        server_names: Sequence[str] = (DEFAULT_SERVER_NAME,),
        authenticator: NodeAuthenticator | None = None,
    ) -> None:
        self.ca = ca
        self.placement = placement
        self.ttl = check_ttl(ttl, "--ttl")
        self.metrics = CAMetrics(registry)
        self.metrics.intermediate_expiry.set(ca.intermediate_cert.not_valid_after_utc.timestamp())
        self.server_names = list(server_names)
        self.authenticator = authenticator or NodeCertificateAuthenticator(ca)
        self._serving: Credentials | None = None
        self._ssl: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self.port: int | None = None

    # ---- TLS ------------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 trusting only this CA's root; the client certificate is checked per request.

        OpenSSL still refuses, during the handshake, a client chain that does not end in our root. Two
        checks move to the HTTP layer so the client gets a clear 401 instead of a reset connection, and the
        refusal is logged and counted: a missing client certificate (``CERT_OPTIONAL``) and validity times
        (``X509_V_FLAG_NO_CHECK_TIME``). ``NodeCertificateAuthenticator`` re-verifies the whole path,
        times included, on every request, so both still fail closed.
        """
        if self._ssl is None:
            self._serving = self.ca.issue_server(self.server_names, SERVING_CERT_TTL)
            ctx = mtls_server_context(self._serving)
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
            if getattr(self.authenticator, "client_certificates", True) is False:
                ctx.verify_mode = ssl.CERT_NONE  # server-auth only: the agent authenticates with a token
            self._ssl = ctx
        return self._ssl

    async def _refresh_serving_cert(self) -> None:
        """Re-issue the serving certificate at half-life; new handshakes pick it up, old ones keep theirs."""
        while True:
            assert self._serving is not None
            delay = (self._serving.refresh_at - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(delay, 1.0))
            self._serving = self.ca.issue_server(self.server_names, SERVING_CERT_TTL)
            assert self._ssl is not None
            self._serving.load_into(self._ssl, verify=False)

    # ---- HTTP ------------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(SIGN_PATH, self.handle_sign)
        app.router.add_get(BUNDLE_PATH, self.handle_bundle)
        app.router.add_get(HEALTH_PATH, self.handle_health)
        return app

    def _deny(self, code: str, message: str, node: str | None, peer: str | None) -> web.Response:
        self.metrics.denied.labels(reason=code).inc()
        log.warning("denied certificate request from node=%s peer=%s: %s (%s)", node or "-", peer or "-",
                    message, code)
        return _error(code, message)

    async def handle_sign(self, request: web.Request) -> web.Response:
        peer = request.remote
        node: str | None = None
        try:
            principal = await _authenticate(self.authenticator, request)
            node = (principal if isinstance(principal, str)
                    else f"workload:{principal.namespace}/{principal.service_account}")
            try:
                raw = await request.read()
                body = SignRequest.model_validate(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise Refusal("bad_request", f"request body is not JSON: {exc}") from None
            except ValidationError as exc:
                raise Refusal("bad_request", f"invalid request: {describe_validation_error(exc)}") from None
            except web.HTTPRequestEntityTooLarge:
                raise Refusal("bad_request", f"request body larger than {MAX_BODY_BYTES} bytes") from None
            try:
                info = self.ca.check_csr(body.csr)
            except IdentityError as exc:
                raise Refusal(exc.code, str(exc)) from None
            if isinstance(principal, WorkloadPrincipal):
                own = SpiffeId(self.ca.trust_domain, principal.namespace, principal.service_account)
                if info.identity != own:
                    raise Refusal("not_own_identity",
                                  f"service account {principal.namespace}/{principal.service_account} may only "
                                  f"obtain its own identity {own}, not {info.identity}")
            else:
                try:
                    allowed = self.placement.identities_on_node(node)
                except PlacementError as exc:
                    raise Refusal("placement_unavailable",
                                  f"pod placement unknown, refusing to sign: {exc}") from None
                if info.identity not in allowed:
                    raise Refusal(
                        "not_on_node",
                        f"node {node!r} has no pod with identity {info.identity} ({self.placement.describe()})",
                    )
            ttl = self.ttl if body.ttl_seconds is None else min(self.ttl, timedelta(seconds=body.ttl_seconds))
            try:
                chain = self.ca.sign(info.identity, info.public_key, ttl)
            except IdentityError as exc:
                raise Refusal(exc.code, str(exc)) from None
        except Refusal as refusal:
            return self._deny(refusal.code, refusal.message, node, peer)
        self.metrics.issued.labels(node=node).inc()
        leaf = chain[0]
        log.info("issued %s to node=%s serial=%x not_after=%s", info.identity, node, leaf.serial_number,
                 leaf.not_valid_after_utc.isoformat())
        return web.json_response({
            "identity": str(info.identity),
            "certChain": [_pem(c) for c in chain],
            "trustBundle": [_pem(c) for c in self.ca.bundle.roots],
            "notBefore": leaf.not_valid_before_utc.isoformat(),
            "notAfter": leaf.not_valid_after_utc.isoformat(),
        })

    async def handle_bundle(self, request: web.Request) -> web.Response:
        try:
            await _authenticate(self.authenticator, request)
        except Refusal as refusal:
            return self._deny(refusal.code, refusal.message, None, request.remote)
        return web.json_response({
            "trustDomain": self.ca.trust_domain,
            "roots": [_pem(c) for c in self.ca.bundle.roots],
            "intermediates": [_pem(c) for c in self.ca.bundle.intermediates],
        })

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # ---- life cycle ------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context(), reuse_address=True)
        await site.start()
        self.port = _bound_port(self._runner, port)
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_serving_cert())
        log.info("CA for %s serving on %s:%s (placement %s, ttl %ss)", self.ca.trust_domain, host, self.port,
                 self.placement.describe(), int(self.ttl.total_seconds()))
        return self.port

    async def start_metrics(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Plain-HTTP ``/metrics`` for Prometheus (no secrets in it)."""

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host, port, reuse_address=True)
        await site.start()
        return _bound_port(self._metrics_runner, port)

    async def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)
            self._refresh_task = None
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._metrics_runner = None

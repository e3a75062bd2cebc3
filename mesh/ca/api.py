"""The signing API's wire format (JSON over HTTP/1.1, mutual TLS), shared by the server and the client.

``POST /v1/certificates``::

    request   {"csr": "<PEM CERTIFICATE REQUEST>", "ttlSeconds": 86400}        (ttlSeconds optional)
    200       {"identity": "spiffe://...", "certChain": ["<leaf PEM>", "<intermediate PEM>"],
               "trustBundle": ["<root PEM>"], "notBefore": "<RFC 3339>", "notAfter": "<RFC 3339>"}
    4xx/5xx   {"error": "<code>", "message": "<sentence>"}

``GET /v1/trust-bundle`` -> ``{"trustDomain": ..., "roots": [PEM...], "intermediates": [PEM...]}``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SIGN_PATH = "/v1/certificates"
BUNDLE_PATH = "/v1/trust-bundle"
HEALTH_PATH = "/healthz"
MAX_BODY_BYTES = 128 * 1024
DEFAULT_SERVER_NAME = "nodemesh-ca"


class SignRequest(BaseModel):
    """Validated request body; unknown fields are refused so a misspelt ``ttlSeconds`` is not ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    csr: str = Field(min_length=1, max_length=64 * 1024)
    ttl_seconds: int | None = Field(default=None, alias="ttlSeconds", ge=1, le=10 * 365 * 86400, strict=True)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, for the ``message`` of a 400."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# error codes -> HTTP status, so every refusal has a stable code and an expected status
STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "malformed_csr": 400,
    "bad_csr_signature": 400,
    "unsupported_key": 400,
    "no_san": 400,
    "san_count": 400,
    "not_uri_san": 400,
    "bad_spiffe_id": 400,
    "ca_requested": 400,
    "unauthenticated": 401,
    "node_cert_expired": 401,
    "node_cert_invalid": 401,
    "not_a_node": 403,
    "foreign_trust_domain": 403,
    "not_on_node": 403,
    "not_own_identity": 403,
    "placement_unavailable": 503,
    "auth_unavailable": 503,
    "ca_expired": 503,
}

"""Strict SPIFFE IDs of Kubernetes service accounts: ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

Strict on purpose: an identity is compared as a string everywhere (policy, SANs, placement), so anything
that could make two spellings of the same account (case, percent-encoding, dot segments, a trailing slash,
extra segments) is refused at parse time instead of being normalised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.identity.errors import IdentityError

DEFAULT_TRUST_DOMAIN = "cluster.local"
SCHEME = "spiffe://"
MAX_URI_LENGTH = 2048  # the SPIFFE ID specification's limit
MAX_TRUST_DOMAIN_LENGTH = 255

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAMESPACE_RE = re.compile(rf"^{_DNS_LABEL}$")
_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
# SPIFFE allows [a-z0-9._-] in a trust domain; empty labels ("a..b", ".a", "a.") are refused as well.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$")


def validate_trust_domain(value: object, field: str = "trust_domain") -> str:
    """Return ``value`` if it is a valid SPIFFE trust domain name, else raise IdentityError."""
    if not isinstance(value, str):
        raise IdentityError(f"{field} must be a string, got {type(value).__name__}", code="bad_trust_domain")
    if not value:
        raise IdentityError(f"{field} is empty", code="bad_trust_domain")
    if len(value) > MAX_TRUST_DOMAIN_LENGTH:
        raise IdentityError(f"{field} is longer than {MAX_TRUST_DOMAIN_LENGTH} characters", code="bad_trust_domain")
    if not _TRUST_DOMAIN_RE.match(value):
        raise IdentityError(
            f"{field} {value!r} is not a valid trust domain (lowercase letters, digits, '.', '-', '_';"
            " no empty labels, no port)",
            code="bad_trust_domain",
        )
    return value


def validate_namespace(value: object, field: str = "namespace") -> str:
    """A Kubernetes namespace name: a DNS-1123 label."""
    if not isinstance(value, str) or not value:
        raise IdentityError(f"{field} must be a non-empty string", code="bad_spiffe_id")
    if len(value) > 63 or not _NAMESPACE_RE.match(value):
        raise IdentityError(
            f"{field} {value!r} is not a valid namespace (DNS label: lowercase letters, digits, '-', at most 63)",
            code="bad_spiffe_id",
        )
    return value


def validate_service_account(value: object, field: str = "service_account") -> str:
    """A Kubernetes service account name: a DNS-1123 subdomain."""
    if not isinstance(value, str) or not value:
        raise IdentityError(f"{field} must be a non-empty string", code="bad_spiffe_id")
    if len(value) > 253 or not _SUBDOMAIN_RE.match(value):
        raise IdentityError(
            f"{field} {value!r} is not a valid service account name (DNS subdomain: lowercase letters, digits,"
            " '-', '.', at most 253)",
            code="bad_spiffe_id",
        )
    return value


@dataclass(frozen=True, order=True)
class SpiffeId:
    """The identity of a pod's service account; ``str()`` gives the URI used in SANs and policies."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_namespace(self.namespace)
        validate_service_account(self.service_account)

    @classmethod
    def parse(cls, uri: object) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; anything else raises IdentityError saying what is wrong."""
        if isinstance(uri, bytes):
            try:
                uri = uri.decode("ascii")
            except UnicodeDecodeError as exc:
                raise IdentityError("SPIFFE ID is not ASCII", code="bad_spiffe_id") from exc
        if not isinstance(uri, str):
            raise IdentityError(f"SPIFFE ID must be a string, got {type(uri).__name__}", code="bad_spiffe_id")
        if not uri:
            raise IdentityError("SPIFFE ID is empty", code="bad_spiffe_id")
        if len(uri) > MAX_URI_LENGTH:
            raise IdentityError(f"SPIFFE ID is longer than {MAX_URI_LENGTH} bytes", code="bad_spiffe_id")
        if not uri.startswith(SCHEME):
            raise IdentityError(f"SPIFFE ID {uri!r} does not start with {SCHEME!r}", code="bad_spiffe_id")
        rest = uri[len(SCHEME) :]
        for bad, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
            if bad in rest:
                raise IdentityError(f"SPIFFE ID {uri!r} must not contain {what}", code="bad_spiffe_id")
        trust_domain, sep, path = rest.partition("/")
        if not trust_domain:
            raise IdentityError(f"SPIFFE ID {uri!r} has no trust domain", code="bad_spiffe_id")
        try:
            validate_trust_domain(trust_domain)
        except IdentityError as exc:
            raise IdentityError(f"SPIFFE ID {uri!r}: {exc}", code="bad_spiffe_id") from exc
        if not sep or not path:
            raise IdentityError(f"SPIFFE ID {uri!r} has no path (expected /ns/<ns>/sa/<sa>)", code="bad_spiffe_id")
        segments = path.split("/")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise IdentityError(
                f"SPIFFE ID {uri!r} has path /{path}; expected exactly /ns/<namespace>/sa/<service-account>",
                code="bad_spiffe_id",
            )
        try:
            return cls(trust_domain=trust_domain, namespace=segments[1], service_account=segments[3])
        except IdentityError as exc:
            raise IdentityError(f"SPIFFE ID {uri!r}: {exc}", code="bad_spiffe_id") from exc

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    def in_trust_domain(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

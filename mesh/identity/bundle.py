"""The trust bundle: the roots a peer's chain must end in, plus intermediates known to chain to them.

The intermediates are carried because Python 3.11's ``ssl`` hands the application only the peer's leaf
(``getpeercert(binary_form=True)``): to re-check the path in Python, the issuing intermediate has to come
from somewhere the application already trusts, and that is the bundle. They are *not* trust anchors:
verification still has to end in one of ``roots``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.identity.errors import IdentityError
from mesh.identity.pem import certs_from_pem, certs_to_pem


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _dedupe(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return tuple(out)


@dataclass(frozen=True)
class TrustBundle:
    """Immutable; combine with :meth:`merge` / :meth:`with_intermediates`."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = field(default=())

    def __post_init__(self) -> None:
        roots = _dedupe(self.roots)
        intermediates = _dedupe(self.intermediates)
        if not roots:
            raise IdentityError("trust bundle has no root certificate", code="bad_bundle")
        for what, certs in (("root", roots), ("intermediate", intermediates)):
            for cert in certs:
                if not isinstance(cert, x509.Certificate):
                    raise IdentityError(f"trust bundle {what} is not a certificate: {type(cert).__name__}",
                                        code="bad_bundle")
                if not _is_ca(cert):
                    raise IdentityError(
                        f"trust bundle {what} {cert.subject.rfc4514_string()!r} is not a CA certificate",
                        code="bad_bundle",
                    )
        object.__setattr__(self, "roots", roots)
        object.__setattr__(self, "intermediates", intermediates)

    @classmethod
    def from_pem(cls, roots_pem: bytes | str, intermediates_pem: bytes | str | None = None) -> TrustBundle:
        roots = certs_from_pem(roots_pem, "trust bundle roots")
        intermediates = certs_from_pem(intermediates_pem, "trust bundle intermediates") if intermediates_pem else []
        return cls(tuple(roots), tuple(intermediates))

    def roots_pem(self) -> bytes:
        """The anchors alone: what ``ssl.SSLContext.load_verify_locations(cadata=...)`` should be given."""
        return certs_to_pem(self.roots)

    def intermediates_pem(self) -> bytes:
        return certs_to_pem(self.intermediates)

    def with_intermediates(self, certs: Iterable[x509.Certificate]) -> TrustBundle:
        """Learn more intermediates (e.g. from the agent's own chain); anchors are unchanged."""
        return TrustBundle(self.roots, self.intermediates + tuple(c for c in certs if _is_ca(c)))

    def merge(self, other: TrustBundle) -> TrustBundle:
        """Trust both bundles' roots (e.g. during a root rotation, or several trust domains)."""
        return TrustBundle(self.roots + other.roots, self.intermediates + other.intermediates)

    def __len__(self) -> int:
        return len(self.roots)

"""Reading and writing certificates as PEM/DER, with errors that say which input was bad."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.identity.errors import IdentityError

_PEM_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


def certs_from_pem(data: bytes | str, what: str = "certificates") -> list[x509.Certificate]:
    """Every certificate in a PEM blob, in order; an empty or unreadable blob is an error."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    if _PEM_CERT_MARKER not in raw:
        raise IdentityError(f"{what}: no PEM certificate found", code="bad_certificate")
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise IdentityError(f"{what}: unreadable PEM certificate: {exc}", code="bad_certificate") from exc


def cert_from_der(data: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{what}: unreadable DER certificate: {exc}", code="bad_certificate") from exc


def as_certificates(chain: Sequence[x509.Certificate | bytes | bytearray | memoryview | str],
                    what: str = "certificate chain") -> list[x509.Certificate]:
    """Accept certificate objects, DER bytes (what ``getpeercert(binary_form=True)`` gives) or PEM text."""
    if isinstance(chain, bytes | bytearray | memoryview | str):
        raise IdentityError(f"{what} must be a list of certificates, not a single blob", code="bad_certificate")
    out: list[x509.Certificate] = []
    for i, item in enumerate(chain):
        if isinstance(item, x509.Certificate):
            out.append(item)
        elif isinstance(item, str):
            out.extend(certs_from_pem(item, f"{what}[{i}]"))
        elif isinstance(item, bytes | bytearray | memoryview):
            blob = bytes(item)
            if blob.lstrip().startswith(b"-----BEGIN"):
                out.extend(certs_from_pem(blob, f"{what}[{i}]"))
            else:
                out.append(cert_from_der(blob, f"{what}[{i}]"))
        elif item is None:
            raise IdentityError(f"{what}[{i}] is missing (no certificate)", code="no_certificate")
        else:
            raise IdentityError(f"{what}[{i}] has unsupported type {type(item).__name__}", code="bad_certificate")
    return out


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

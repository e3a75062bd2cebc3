"""Path validation of a peer's certificate chain against a trust bundle, and SPIFFE ID extraction.

Why a second verification next to OpenSSL's: ``ssl`` checks that the chain ends in a trusted root but knows
nothing of SPIFFE, and on Python 3.11 exposes only the peer's leaf. So :func:`verify_peer_chain` re-does the
path check itself from whatever it is given:

* ``chain[0]`` is the leaf; ``chain[1:]`` (possibly empty) are intermediates the peer sent;
* issuers are looked up among those *and* the bundle's intermediates, so the leaf alone works when the
  bundle carries the intermediate that signed it (it always does for this project's CA);
* the path must end in one of the bundle's roots, every link's signature must verify, every certificate on
  it must be valid at ``now``, issuers must be CAs allowed to sign certificates (basic constraints, key
  usage, path length), and unknown critical extensions are refused;
* then the leaf must carry exactly one URI SAN, a strict SPIFFE ID, in the expected trust domain.

Each failure raises :class:`IdentityError` with a sentence and a ``code`` (``expired``, ``not_yet_valid``,
``unknown_issuer``, ``bad_signature``, ``no_uri_san``, ``trust_domain``...).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh.identity.bundle import TrustBundle
from mesh.identity.errors import IdentityError
from mesh.identity.pem import as_certificates
from mesh.identity.spiffe import SpiffeId, validate_trust_domain

MAX_PATH_DEPTH = 8  # leaf + intermediates + root; far more than any mesh CA needs

_PURPOSES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}

CertLike = x509.Certificate | bytes | bytearray | memoryview | str


def _name(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    if subject:
        return repr(subject)
    uris = uri_sans(cert)
    return repr(uris[0]) if uris else f"serial {cert.serial_number:x}"


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def aware(now: datetime | None) -> datetime:
    """Naive datetimes are taken as UTC (certificates speak UTC)."""
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_from_cert(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID a workload leaf carries; zero or several URI SANs are refused."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError(f"certificate {_name(cert)} has no subjectAltName, so no SPIFFE ID",
                            code="no_uri_san") from exc
    except ValueError as exc:
        raise IdentityError(f"certificate has an unreadable subjectAltName: {exc}", code="bad_certificate") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise IdentityError(f"certificate {_name(cert)} has no URI SAN, so no SPIFFE ID", code="no_uri_san")
    if len(uris) > 1:
        raise IdentityError(f"certificate has {len(uris)} URI SANs ({', '.join(uris)}); exactly one is allowed",
                            code="multiple_uri_sans")
    return SpiffeId.parse(uris[0])


def _extension(cert: x509.Certificate, cls: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise IdentityError(f"certificate {_name(cert)} has an unreadable extension: {exc}",
                            code="bad_certificate") from exc


def _check_critical_extensions(cert: x509.Certificate) -> None:
    try:
        extensions = list(cert.extensions)
    except ValueError as exc:
        raise IdentityError(f"certificate {_name(cert)} has unreadable extensions: {exc}",
                            code="bad_certificate") from exc
    for ext in extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise IdentityError(f"certificate {_name(cert)} has an unknown critical extension {ext.oid.dotted_string}",
                                code="bad_certificate")


def _check_time(cert: x509.Certificate, now: datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise IdentityError(
            f"{role} certificate {_name(cert)} is not yet valid (valid from {cert.not_valid_before_utc.isoformat()},"
            f" now {now.isoformat()})",
            code="not_yet_valid",
        )
    if now > cert.not_valid_after_utc:
        raise IdentityError(
            f"{role} certificate {_name(cert)} expired at {cert.not_valid_after_utc.isoformat()}"
            f" (now {now.isoformat()})",
            code="expired",
        )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _can_issue(issuer: x509.Certificate, below: int) -> str | None:
    """Why ``issuer`` may not sign a path with ``below`` CA certificates under it, or None if it may."""
    bc = _extension(issuer, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        return f"issuer {_name(issuer)} is not a CA certificate"
    if bc.path_length is not None and below > bc.path_length:
        return f"issuer {_name(issuer)} allows path length {bc.path_length}, the chain needs {below}"
    ku = _extension(issuer, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
        return f"issuer {_name(issuer)} is not allowed to sign certificates (key usage)"
    return None


def _build_path(leaf: x509.Certificate, pool: list[x509.Certificate], roots: Sequence[x509.Certificate],
                at: datetime) -> list[x509.Certificate]:
    """Depth-first search for leaf -> ... -> root; the returned path includes the root.

    Issuers are tried peer-sent first, then the bundle's; an issuer that is expired, not a CA or whose
    signature does not match is skipped, so a re-issued intermediate with the same name is still found.
    """
    root_ders = {_der(r) for r in roots}
    problems: list[IdentityError] = []

    def search(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = path[-1]
        cas_below = len(path) - 1  # CA certificates already on the path under the next issuer
        if len(path) > MAX_PATH_DEPTH:
            problems.append(IdentityError(f"chain longer than {MAX_PATH_DEPTH}", code="bad_chain"))
            return None
        used = {_der(c) for c in path}
        for candidates in (roots, pool):
            for issuer in candidates:
                if issuer.subject != current.issuer or _der(issuer) in used:
                    continue
                is_root = _der(issuer) in root_ders
                if not _signed_by(current, issuer):
                    problems.append(IdentityError(
                        f"{_name(current)} names issuer {current.issuer.rfc4514_string()!r} but its signature does"
                        " not verify with that issuer's key (wrong issuer)", code="bad_signature"))
                    continue
                why_not = _can_issue(issuer, cas_below)
                if why_not:
                    problems.append(IdentityError(why_not, code="bad_chain"))
                    continue
                try:
                    _check_critical_extensions(issuer)
                    _check_time(issuer, at, "root" if is_root else "intermediate")
                except IdentityError as exc:
                    problems.append(exc)
                    continue
                if is_root:
                    return [*path, issuer]
                found = search([*path, issuer])
                if found:
                    return found
        return None

    found = search([leaf])
    if found:
        return found
    if problems:
        # A candidate that signed correctly but was unusable (expired, not a CA) explains more than a
        # same-named certificate with another key.
        best = min(problems, key=lambda e: e.code == "bad_signature")
        raise IdentityError(f"certificate chain of {_name(leaf)} does not verify: {best}", code=best.code)
    raise IdentityError(
        f"certificate {_name(leaf)} was issued by {leaf.issuer.rfc4514_string()!r}, which does not chain to any"
        " root of the trust bundle (unknown issuer)",
        code="unknown_issuer",
    )


def verify_chain(chain: Sequence[CertLike], bundle: TrustBundle, now: datetime | None = None,
                 purpose: x509.ObjectIdentifier | None = None) -> list[x509.Certificate]:
    """Path-validate ``chain`` (leaf first) against ``bundle`` at ``now``; return the path, leaf to root.

    No SAN is looked at: this is the part shared by workload identities and the CA's node certificates.
    ``purpose``, if given, is an extended key usage the leaf must allow (when it restricts usage at all).
    """
    certs = as_certificates(chain)
    if not certs:
        raise IdentityError("peer presented no certificate", code="no_certificate")
    if not isinstance(bundle, TrustBundle):
        raise IdentityError(f"bundle must be a TrustBundle, got {type(bundle).__name__}", code="bad_bundle")
    at = aware(now)
    leaf = certs[0]
    _check_critical_extensions(leaf)
    bc = _extension(leaf, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise IdentityError(f"certificate {_name(leaf)} is a CA certificate, not a workload leaf", code="bad_leaf")
    ku = _extension(leaf, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not ku.digital_signature:
        raise IdentityError(f"certificate {_name(leaf)} may not be used for signatures (key usage)", code="bad_leaf")
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if purpose is not None and isinstance(eku, x509.ExtendedKeyUsage) and purpose not in eku \
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        usage = _PURPOSES.get(purpose, purpose.dotted_string)
        raise IdentityError(f"certificate {_name(leaf)} is not allowed for {usage}", code="bad_leaf")
    pool = list(certs[1:]) + list(bundle.intermediates)
    path = _build_path(leaf, pool, bundle.roots, at)
    _check_time(leaf, at, "peer")
    return path


def verify_peer_chain(chain: Sequence[CertLike], bundle: TrustBundle, trust_domain: str,
                      now: datetime | None = None) -> SpiffeId:
    """Verify a peer's chain (the leaf alone is enough, see the module doc) and return its SPIFFE ID.

    ``chain`` items may be ``x509.Certificate`` objects, DER bytes or PEM text. Raises IdentityError with
    a clear reason: wrong trust domain, expired, not yet valid, unknown/wrong issuer, no URI SAN, ...
    """
    validate_trust_domain(trust_domain, "expected trust domain")
    path = verify_chain(chain, bundle, now)
    identity = spiffe_id_from_cert(path[0])
    if identity.trust_domain != trust_domain:
        raise IdentityError(
            f"peer identity {identity} is in trust domain {identity.trust_domain!r}, expected {trust_domain!r}",
            code="trust_domain",
        )
    return identity

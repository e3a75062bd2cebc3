"""Certificate signing requests for workload identities: build them, and check them strictly at the CA.

A CSR is what an agent sends to get a certificate, so it is untrusted input: the check accepts exactly one
shape (a PEM CSR with a valid self-signature, an acceptable key, and a subjectAltName holding exactly one
name, a URI that is a strict SPIFFE ID in the CA's trust domain) and says precisely what is wrong otherwise.
The subject and any other requested extension are ignored: the CA decides what goes into the certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mesh.identity.errors import IdentityError
from mesh.identity.keys import PrivateKey, PublicKey, check_public_key
from mesh.identity.spiffe import SpiffeId

MAX_CSR_BYTES = 64 * 1024


def build_csr(identity: SpiffeId, key: PrivateKey) -> bytes:
    """A PEM CSR carrying ``identity`` as its only SAN (a URI), signed with ``key`` (SHA-256)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CsrInfo:
    """What a checked CSR asks for: an identity, for a public key."""

    identity: SpiffeId
    public_key: PublicKey


def check_csr(csr_pem: bytes | str, trust_domain: str) -> CsrInfo:
    """Parse and validate a workload CSR; raise IdentityError naming the problem.

    Codes: ``malformed_csr``, ``bad_csr_signature``, ``unsupported_key``, ``no_san``, ``san_count``,
    ``not_uri_san``, ``bad_spiffe_id``, ``foreign_trust_domain``, ``ca_requested``.
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8", "replace")
    if not isinstance(csr_pem, bytes):
        raise IdentityError(f"CSR must be PEM text, got {type(csr_pem).__name__}", code="malformed_csr")
    if not csr_pem.strip():
        raise IdentityError("CSR is empty", code="malformed_csr")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise IdentityError(f"CSR is larger than {MAX_CSR_BYTES} bytes", code="malformed_csr")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in csr_pem:
        raise IdentityError("CSR is not a PEM 'CERTIFICATE REQUEST' block", code="malformed_csr")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError(f"CSR cannot be parsed: {exc}", code="malformed_csr") from exc
    try:
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
        extensions = csr.extensions
    except Exception as exc:  # the parser is lazy: odd encodings surface here
        raise IdentityError(f"CSR cannot be parsed: {exc}", code="malformed_csr") from exc
    check_public_key(public_key, "CSR public key")
    if not signature_ok:
        raise IdentityError("CSR signature does not verify with its own public key", code="bad_csr_signature")
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise IdentityError("CSR asks for a CA certificate; only workload leaves are issued", code="ca_requested")
    except x509.ExtensionNotFound:
        pass
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("CSR has no subjectAltName; it must carry the SPIFFE ID as its only URI SAN",
                            code="no_san") from exc
    names = list(san)
    if len(names) != 1:
        listed = ", ".join(str(getattr(n, "value", n)) for n in names) or "none"
        raise IdentityError(f"CSR has {len(names)} SANs ({listed}); exactly one, the SPIFFE ID URI, is allowed",
                            code="san_count")
    if not isinstance(names[0], x509.UniformResourceIdentifier):
        raise IdentityError(f"CSR SAN is a {type(names[0]).__name__}, not a URI (SPIFFE ID)", code="not_uri_san")
    identity = SpiffeId.parse(names[0].value)
    if identity.trust_domain != trust_domain:
        raise IdentityError(
            f"CSR asks for {identity}, which is in trust domain {identity.trust_domain!r}; this CA signs only"
            f" {trust_domain!r}",
            code="foreign_trust_domain",
        )
    return CsrInfo(identity=identity, public_key=public_key)

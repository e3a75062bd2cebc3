"""The certificate authority: an offline-able root, and an intermediate that signs everything.

On disk (``CertificateAuthority.init_dir``)::

    ca.json            {"trustDomain": ...}
    root-cert.pem      the trust anchor handed to every agent
    root-key.pem       0600; needed only to (re)issue the intermediate: move it offline after init
    ca-cert.pem        the intermediate, signed by the root
    ca-key.pem         0600; the signing key ``ca serve`` uses

Leaves get an empty subject and a critical SAN (RFC 5280 requires critical when the subject is empty),
exactly one URI, both serverAuth and clientAuth, and never outlive the intermediate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.ca.nodeid import node_uri, parse_node_uri, validate_node_name
from mesh.identity import (
    Credentials,
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCert,
    check_csr,
    generate_private_key,
    load_private_key,
    private_key_pem,
)
from mesh.identity.csr import CsrInfo
from mesh.identity.files import check_private_file, write_file
from mesh.identity.keys import PrivateKey, PublicKey, public_key_der
from mesh.identity.pem import certs_from_pem, certs_to_pem
from mesh.identity.spiffe import validate_trust_domain
from mesh.identity.verify import aware, uri_sans

DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
DEFAULT_NODE_TTL = timedelta(days=30)
ROOT_TTL = timedelta(days=3650)
INTERMEDIATE_TTL = timedelta(days=365)
MAX_BACKDATE = timedelta(minutes=1)

META_FILE = "ca.json"
ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"


class CAError(IdentityError):
    """The CA cannot do what was asked (bad directory, bad TTL, identity outside its trust domain...)."""


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _validity(now: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
    """Whole seconds (X.509 has no finer); backdated a little for clock skew, the lifetime is exactly ``ttl``."""
    not_before = (now - min(MAX_BACKDATE, ttl / 10)).replace(microsecond=0)
    return not_before, not_before + ttl


def check_ttl(ttl: timedelta | float | int, field: str = "ttl") -> timedelta:
    if isinstance(ttl, bool) or not isinstance(ttl, timedelta | int | float):
        raise CAError(f"{field} must be a duration in seconds, got {type(ttl).__name__}", code="bad_ttl")
    value = ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
    if value < timedelta(seconds=1):
        raise CAError(f"{field} must be at least 1 second, got {value.total_seconds()}", code="bad_ttl")
    return value


@dataclass(frozen=True, eq=False)
class NodeCredentials(Credentials):
    """A node agent's client certificate for talking to the CA."""

    node: str = ""
    trust_domain: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        uris = uri_sans(self.leaf)
        if len(uris) != 1:
            raise CAError("node certificate must carry exactly one URI SAN", code="not_a_node")
        td = uris[0].removeprefix("spiffe://").split("/", 1)[0]
        node = parse_node_uri(uris[0], td)
        if self.node and self.node != node:
            raise CAError(f"node certificate is for node {node!r}, not {self.node!r}", code="not_a_node")
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "trust_domain", td)

    @classmethod
    def read_files(cls, directory: str | Path) -> NodeCredentials:
        """Load ``cert-chain.pem``, ``key.pem`` and ``root-cert.pem`` written by ``nodemesh ca issue-node``."""
        key, chain, roots = cls._read(directory)
        return cls(key=key, chain=chain, roots=roots)

    def __repr__(self) -> str:
        return f"NodeCredentials({self.node!r}, not_after={self.not_after.isoformat()})"


class CertificateAuthority:
    """Signs workload and node certificates with the intermediate; all in memory once loaded."""

    def __init__(self, trust_domain: str, root_cert: x509.Certificate, intermediate_cert: x509.Certificate,
                 intermediate_key: PrivateKey, root_key: PrivateKey | None = None) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        if public_key_der(intermediate_key) != public_key_der(intermediate_cert.public_key()):
            raise CAError("intermediate key does not match the intermediate certificate", code="key_mismatch")
        try:
            intermediate_cert.verify_directly_issued_by(root_cert)
        except Exception as exc:
            raise CAError("intermediate certificate is not signed by the root", code="bad_chain") from exc
        self.root_cert = root_cert
        self.root_key = root_key
        self.intermediate_cert = intermediate_cert
        self._key = intermediate_key
        self.bundle = TrustBundle((root_cert,), (intermediate_cert,))

    def __repr__(self) -> str:
        expires = self.intermediate_cert.not_valid_after_utc.isoformat()
        return f"CertificateAuthority({self.trust_domain!r}, intermediate_expires={expires})"

    # ---- creation and storage -------------------------------------------------------------------------

    @classmethod
    def create(cls, trust_domain: str = "cluster.local", now: datetime | None = None,
               root_ttl: timedelta = ROOT_TTL, intermediate_ttl: timedelta = INTERMEDIATE_TTL) -> CertificateAuthority:
        """A fresh root and intermediate, in memory (tests and tools; ``init_dir`` for a real CA)."""
        validate_trust_domain(trust_domain)
        at = aware(now)
        root_key = generate_private_key()
        root_name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root CA ({trust_domain})"),
        ])
        nb, na = _validity(at, root_ttl)
        root = (
            x509.CertificateBuilder()
            .subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(nb).not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, _hash_for(root_key))
        )
        key, cert = _new_intermediate(trust_domain, root, root_key, at, intermediate_ttl)
        return cls(trust_domain, root, cert, key, root_key)

    @classmethod
    def init_dir(cls, path: str | Path, trust_domain: str = "cluster.local") -> CertificateAuthority:
        """Create a CA in ``path`` (made 0700); refuses to overwrite an existing CA's keys."""
        d = Path(path)
        validate_trust_domain(trust_domain, "trust domain")
        existing = [n for n in (META_FILE, ROOT_KEY, ROOT_CERT, CA_KEY, CA_CERT) if (d / n).exists()]
        if existing:
            raise CAError(f"{d} already holds a CA ({', '.join(existing)}); refusing to overwrite it",
                          code="ca_exists")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        ca = cls.create(trust_domain)
        assert ca.root_key is not None
        write_file(d / ROOT_KEY, private_key_pem(ca.root_key), 0o600)
        write_file(d / CA_KEY, private_key_pem(ca._key), 0o600)
        write_file(d / ROOT_CERT, certs_to_pem([ca.root_cert]), 0o644)
        write_file(d / CA_CERT, certs_to_pem([ca.intermediate_cert]), 0o644)
        write_file(d / META_FILE, json.dumps({"trustDomain": trust_domain}, indent=2).encode() + b"\n", 0o644)
        return ca

    @classmethod
    def load(cls, path: str | Path) -> CertificateAuthority:
        """Load a CA directory; ``root-key.pem`` may be absent (kept offline). Keys must be 0600."""
        d = Path(path)
        if not d.is_dir():
            raise CAError(f"CA directory {d} does not exist (create it with 'nodemesh ca init')", code="no_ca")
        try:
            meta = json.loads((d / META_FILE).read_text())
            trust_domain = meta["trustDomain"]
            check_private_file(d / CA_KEY)
            key = load_private_key((d / CA_KEY).read_bytes())
            cert = certs_from_pem((d / CA_CERT).read_bytes(), CA_CERT)[0]
            root = certs_from_pem((d / ROOT_CERT).read_bytes(), ROOT_CERT)[0]
            root_key = None
            if (d / ROOT_KEY).exists():
                check_private_file(d / ROOT_KEY)
                root_key = load_private_key((d / ROOT_KEY).read_bytes())
        except FileNotFoundError as exc:
            raise CAError(f"CA directory {d} is incomplete: {Path(exc.filename).name} is missing",
                          code="no_ca") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CAError(f"{META_FILE} in {d} is not valid: {exc}", code="no_ca") from exc
        return cls(trust_domain, root, cert, key, root_key)

    # ---- signing -------------------------------------------------------------------------------------

    def check_csr(self, csr_pem: bytes | str) -> CsrInfo:
        """Strict CSR validation for this trust domain (see ``mesh.identity.csr.check_csr``)."""
        return check_csr(csr_pem, self.trust_domain)

    def sign(self, identity: SpiffeId, public_key: PublicKey, ttl: timedelta | float = DEFAULT_WORKLOAD_TTL,
             now: datetime | None = None) -> list[x509.Certificate]:
        """Certify ``public_key`` as ``identity``; returns ``[leaf, intermediate]``."""
        if not isinstance(identity, SpiffeId):
            raise CAError(f"identity must be a SpiffeId, got {type(identity).__name__}", code="bad_identity")
        if identity.trust_domain != self.trust_domain:
            raise CAError(f"{identity} is outside this CA's trust domain {self.trust_domain!r}",
                          code="foreign_trust_domain")
        leaf = self._leaf([x509.UniformResourceIdentifier(identity.uri)], public_key, check_ttl(ttl), now,
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        return [leaf, self.intermediate_cert]

    def sign_csr(self, csr_pem: bytes | str, ttl: timedelta | float = DEFAULT_WORKLOAD_TTL,
                 now: datetime | None = None) -> list[x509.Certificate]:
        """Validate the CSR strictly, then sign; returns ``[leaf, intermediate]`` (leaf first, no root)."""
        info = self.check_csr(csr_pem)
        return self.sign(info.identity, info.public_key, ttl, now)

    def issue_workload(self, identity: SpiffeId, ttl: timedelta | float = DEFAULT_WORKLOAD_TTL,
                       now: datetime | None = None) -> WorkloadCert:
        """Key and certificate for ``identity`` without a CSR (tests and tools)."""
        key = generate_private_key()
        chain = self.sign(identity, key.public_key(), ttl, now)
        return WorkloadCert(key=key, chain=chain, roots=self.bundle, identity=identity)

    def issue_node(self, node: str, ttl: timedelta | float = DEFAULT_NODE_TTL,
                   now: datetime | None = None) -> NodeCredentials:
        """A client certificate that authenticates node agent ``node`` to the CA's signing API."""
        validate_node_name(node)
        key = generate_private_key()
        leaf = self._leaf([x509.UniformResourceIdentifier(node_uri(self.trust_domain, node))], key.public_key(),
                          check_ttl(ttl), now, [ExtendedKeyUsageOID.CLIENT_AUTH],
                          subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        return NodeCredentials(key=key, chain=[leaf, self.intermediate_cert], roots=self.bundle)

    def issue_server(self, dns_names: list[str], ttl: timedelta | float = timedelta(days=7),
                     now: datetime | None = None) -> Credentials:
        """The CA's own serving certificate (DNS SANs, serverAuth only)."""
        key = generate_private_key()
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names.append(x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}/nodemesh/ca"))
        leaf = self._leaf(names, key.public_key(), check_ttl(ttl), now, [ExtendedKeyUsageOID.SERVER_AUTH],
                          subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        return Credentials(key=key, chain=[leaf, self.intermediate_cert], roots=self.bundle)

    def _leaf(self, names: list[x509.GeneralName], public_key: PublicKey, ttl: timedelta, now: datetime | None,
              usages: list[x509.ObjectIdentifier], subject: x509.Name | None = None) -> x509.Certificate:
        at = aware(now)
        not_before, not_after = _validity(at, ttl)
        not_after = min(not_after, self.intermediate_cert.not_valid_after_utc)
        if not_after <= at:
            raise CAError("the intermediate certificate has expired; re-initialise the CA", code="ca_expired")
        subject = subject or x509.Name([])
        return (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.intermediate_cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=len(subject) == 0)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.intermediate_cert), critical=False)
            .sign(self._key, _hash_for(self._key))
        )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _new_intermediate(trust_domain: str, root: x509.Certificate, root_key: PrivateKey, now: datetime,
                      ttl: timedelta) -> tuple[PrivateKey, x509.Certificate]:
    key = generate_private_key()
    nb, na = _validity(now, ttl)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh intermediate CA ({trust_domain})"),
        ]))
        .issuer_name(root.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(nb).not_valid_after(min(na, root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(root), critical=False)
        .sign(root_key, _hash_for(root_key))
    )
    return key, cert


__all__ = [
    "DEFAULT_NODE_TTL",
    "DEFAULT_WORKLOAD_TTL",
    "CAError",
    "CertificateAuthority",
    "NodeCredentials",
    "check_ttl",
]

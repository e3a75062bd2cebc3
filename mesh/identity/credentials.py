"""Key + certificate chain + trust bundle, in the forms TLS stacks want (objects, PEM, files).

``WorkloadCert`` is what the certificate manager hands the tunnel: the private key of one identity, its
chain leaf first (leaf + intermediates, never the root, which peers already have), and the bundle to
verify peers with. The chain file written for ``ssl`` holds the intermediates after the leaf so OpenSSL
sends them and peers can build the path.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from mesh.identity.bundle import TrustBundle
from mesh.identity.errors import IdentityError
from mesh.identity.files import check_private_file, write_file
from mesh.identity.keys import PrivateKey, load_private_key, private_key_pem, public_key_der
from mesh.identity.pem import certs_from_pem, certs_to_pem
from mesh.identity.spiffe import SpiffeId
from mesh.identity.verify import aware, spiffe_id_from_cert

CERT_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
ROOTS_FILE = "root-cert.pem"


@dataclass(frozen=True, eq=False)
class Credentials:
    """A private key and the chain that certifies it; the parts common to workload and node credentials."""

    key: PrivateKey
    chain: list[x509.Certificate]
    roots: TrustBundle

    def __post_init__(self) -> None:
        if not self.chain:
            raise IdentityError("certificate chain is empty", code="bad_certificate")
        if not isinstance(self.roots, TrustBundle):
            raise IdentityError(f"roots must be a TrustBundle, got {type(self.roots).__name__}", code="bad_bundle")
        if public_key_der(self.key) != public_key_der(self.chain[0].public_key()):
            raise IdentityError("private key does not match the leaf certificate", code="key_mismatch")
        object.__setattr__(self, "chain", list(self.chain))

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def refresh_at(self) -> datetime:
        """Half-life, as ztunnel renews: late enough to be cheap, early enough to survive a CA outage."""
        return self.not_before + self.lifetime / 2

    @property
    def serial_number(self) -> int:
        return self.leaf.serial_number

    def is_valid(self, now: datetime | None = None) -> bool:
        at = aware(now)
        return self.not_before <= at <= self.not_after

    def remaining(self, now: datetime | None = None) -> timedelta:
        return self.not_after - aware(now)

    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def chain_pem(self) -> bytes:
        return certs_to_pem(self.chain)

    def roots_pem(self) -> bytes:
        return self.roots.roots_pem()

    def write_files(self, directory: str | Path) -> tuple[Path, Path, Path]:
        """Write ``cert-chain.pem``, ``key.pem`` (0600) and ``root-cert.pem`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cert_path, key_path, roots_path = d / CERT_FILE, d / KEY_FILE, d / ROOTS_FILE
        write_file(key_path, self.key_pem(), 0o600)
        write_file(cert_path, self.chain_pem(), 0o644)
        write_file(roots_path, self.roots_pem(), 0o644)
        return cert_path, key_path, roots_path

    @contextlib.contextmanager
    def ssl_files(self) -> Iterator[tuple[Path, Path, Path]]:
        """Temporary ``(cert_path, key_path, roots_path)`` for ``ssl``, which only loads keys from files.

        The files live in a fresh 0700 directory (key 0600) and are removed when the block exits::

            with cert.ssl_files() as (chain, key, roots):
                ctx.load_cert_chain(chain, key)
                ctx.load_verify_locations(roots)
        """
        tmp = Path(tempfile.mkdtemp(prefix="nodemesh-cred-"))
        try:
            yield self.write_files(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_into(self, context: ssl.SSLContext, verify: bool = True) -> ssl.SSLContext:
        """Make ``context`` present this chain (leaf + intermediates) and, if ``verify``, trust the roots."""
        with self.ssl_files() as (cert_path, key_path, roots_path):
            context.load_cert_chain(str(cert_path), str(key_path))
            if verify:
                context.load_verify_locations(cafile=str(roots_path))
        return context

    @staticmethod
    def _read(directory: str | Path) -> tuple[PrivateKey, list[x509.Certificate], TrustBundle]:
        d = Path(directory)
        try:
            check_private_file(d / KEY_FILE)
            key = load_private_key((d / KEY_FILE).read_bytes())
            chain = certs_from_pem((d / CERT_FILE).read_bytes(), CERT_FILE)
            roots = TrustBundle.from_pem((d / ROOTS_FILE).read_bytes())
        except FileNotFoundError as exc:
            raise IdentityError(f"credential file missing: {Path(exc.filename).name} in {d}",
                                code="missing_file") from exc
        return key, chain, roots.with_intermediates(chain[1:])


@dataclass(frozen=True, eq=False)
class WorkloadCert(Credentials):
    """The credentials of one SPIFFE identity; ``identity`` must be the leaf's one URI SAN."""

    identity: SpiffeId = None  # type: ignore[assignment]  # filled from the leaf when omitted

    def __post_init__(self) -> None:
        super().__post_init__()
        from_leaf = spiffe_id_from_cert(self.leaf)
        if self.identity is None:
            object.__setattr__(self, "identity", from_leaf)
        elif from_leaf != self.identity:
            raise IdentityError(f"leaf certificate is for {from_leaf}, not {self.identity}", code="identity_mismatch")

    @classmethod
    def from_pem(cls, chain_pem: bytes | str, key_pem: bytes, roots_pem: bytes | str) -> WorkloadCert:
        chain = certs_from_pem(chain_pem, "certificate chain")
        bundle = TrustBundle.from_pem(roots_pem).with_intermediates(chain[1:])
        return cls(key=load_private_key(key_pem), chain=chain, roots=bundle)

    @classmethod
    def read_files(cls, directory: str | Path) -> WorkloadCert:
        """Load what :meth:`write_files` wrote (refusing a key file others can read)."""
        key, chain, roots = cls._read(directory)
        return cls(key=key, chain=chain, roots=roots)

    def __repr__(self) -> str:  # never the key
        return f"WorkloadCert({self.identity}, serial={self.serial_number:x}, not_after={self.not_after.isoformat()})"

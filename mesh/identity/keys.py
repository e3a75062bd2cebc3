"""Private keys for workload identities: ECDSA P-256, as ztunnel and Istio's agents use.

Kept to one curve so every leaf looks alike to peers and the CSR check can be strict.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh.identity.errors import IdentityError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: the form ``ssl.SSLContext.load_cert_chain`` reads without a password."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"private key is not a readable unencrypted PEM key: {exc}", code="bad_key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"unsupported private key type {type(key).__name__}", code="bad_key")
    return key


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    """Canonical bytes to compare keys by (does this certificate belong to this key?)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_public_key(key: object, what: str = "key") -> None:
    """Refuse keys too weak or too odd to carry a mesh identity: EC P-256/P-384, or RSA of 2048 bits or more."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise IdentityError(f"{what} uses curve {key.curve.name}; only P-256 and P-384 are accepted",
                                code="unsupported_key")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise IdentityError(f"{what} is RSA-{key.key_size}; at least 2048 bits are required",
                                code="unsupported_key")
        return
    raise IdentityError(f"{what} has unsupported type {type(key).__name__}; use ECDSA P-256",
                        code="unsupported_key")

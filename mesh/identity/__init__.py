"""Workload identity: SPIFFE IDs, keys, CSRs, credentials and peer-chain verification.

The stable surface the tunnel, the CA and the agent build on; see ``docs/identity-and-ca.md``.
"""

from mesh.identity.bundle import TrustBundle
from mesh.identity.credentials import Credentials, WorkloadCert
from mesh.identity.csr import CsrInfo, build_csr, check_csr
from mesh.identity.errors import IdentityError
from mesh.identity.keys import generate_private_key, load_private_key, private_key_pem
from mesh.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, validate_trust_domain
from mesh.identity.tls import mtls_client_context, mtls_server_context
from mesh.identity.verify import spiffe_id_from_cert, uri_sans, verify_chain, verify_peer_chain

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "Credentials",
    "CsrInfo",
    "IdentityError",
    "SpiffeId",
    "TrustBundle",
    "WorkloadCert",
    "build_csr",
    "check_csr",
    "generate_private_key",
    "load_private_key",
    "mtls_client_context",
    "mtls_server_context",
    "private_key_pem",
    "spiffe_id_from_cert",
    "uri_sans",
    "validate_trust_domain",
    "verify_chain",
    "verify_peer_chain",
]

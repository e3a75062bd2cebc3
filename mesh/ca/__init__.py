"""The mesh CA: core (``authority``), HTTPS signing API (``server``), its client, placement sources."""

from mesh.ca.authority import (
    DEFAULT_NODE_TTL,
    DEFAULT_WORKLOAD_TTL,
    CAError,
    CertificateAuthority,
    NodeCredentials,
)

__all__ = ["DEFAULT_NODE_TTL", "DEFAULT_WORKLOAD_TTL", "CAError", "CertificateAuthority", "NodeCredentials"]

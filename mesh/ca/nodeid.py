"""How a node is named in its certificate: ``spiffe://<trust-domain>/nodemesh/node/<node-name>``.

A different path shape from workload IDs on purpose: a node certificate can never pass as a workload
identity (``SpiffeId.parse`` refuses it) and a workload certificate never authenticates a node to the CA.
"""

from __future__ import annotations

import re

from mesh.identity import IdentityError
from mesh.identity.spiffe import SCHEME, validate_trust_domain

_NODE_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$")
NODE_PATH = "/nodemesh/node/"


def validate_node_name(node: object) -> str:
    """A Kubernetes node name: a DNS-1123 subdomain."""
    if not isinstance(node, str) or not node:
        raise IdentityError("node name must be a non-empty string", code="bad_node_name")
    if len(node) > 253 or not _NODE_RE.match(node):
        raise IdentityError(
            f"node name {node!r} is not valid (DNS subdomain: lowercase letters, digits, '-', '.')",
            code="bad_node_name",
        )
    return node


def node_uri(trust_domain: str, node: str) -> str:
    validate_trust_domain(trust_domain)
    return f"{SCHEME}{trust_domain}{NODE_PATH}{validate_node_name(node)}"


def parse_node_uri(uri: str, trust_domain: str) -> str:
    """The node name in a node URI of ``trust_domain``; IdentityError for anything else."""
    prefix = f"{SCHEME}{trust_domain}{NODE_PATH}"
    if not isinstance(uri, str) or not uri.startswith(prefix):
        raise IdentityError(f"{uri!r} is not a node identity of trust domain {trust_domain!r}", code="not_a_node")
    return validate_node_name(uri[len(prefix) :])

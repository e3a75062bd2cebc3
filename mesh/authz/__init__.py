"""L4 authorization: Istio AuthorizationPolicy semantics as ztunnel enforces them (see `l4`)."""

from mesh.authz.l4 import (
    ConnInfo,
    Decision,
    Peer,
    Reason,
    authorize,
    destination_of,
    evaluate,
    peer_of,
    policies_for,
    policy_matches,
)
from mesh.authz.recheck import connections_to_close, enforce_on_change

__all__ = [
    "ConnInfo",
    "Decision",
    "Peer",
    "Reason",
    "authorize",
    "connections_to_close",
    "destination_of",
    "enforce_on_change",
    "evaluate",
    "peer_of",
    "policies_for",
    "policy_matches",
]

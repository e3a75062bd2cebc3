"""Traffic redirection: steer each mesh pod's TCP to the agent's listeners in its namespace.

Two backends with the same semantics: eBPF (an sk_lookup program plus policy routing)
and nftables (nat redirect rules), both confined to the pod's own network namespace.
See docs/redirection.md. The agent uses :class:`RedirectController`.
"""

from agent.redirect.controller import PodRedirection, RedirectController
from agent.redirect.exclusions import CaptureExclusions, ExclusionError
from agent.redirect.listeners import PodListeners, mark_socket, original_destination
from agent.redirect.model import (
    HBONE_PORT,
    INBOUND_PORT,
    MESH_MARK,
    OUTBOUND_PORT,
    PodNetInfo,
    RedirectError,
    RedirectUnavailable,
)

__all__ = [
    "HBONE_PORT",
    "INBOUND_PORT",
    "MESH_MARK",
    "OUTBOUND_PORT",
    "CaptureExclusions",
    "ExclusionError",
    "PodListeners",
    "PodNetInfo",
    "PodRedirection",
    "RedirectController",
    "RedirectError",
    "RedirectUnavailable",
    "mark_socket",
    "original_destination",
]

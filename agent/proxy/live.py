"""The inbound connections a pod's proxy is carrying, kept so a policy change can re-check them.

A connection is registered with what policy saw when it was admitted (`ConnInfo`) and a way to cut it;
when the policies change, every live connection is evaluated again and the ones now denied are closed
(ztunnel's `AuthorizationPolicyLateRejection`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mesh.authz import ConnInfo, authorize
from mesh.config import MeshSnapshot

log = logging.getLogger("nodemesh.agent.policy")


@dataclass
class LiveConn:
    info: ConnInfo
    close: Callable[[str], None]
    label: str


class LiveConnections:
    def __init__(self) -> None:
        self._conns: dict[int, LiveConn] = {}
        self._ids = itertools.count(1)

    def add(self, info: ConnInfo, close: Callable[[str], None], label: str) -> int:
        cid = next(self._ids)
        self._conns[cid] = LiveConn(info, close, label)
        return cid

    def remove(self, cid: int) -> None:
        self._conns.pop(cid, None)

    def __len__(self) -> int:
        return len(self._conns)

    def recheck(self, snap: MeshSnapshot) -> list[str]:
        """Close the connections the new policies deny; return their labels."""
        closed = []
        for cid, conn in list(self._conns.items()):
            decision = authorize(conn.info, snap)
            if not decision.allowed:
                log.info("closing %s: denied by %s after a policy change", conn.label, decision.policy or "policy")
                self._conns.pop(cid, None)
                conn.close(f"denied after policy change: {decision.reason}")
                closed.append(conn.label)
        return closed

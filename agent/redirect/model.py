"""What the redirection layer is told about a pod, the numbers it shares with the rest of
the agent, and the errors it raises."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from agent.redirect.exclusions import CaptureExclusions

#: SO_MARK on every socket the agent makes in or for a pod: the capture rules skip it (as
#: ztunnel's 1337, so Istio-shaped node rules keep working).
MESH_MARK = 0x539
MESH_MARK_MASK = 0xFFF

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
LISTENER_PORTS = (OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT)

#: The address Istio's CNI SNATs kubelet probes to on the node; honoured as a node address
#: everywhere, so node rules written for Istio keep their meaning here.
ISTIO_PROBE_SNAT = IPv4Network("169.254.7.127/32")

DEFAULT_BPFFS_ROOT = "/sys/fs/bpf/nodemesh"
DEFAULT_STATE_DIR = "/run/nodemesh/redirect"

BACKENDS = ("ebpf", "nftables")

_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$")


class RedirectError(Exception):
    """Redirection for a pod could not be installed, adopted or removed; the message says why."""


class RedirectUnavailable(RedirectError):
    """A backend cannot work on this node at all (kernel, permissions, missing tools).

    ``backend`` names it and ``cause`` is one human sentence naming the missing piece.
    """

    def __init__(self, backend: str, cause: str) -> None:
        self.backend = backend
        self.cause = cause
        super().__init__(f"{backend} redirection unavailable: {cause}")


@dataclass(frozen=True)
class PodNetInfo:
    """One pod as the redirection layer needs it.

    ``netns`` is a path (``/run/netns/x``, ``/proc/<pid>/ns/net``), a bare ``ip netns`` name, or
    an open fd (as the CNI hands one over). Only a path can be re-opened by a restarted agent,
    so with an fd re-adoption needs the caller to call ``install`` again with a fresh fd.
    ``node_addresses`` are sources whose connections reach the app uncaptured (the node's own
    address on the pod's link, from which kubelet probes come); 169.254.7.127 is always added.
    """

    uid: str
    netns: str | int
    ip: IPv4Address
    eth0: str = "eth0"
    name: str = ""
    namespace: str = ""
    exclusions: CaptureExclusions = field(default_factory=CaptureExclusions)
    node_addresses: tuple[IPv4Network, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.uid, str) or not _UID_RE.match(self.uid):
            raise RedirectError(f"pod uid {self.uid!r} is not a valid uid (letters, digits, '._:/-')")
        if isinstance(self.netns, int):
            if self.netns < 0:
                raise RedirectError(f"pod {self.uid}: netns fd {self.netns} is invalid")
        elif not isinstance(self.netns, str | os.PathLike) or not os.fspath(self.netns):
            raise RedirectError(f"pod {self.uid}: netns must be a path, a name or an fd")
        try:
            ip = IPv4Address(self.ip) if not isinstance(self.ip, IPv4Address) else self.ip
        except ipaddress.AddressValueError:
            raise RedirectError(f"pod {self.uid}: ip {self.ip!r} is not an IPv4 address") from None
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            raise RedirectError(f"pod {self.uid}: ip {ip} cannot be a pod address")
        object.__setattr__(self, "ip", ip)
        try:
            nets = tuple(IPv4Network(n, strict=False) for n in self.node_addresses)
        except ValueError as exc:
            raise RedirectError(f"pod {self.uid}: node_addresses: {exc}") from None
        object.__setattr__(self, "node_addresses", nets)
        if not re.match(r"^[A-Za-z0-9_.@:-]{1,15}$", self.eth0):
            raise RedirectError(f"pod {self.uid}: eth0 {self.eth0!r} is not an interface name")

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else self.uid

    def all_node_addresses(self) -> tuple[IPv4Network, ...]:
        nets = list(self.node_addresses)
        if ISTIO_PROBE_SNAT not in nets:
            nets.append(ISTIO_PROBE_SNAT)
        return tuple(nets)

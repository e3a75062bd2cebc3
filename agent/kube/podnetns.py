"""Finding a running pod's network namespace on this node from the host's /proc, by the pod's IP.

A node agent learns of already-running pods from the API server, which says nothing about namespaces;
the kernel does. Every pod sandbox has at least one process (the pause container) whose
`/proc/<pid>/ns/net` is the pod's namespace, and `/proc/<pid>/net/fib_trie` lists the addresses local
to that namespace, readable without entering it. So: scan `<proc>/*/ns/net`, keep one process per
namespace (by inode), read each namespace's local addresses, and pick the one holding the pod IP.

An IP alone is not proof on a machine that may run other, unrelated namespaces with the same private
addresses (nested labs, other nodes' test namespaces, a second runtime). A pod of *this* node has its
interface paired with a link in the agent's own namespace (the veth of every common CNI), so when the
agent's namespace has such links, a candidate must be one of their peers: the kernel gives both the
peer's namespace id (`IFLA_LINK_NETNSID`) and a candidate's id as seen from here (`RTM_GETNSID`). Two
candidates left is an error, never a guess.

Privileges: read access to other processes' `ns/net` links needs CAP_SYS_PTRACE (ptrace read mode) in
the host PID namespace's view, which a DaemonSet gets by mounting the host's /proc (no hostPID needed);
the namespace is then entered with setns (CAP_SYS_ADMIN) by the redirection layer.

The cache maps an IP to the namespace found for it and is checked (same inode, address still there)
before use, so a pod re-created with the same IP is found again, not confused with its predecessor.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("nodemesh.podnetns")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NSID_NOT_ASSIGNED = 0xFFFFFFFF


class NetnsNotFound(LookupError):
    """No (or no unambiguous) namespace on this node holds the address; the message says which."""


@dataclass(frozen=True)
class PodNetns:
    """A namespace found for a pod: `path` opens it for as long as `pid` lives in it."""

    path: str
    inode: int
    pid: int


def parse_fib_trie(text: str) -> set[ipaddress.IPv4Address]:
    """The addresses local to a namespace, from its `/proc/net/fib_trie` ('/32 host LOCAL' leaves);
    loopback excluded. Sans-IO."""
    out: set[ipaddress.IPv4Address] = set()
    current: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            current = stripped[3:].strip()
        elif stripped.startswith("+--"):
            current = None
        elif current and stripped.startswith("/32") and stripped.endswith("host LOCAL"):
            with contextlib.suppress(ValueError):
                ip = ipaddress.IPv4Address(current)
                if not ip.is_loopback:
                    out.add(ip)
    return out


def parse_if_inet6(text: str) -> set[ipaddress.IPv6Address]:
    """Global IPv6 addresses from `/proc/net/if_inet6` (32 hex digits, then index, prefix, scope...)."""
    out: set[ipaddress.IPv6Address] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or len(fields[0]) != 32:
            continue
        with contextlib.suppress(ValueError):
            ip = ipaddress.IPv6Address(int(fields[0], 16))
            if not (ip.is_loopback or ip.is_link_local):
                out.add(ip)
    return out


class NetnsFinder:
    """Thread-safe; every method may block on /proc and netlink, so call it from a worker thread."""

    def __init__(self, proc_root: str = "/proc", *, check_link: bool = True) -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        self.check_link = check_link
        self._cache: dict[str, PodNetns] = {}
        self._lock = threading.Lock()
        self.scans = 0

    # --- reading /proc -----------------------------------------------------------------------------

    def _pids(self) -> Iterable[int]:
        try:
            names = os.listdir(self.proc_root)
        except OSError as err:
            raise NetnsNotFound(f"cannot list {self.proc_root}: {err.strerror}") from None
        return (int(n) for n in names if n.isdigit())

    def _ns_path(self, pid: int) -> str:
        return f"{self.proc_root}/{pid}/ns/net"

    def _inode(self, pid: int) -> int | None:
        try:
            return os.stat(self._ns_path(pid)).st_ino
        except OSError:  # gone, or not ours to read (then CAP_SYS_PTRACE is missing)
            return None

    def addresses(self, pid: int) -> set[IPAddress]:
        found: set[IPAddress] = set()
        with contextlib.suppress(OSError), open(f"{self.proc_root}/{pid}/net/fib_trie") as f:
            found |= parse_fib_trie(f.read())
        with contextlib.suppress(OSError), open(f"{self.proc_root}/{pid}/net/if_inet6") as f:
            found |= parse_if_inet6(f.read())
        return found

    def namespaces(self) -> dict[int, int]:
        """netns inode -> one pid in it, for every namespace but the agent's own."""
        own = None
        with contextlib.suppress(OSError):
            own = os.stat("/proc/thread-self/ns/net").st_ino
        out: dict[int, int] = {}
        for pid in self._pids():
            ino = self._inode(pid)
            if ino is not None and ino != own and ino not in out:
                out[ino] = pid
        return out

    # --- is it on this node? -----------------------------------------------------------------------

    def _linked_filter(self, candidates: list[PodNetns]) -> list[PodNetns]:
        """Keep the candidates whose namespace is the peer of one of our links (see module doc); all of
        them when our namespace has no cross-namespace links to judge by."""
        if not self.check_link or not candidates:
            return candidates
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            peers = {link.get_attr("IFLA_LINK_NETNSID") for link in ipr.get_links()}
            peers.discard(None)
            if not peers:
                return candidates
            kept = []
            for cand in candidates:
                try:
                    fd = os.open(cand.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    reply = ipr.get_netnsid(fd=fd) or {}
                finally:
                    os.close(fd)
                nsid = reply.get("nsid")
                if nsid is not None and nsid != NSID_NOT_ASSIGNED and nsid in peers:
                    kept.append(cand)
            return kept

    # --- lookups -----------------------------------------------------------------------------------

    def _still_valid(self, entry: PodNetns, ip: IPAddress) -> bool:
        return self._inode(entry.pid) == entry.inode and ip in self.addresses(entry.pid)

    def find(self, ip: str | IPAddress) -> PodNetns:
        """The namespace on this node holding `ip`; NetnsNotFound naming the cause otherwise."""
        addr = ipaddress.ip_address(ip)
        key = str(addr)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and self._still_valid(cached, addr):
                return cached
            self._cache.pop(key, None)
            self.scans += 1
            candidates = [PodNetns(self._ns_path(pid), ino, pid) for ino, pid in self.namespaces().items()
                          if addr in self.addresses(pid)]
            if not candidates:
                raise NetnsNotFound(f"no process on this node runs in a network namespace holding {addr} "
                                    f"(under {self.proc_root}): the pod's sandbox is not running yet, or "
                                    "its /proc entries are not readable (CAP_SYS_PTRACE)")
            linked = self._linked_filter(candidates)
            if not linked:
                raise NetnsNotFound(f"{len(candidates)} network namespace(s) hold {addr}, none paired with a "
                                    "link of this node's namespace: not a pod of this node")
            if len(linked) > 1:
                raise NetnsNotFound(f"{len(linked)} network namespaces of this node hold {addr} "
                                    f"(pids {', '.join(str(c.pid) for c in linked)}); refusing to guess")
            self._cache[key] = linked[0]
            return linked[0]

    def forget(self, ip: str | IPAddress) -> None:
        with self._lock:
            self._cache.pop(str(ipaddress.ip_address(ip)), None)

"""Read-only inspection of one pod namespace: everything redirection may have put there.

Used by ``nodemesh redirect show``, by the controller's ``status()``, and by the tests
that assert removal left nothing behind. It looks at the kernel, not at the agent's
memory, so it also sees what a crashed agent left: sk_lookup links attached to the
namespace (and, for ours, the map entries of the pod IPs that live there), pins under
the bpffs root, our policy rules and capture routes, our sysctl changes, the nftables
table, and listening sockets on 15001/15006/15008 with the processes that own them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from typing import Any

from agent.redirect import bpf_syscall as sysbpf
from agent.redirect import ebpf, nftables, routing
from agent.redirect import state as st
from agent.redirect.model import LISTENER_PORTS
from mesh.netns import NetnsRef, netns_cookie, open_netns, run_in_netns

_TCP_LISTEN = "0A"


@dataclass
class ListenerView:
    port: int
    address: str
    inode: int
    owners: list[str] = field(default_factory=list)  # "pid/comm"


@dataclass
class LinkView:
    link_id: int
    prog_id: int
    prog_name: str
    ours: bool
    pinned_at: str | None
    map_entries: dict[str, dict[str, int]] = field(default_factory=dict)  # pod IP -> map -> keys
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # pod IP -> counter -> value


@dataclass
class NetnsStatus:
    netns: str
    netns_ino: int
    netns_cookie: int
    addresses: list[str]
    links: list[LinkView]
    rules: list[str]
    routes: list[str]
    sysctls: dict[str, int]
    nft_table: str | None
    listeners: list[ListenerView]
    pins: list[str]
    records: list[str]  # uids of state records that point at this namespace

    def installed(self) -> list[str]:
        """One line per piece of redirection found; empty means the namespace is clean."""
        out = [f"sk_lookup link {lk.link_id} (prog {lk.prog_name or lk.prog_id})" for lk in self.links]
        for lk in self.links:
            for ip, entries in lk.map_entries.items():
                out += [f"map {m}: {n} entries for {ip}" for m, n in entries.items() if n]
        out += [f"pin {p}" for p in self.pins]
        out += [f"rule {r}" for r in self.rules]
        out += [f"route {r}" for r in self.routes]
        if self.nft_table is not None:
            out.append(f"nftables table {nftables.FAMILY} {nftables.TABLE}")
        out += [f"listener {lv.address}:{lv.port}" for lv in self.listeners]
        out += [f"state record {u}" for u in self.records]
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"netns {self.netns} (inode {self.netns_ino}, cookie {self.netns_cookie})"]
        lines.append(f"  addresses: {', '.join(self.addresses) or '-'}")
        lines.append("  eBPF:")
        if not self.links:
            lines.append("    no sk_lookup link")
        for lk in self.links:
            where = f", pinned at {lk.pinned_at}" if lk.pinned_at else ""
            lines.append(f"    link {lk.link_id}: prog {lk.prog_id} {lk.prog_name}{where}")
            for ip, counters in lk.counters.items():
                entries = lk.map_entries.get(ip, {})
                lines.append(f"      pod {ip}: maps " + ", ".join(f"{k}={v}" for k, v in entries.items()))
                lines.append("      counters " + ", ".join(f"{k}={v}" for k, v in counters.items()))
        lines.append("  policy rules:" + ("" if self.rules else " none"))
        lines += [f"    {r}" for r in self.rules]
        lines.append("  capture routes:" + ("" if self.routes else " none"))
        lines += [f"    {r}" for r in self.routes]
        lines.append("  sysctls: " + ", ".join(f"{k}={v}" for k, v in self.sysctls.items()))
        table = f"{nftables.FAMILY} {nftables.TABLE}"
        lines.append(f"  nftables table {table}: " + ("present" if self.nft_table else "none"))
        if self.nft_table:
            lines += ["    " + ln for ln in self.nft_table.rstrip().splitlines()]
        lines.append("  listeners:" + ("" if self.listeners else " none"))
        for lv in self.listeners:
            lines.append(f"    {lv.address}:{lv.port} owned by {', '.join(lv.owners) or 'no live process'}")
        if self.records:
            lines.append("  agent state records: " + ", ".join(self.records))
        return "\n".join(lines)


def _addresses() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [m.get("IFA_ADDRESS") for m in ipr.get_addr(family=socket.AF_INET) if m.get("IFA_ADDRESS")]


def _listening() -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    with open("/proc/thread-self/net/tcp") as fh:
        next(fh, None)
        for line in fh:
            parts = line.split()
            if len(parts) < 10 or parts[3] != _TCP_LISTEN:
                continue
            addr_hex, port_hex = parts[1].split(":")
            port = int(port_hex, 16)
            if port not in LISTENER_PORTS:
                continue
            addr = socket.inet_ntoa(struct.pack("<I", int(addr_hex, 16)))
            out.append((addr, port, int(parts[9])))
    return out


def _owners(inodes: set[int]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {i: [] for i in inodes}
    if not inodes:
        return found
    wanted = {f"socket:[{i}]": i for i in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target in wanted:
                try:
                    with open(f"/proc/{pid}/comm") as fh:
                        comm = fh.read().strip()
                except OSError:
                    comm = "?"
                owner = f"{pid}/{comm}"
                if owner not in found[wanted[target]]:
                    found[wanted[target]].append(owner)
    return found


def inspect_netns(netns: NetnsRef, bpffs_root: str, state_dir: str) -> NetnsStatus:
    fd = open_netns(netns)
    try:
        ino = os.fstat(fd).st_ino
        cookie = netns_cookie(fd)
        addresses = run_in_netns(fd, _addresses)
        ips = {IPv4Address(a) for a in addresses}

        pins = ebpf.pinned_links(bpffs_root)
        links: list[LinkView] = []
        for view in ebpf.links_in_netns(ino, pins):
            lv = LinkView(view.link_id, view.prog_id, view.prog_name, view.ours, view.pinned_at)
            if view.ours:
                with contextlib.suppress(sysbpf.BpfError):
                    for ip in ebpf.pod_ips_in(view):
                        if ip in ips:
                            lv.map_entries[str(ip)], lv.counters[str(ip)] = ebpf.map_entries_for(view, ip)
            links.append(lv)
        pin_paths = [p for p in pins.values() if any(lk.pinned_at == p for lk in links)]
        own_pin = os.path.join(ebpf.pin_dir(bpffs_root, cookie), ebpf.LINK_PIN_NAME)
        if os.path.exists(own_pin) and own_pin not in pin_paths:
            pin_paths.append(own_pin)

        rules, routes = routing.read(fd)
        eth0 = _main_interface(fd)
        sysctls = routing.read_sysctls(fd, eth0) if eth0 else {}
        nft_table = nftables.installed(fd)
        listening = run_in_netns(fd, _listening)
        owners = _owners({i for _, _, i in listening})
        listeners = [ListenerView(port, addr, inode, owners.get(inode, [])) for addr, port, inode in listening]
        records = [r.uid for r in st.load_all(state_dir)[0] if r.netns_cookie == cookie]
        return NetnsStatus(
            netns=str(netns) if not isinstance(netns, int) else f"fd {netns}",
            netns_ino=ino,
            netns_cookie=cookie,
            addresses=addresses,
            links=links,
            rules=[r.describe() for r in rules],
            routes=[r.describe() for r in routes],
            sysctls=sysctls,
            nft_table=nft_table,
            listeners=listeners,
            pins=pin_paths,
            records=records,
        )
    finally:
        os.close(fd)


def _main_interface(netns_fd: int) -> str | None:
    def body() -> str | None:
        names = sorted(n for n in os.listdir("/proc/sys/net/ipv4/conf") if n not in ("all", "default", "lo"))
        return "eth0" if "eth0" in names else (names[0] if names else None)

    return run_in_netns(netns_fd, body)

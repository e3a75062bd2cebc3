"""The nftables backend: the same capture as the eBPF one, written as nat rules in one
table inside the pod's namespace (the shape of Istio's in-pod rules, in nftables form).

Used when asked for (``--redirect nftables``) or when eBPF is unavailable. Semantics
match the eBPF backend rule for rule:

* inbound TCP to the pod IP, any port but 15008, is redirected to 15006, except from a
  node address or to an excluded inbound port;
* the pod's outbound TCP is redirected to 15001 (the kernel picks 127.0.0.1), except to
  loopback, to the pod itself (anything leaving through ``lo``), to node addresses,
  excluded CIDRs and excluded ports, or outside the capture CIDRs when those are set;
* the agent's marked sockets (0x539/0xfff) are never touched.

REDIRECT rewrites the destination, so the agent reads the original with
``SO_ORIGINAL_DST`` (see ``listeners.original_destination``); conntrack undoes the
rewrite on replies.

The agent connects to the application with the client's address as source (IP_TRANSPARENT),
as Istio's in-pod rules allow: such a connection's packets carry the agent's mark when they
loop back into the pod, so prerouting tags the connection (ct mark 0x111), and output copies
that tag onto the application's replies, which a policy rule (``fwmark 0x111 lookup 15001``,
table 15001 = ``local 0.0.0.0/0 dev lo``) then delivers back to the agent's socket instead of
sending them towards the client's real address (Istio's ``InpodTProxyMark``).

The table carries a comment with a digest of its own text: re-adopting a pod after an
agent restart compares digests and leaves an identical table alone, and a changed one
is replaced in a single nft transaction (old and new never both apply, nothing is
ever missing).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from agent.redirect.exclusions import CaptureExclusions
from agent.redirect.model import (
    HBONE_PORT,
    INBOUND_PORT,
    MESH_MARK,
    MESH_MARK_MASK,
    OUTBOUND_PORT,
    RedirectUnavailable,
)
from mesh.netns import NetnsRef, run_in_netns

FAMILY = "ip"
TABLE = "nodemesh"
TPROXY_MARK = 0x111  # connections the agent opened to the application with the client's address
_COMMENT_RE = re.compile(r'comment "nodemesh ([^"]*)"')


@dataclass(frozen=True)
class NftPlan:
    text: str
    digest: str


def _elements(items: list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def render(
    pod_ip: IPv4Address, node_addresses: tuple[IPv4Network, ...], exclusions: CaptureExclusions
) -> NftPlan:
    """The whole table for one pod, as nft input text (pure: no I/O)."""
    nodes = [str(n) for n in dict.fromkeys(node_addresses)]
    in_ports = [str(p) for p in sorted(exclusions.inbound_ports)]
    out_ports = [str(p) for p in sorted(exclusions.outbound_ports)]
    out_cidrs = [str(n) for n in dict.fromkeys(exclusions.outbound_cidrs)]
    mark = f"meta mark & {MESH_MARK_MASK:#x} == {MESH_MARK:#x}"
    capture_line = ""
    capture_set = ""
    if exclusions.capture_cidrs is not None:
        cap = [str(n) for n in dict.fromkeys(exclusions.capture_cidrs)]
        capture_set = f"  set capture_cidrs {{ type ipv4_addr; flags interval;{_elements(cap)} }}\n"
        capture_line = "    ip daddr != @capture_cidrs accept\n"
    body = (
        f"  set node_addrs {{ type ipv4_addr; flags interval;{_elements(nodes)} }}\n"
        f"  set in_excluded_ports {{ type inet_service;{_elements(in_ports)} }}\n"
        f"  set out_excluded_ports {{ type inet_service;{_elements(out_ports)} }}\n"
        f"  set out_excluded_cidrs {{ type ipv4_addr; flags interval;{_elements(out_cidrs)} }}\n"
        f"{capture_set}"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        "    meta l4proto != tcp accept\n"
        f"    {mark} accept\n"
        f"    ip daddr != {pod_ip} accept\n"
        f"    tcp dport {HBONE_PORT} accept\n"
        "    ip saddr @node_addrs accept\n"
        "    tcp dport @in_excluded_ports accept\n"
        f"    meta l4proto tcp redirect to :{INBOUND_PORT}\n"
        "  }\n"
        "  chain tag_agent_conns {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"    {mark} ct mark set {TPROXY_MARK:#x}\n"
        "  }\n"
        "  chain return_to_agent {\n"
        "    type route hook output priority mangle; policy accept;\n"
        f"    ct mark & {MESH_MARK_MASK:#x} == {TPROXY_MARK:#x} meta mark set ct mark\n"
        "  }\n"
        "  chain output {\n"
        "    type nat hook output priority -100; policy accept;\n"
        "    meta l4proto != tcp accept\n"
        f"    {mark} accept\n"
        '    oifname "lo" accept\n'
        "    ip daddr 127.0.0.0/8 accept\n"
        "    ip daddr @node_addrs accept\n"
        "    ip daddr @out_excluded_cidrs accept\n"
        "    tcp dport @out_excluded_ports accept\n"
        f"{capture_line}"
        f"    meta l4proto tcp redirect to :{OUTBOUND_PORT}\n"
        "  }\n"
    )
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    text = f'table {FAMILY} {TABLE} {{\n  comment "nodemesh {digest}"\n{body}}}\n'
    return NftPlan(text=text, digest=digest)


def check_available() -> None:
    if shutil.which("nft") is None:
        raise RedirectUnavailable("nftables", "the nft command is not installed (Debian package nftables)")


def _nft(netns: NetnsRef, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    def body() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nft", *args], input=stdin, capture_output=True, text=True, check=False, timeout=30
        )

    return run_in_netns(netns, body)


class NftError(RuntimeError):
    """nft refused a change; the message carries nft's own first error line."""


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "no detail"


def installed(netns: NetnsRef) -> str | None:
    """The table's current listing, or None if the namespace has none."""
    res = _nft(netns, ["list", "table", FAMILY, TABLE])
    return res.stdout if res.returncode == 0 else None


def installed_digest(listing: str | None) -> str | None:
    if listing is None:
        return None
    m = _COMMENT_RE.search(listing)
    return m.group(1) if m else ""


def apply(netns: NetnsRef, plan: NftPlan) -> bool:
    """Install the table; returns False when an identical one was already there (untouched)."""
    if installed_digest(installed(netns)) == plan.digest:
        return False
    script = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n{plan.text}"
    res = _nft(netns, ["-f", "-"], stdin=script)
    if res.returncode != 0:
        if "Operation not permitted" in res.stderr:
            raise RedirectUnavailable("nftables", "not permitted to change nftables rules (needs CAP_NET_ADMIN)")
        raise NftError(f"nft rejected the pod's table: {_first_line(res.stderr)}")
    return True


def remove(netns: NetnsRef) -> bool:
    """Delete the table; returns whether there was one."""
    had = installed(netns) is not None
    res = _nft(netns, ["-f", "-"], stdin=f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
    if res.returncode != 0:
        raise NftError(f"nft could not delete table {FAMILY} {TABLE}: {_first_line(res.stderr)}")
    return had

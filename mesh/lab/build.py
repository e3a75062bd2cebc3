"""Builds and tears down a lab: nodes and pods as network namespaces, wired like a routed CNI.

Layout, for a lab named L:
- `nm-L-fabric`: a bridge `br0`, one port per node. It stands for the network between machines and lives
  in a namespace of its own, so nothing of the lab is ever configured in the host's root namespace.
- `nm-L-node-<node>`: `eth0` on the fabric, IP forwarding on, a route to every other node's pod CIDR via
  that node's fabric address, and one veth `vp<k>` per pod carrying the node's gateway address (/32) and a
  /32 route to the pod (the CNI "ptp" plugin's plan).
- `nm-L-pod-<pod>`: `eth0` with the pod IP (/32), the gateway as an on-link route, default via the gateway.

Every link is created directly inside its namespace (pyroute2 with the peer's target netns), so no link
ever appears in the root namespace, even for a moment.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pyroute2 import NetNS, netns

from mesh.lab import state as st
from mesh.lab.topology import Topology

log = logging.getLogger("nodemesh.lab")

FABRIC_BRIDGE = "br0"
SCOPE_LINK = 253


class LabError(RuntimeError):
    """A lab operation failed; the message says which step and why."""


def _sysctl(ns: str, settings: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in settings.items()]
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *args], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise LabError(f"sysctl in {ns} failed: {res.stderr.strip()}")


def _idx(ipr: NetNS, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found")
    return found[0]


class Lab:
    """A built lab, addressed by its name; every method works from any process through the state file."""

    def __init__(self, state: st.LabState) -> None:
        self.state = state

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def up(cls, topo: Topology, name: str = "default") -> Lab:
        if not st.LAB_NAME.match(name):
            raise LabError(f"lab name {name!r}: use 1-16 lower-case letters or digits")
        if st.state_path(name).exists():
            raise LabError(f"a lab named {name!r} already exists; run 'nodemesh lab down --name {name}' first")
        prefix = st.lab_prefix(name)
        leftovers = [n for n in _list_netns() if n.startswith(prefix)]
        if leftovers:
            raise LabError(f"netns {leftovers[0]} of an earlier lab {name!r} is still there; run 'lab down' first")
        state = plan(topo, name)
        lab = cls(state)
        try:
            lab._build()
        except Exception as e:
            lab.down()
            if isinstance(e, LabError):
                raise
            raise LabError(f"building lab {name!r} failed: {e}") from e
        st.save(state)
        return lab

    @classmethod
    def attach(cls, name: str) -> Lab:
        return cls(st.load(name))

    def down(self) -> list[str]:
        """Remove every namespace of this lab (and the processes in them); return what was removed."""
        removed = destroy_prefix(st.lab_prefix(self.state.name), self.state.all_netns())
        with contextlib.suppress(FileNotFoundError):
            st.state_path(self.state.name).unlink()
        return removed

    # -- lookup ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.state.name

    def pod(self, name: str) -> st.PodState:
        for p in self.state.pods:
            if p.name == name:
                return p
        raise LookupError(f"lab {self.name!r} has no pod {name!r}")

    def node(self, name: str) -> st.NodeState:
        for n in self.state.nodes:
            if n.name == name:
                return n
        raise LookupError(f"lab {self.name!r} has no node {name!r}")

    def netns_of(self, target: str) -> str:
        """The netns of a pod or node given by name (pods first: they are what users address)."""
        for p in self.state.pods:
            if p.name == target:
                return p.netns
        for n in self.state.nodes:
            if n.name == target:
                return n.netns
        if target == "fabric":
            return self.state.fabric_netns
        raise LookupError(f"lab {self.name!r} has no pod or node {target!r}")

    # -- running things inside ---------------------------------------------------------------------
    def exec(self, target: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("check", False)
        return subprocess.run(["ip", "netns", "exec", self.netns_of(target), *argv], **kwargs)

    def popen(self, target: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns_of(target), *argv], **kwargs)

    # -- building ----------------------------------------------------------------------------------
    def _build(self) -> None:
        s = self.state
        netns.create(s.fabric_netns)
        with NetNS(s.fabric_netns) as fab:
            fab.link("set", index=_idx(fab, "lo"), state="up")
            fab.link("add", ifname=FABRIC_BRIDGE, kind="bridge")
            br = _idx(fab, FABRIC_BRIDGE)
            fab.link("set", index=br, state="up")
        fabric_len = ipaddress.ip_network(s.fabric_cidr).prefixlen
        for i, node in enumerate(s.nodes):
            netns.create(node.netns)
            with NetNS(node.netns) as ns:
                ns.link("set", index=_idx(ns, "lo"), state="up")
                ns.link("add", ifname="eth0", kind="veth", peer={"ifname": f"n{i}", "net_ns_fd": s.fabric_netns})
                eth = _idx(ns, "eth0")
                ns.addr("add", index=eth, address=node.fabric_ip, prefixlen=fabric_len)
                ns.link("set", index=eth, state="up")
            with NetNS(s.fabric_netns) as fab:
                port = _idx(fab, f"n{i}")
                fab.link("set", index=port, master=_idx(fab, FABRIC_BRIDGE), state="up")
            _sysctl(
                node.netns,
                {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                 "net.ipv4.conf.default.rp_filter": "0"},
            )
        for node in s.nodes:
            with NetNS(node.netns) as ns:
                for other in s.nodes:
                    if other.name != node.name:
                        ns.route("add", dst=other.pod_cidr, gateway=other.fabric_ip)
        for pod in s.pods:
            node = self.node(pod.node)
            netns.create(pod.netns)
            with NetNS(node.netns) as ns:
                ns.link("add", ifname=pod.host_ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
                host = _idx(ns, pod.host_ifname)
                ns.addr("add", index=host, address=node.gateway, prefixlen=32)
                ns.link("set", index=host, state="up")
                ns.route("add", dst=f"{pod.ip}/32", oif=host, scope=SCOPE_LINK)
            with NetNS(pod.netns) as ns:
                ns.link("set", index=_idx(ns, "lo"), state="up")
                eth = _idx(ns, "eth0")
                ns.addr("add", index=eth, address=pod.ip, prefixlen=32)
                ns.link("set", index=eth, state="up")
                ns.route("add", dst=f"{node.gateway}/32", oif=eth, scope=SCOPE_LINK)
                ns.route("add", dst="0.0.0.0/0", gateway=node.gateway, oif=eth)


def plan(topo: Topology, name: str) -> st.LabState:
    """Turn a validated topology into the state a build will create (names, addresses), creating nothing."""
    prefix = st.lab_prefix(name)
    fabric = ipaddress.ip_network(topo.fabric_cidr)
    fabric_hosts = fabric.hosts()
    next(fabric_hosts)  # .1 stays free, as a router address would be
    cidrs = topo.node_cidrs()
    ips = topo.pod_addresses()
    state = st.LabState(
        name=name,
        trust_domain=topo.trust_domain,
        fabric_netns=f"{prefix}fabric",
        fabric_cidr=str(fabric),
        namespaces={ns: {"labels": dict(spec.labels)} for ns, spec in topo.namespaces.items()},
    )
    k = 0
    for node, cidr in zip(topo.nodes, cidrs, strict=True):
        gateway = str(next(cidr.hosts()))
        state.nodes.append(
            st.NodeState(
                name=node.name,
                netns=f"{prefix}node-{node.name}",
                fabric_ip=str(next(fabric_hosts)),
                pod_cidr=str(cidr),
                gateway=gateway,
            )
        )
        for pod in node.pods:
            state.pods.append(
                st.PodState(
                    name=pod.name,
                    namespace=pod.namespace,
                    service_account=pod.service_account,
                    node=node.name,
                    ip=str(ips[pod.name]),
                    netns=f"{prefix}pod-{pod.name}",
                    host_ifname=f"vp{k}",
                    gateway=gateway,
                    labels=dict(pod.labels),
                    annotations=dict(pod.annotations),
                )
            )
            k += 1
    vips = topo.service_addresses()
    for svc in topo.services:
        state.services.append(
            st.ServiceState(
                name=svc.name,
                namespace=svc.namespace,
                vip=str(vips[f"{svc.namespace}/{svc.name}"]),
                ports=[
                    {"port": p.port, "targetPort": p.target_port or p.port}
                    | ({"name": p.name} if p.name else {})
                    | ({"appProtocol": p.app_protocol} if p.app_protocol else {})
                    for p in svc.ports
                ],
                selector=dict(svc.selector),
                labels=dict(svc.labels),
            )
        )
    return state


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _netns_pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def destroy_prefix(prefix: str, known: Iterable[str] = ()) -> list[str]:
    """Remove the namespaces in `known` and every other one whose name starts with `prefix`.

    Processes still inside are killed first: a process keeps its netns (and the veths in it) alive after
    the name is gone, which would leak links and addresses.
    """
    if not prefix.startswith(st.PREFIX):
        raise LabError(f"refusing to remove namespaces outside the lab prefix {st.PREFIX!r}")
    targets = sorted({n for n in known if n.startswith(prefix)} | {n for n in _list_netns() if n.startswith(prefix)})
    present = set(_list_netns())
    for ns in targets:
        if ns in present:
            for pid in _netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    # Pods first, then nodes, then the fabric, so veth pairs die from one end only once.
    order = sorted(targets, key=lambda n: (0 if "-pod-" in n else 1 if "-node-" in n else 2, n))
    removed = []
    for ns in order:
        if ns not in present:
            continue
        for attempt in range(20):
            try:
                netns.remove(ns)
                removed.append(ns)
                break
            except OSError as e:
                if attempt == 19:
                    log.warning("cannot remove netns %s: %s", ns, e)
                time.sleep(0.05)
    return removed


def down_all() -> list[str]:
    """Remove every lab this tool created: all `nm-` namespaces and all state files, nothing else."""
    removed = destroy_prefix(st.PREFIX)
    for name in st.list_labs():
        with contextlib.suppress(FileNotFoundError):
            st.state_path(name).unlink()
    return removed

"""What the node agent needs from the host, each with the reason, in one place.

The DaemonSet manifest asks for exactly this (a test compares them), and the agent checks its effective
capabilities at start so a missing one is one clear line naming the capability and what it is for,
not a failure deep inside a netlink or bpf call.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linux capability numbers (linux/capability.h).
CAP_NUMBERS = {
    "NET_ADMIN": 12,
    "SYS_PTRACE": 19,
    "SYS_ADMIN": 21,
    "PERFMON": 38,
    "BPF": 39,
}

CAPABILITIES: dict[str, str] = {  # for the eBPF backend (the default); see BACKEND_CAPABILITIES
    "NET_ADMIN": "policy routes, rules and nftables in pod namespaces; SO_MARK and IP_TRANSPARENT on proxy sockets",
    "SYS_ADMIN": "setns() into pod network namespaces to create listeners there; mounting bpffs",
    "BPF": "loading the sk_lookup program and creating its maps",
    "PERFMON": "bcc's program loading on kernels that gate some helpers behind it",
    "SYS_PTRACE": "reading /proc/<pid>/ns/net of pod sandboxes to find each pod's network namespace",
}


# The nftables backend loads no eBPF program, so it needs neither CAP_BPF nor CAP_PERFMON.
BACKEND_CAPABILITIES: dict[str, frozenset[str]] = {
    "ebpf": frozenset(CAPABILITIES),
    "nftables": frozenset(CAPABILITIES) - {"BPF", "PERFMON"},
}


@dataclass(frozen=True)
class HostPath:
    name: str
    path: str
    read_only: bool
    reason: str
    propagation: str | None = None
    backends: frozenset[str] = frozenset({"ebpf", "nftables"})
    mount_path: str = ""  # where the container sees it; the host path when empty

    @property
    def container_path(self) -> str:
        return self.mount_path or self.path


HOST_PATHS: tuple[HostPath, ...] = (
    HostPath("bpffs", "/sys/fs/bpf", False, "pinned sk_lookup links and maps survive agent restarts",
             "Bidirectional", frozenset({"ebpf"})),
    HostPath("host-proc", "/proc", True, "find each pod's network namespace from its sandbox process",
             mount_path="/host/proc"),
    HostPath("netns", "/var/run/netns", True, "pod network namespaces named by the container runtime",
             "HostToContainer"),
    HostPath("kernel-modules", "/lib/modules", True, "kernel headers bcc compiles the eBPF programs against",
             None, frozenset({"ebpf"})),
    HostPath("kernel-src", "/usr/src", True, "the header trees /lib/modules/*/build links point into",
             None, frozenset({"ebpf"})),
    HostPath("cni-socket", "/var/run/nodemesh", False, "the socket the chained CNI plugin waits on"),
    HostPath("cni-bin", "/opt/cni/bin", False, "installing the nodemesh-cni plugin executable for the runtime",
             mount_path="/host/opt/cni/bin"),
    HostPath("cni-conf", "/etc/cni/net.d", False,
             "chaining the plugin into the node's network config, and its kubeconfig (0600) for agent outages",
             mount_path="/host/etc/cni/net.d"),
)

# Where the host's /proc is mounted inside the agent container (the container's own /proc is its own).
HOST_PROC_IN_CONTAINER = "/host/proc"


def effective_capabilities(status_path: str = "/proc/self/status") -> set[str]:
    """Names from CAPABILITIES that this process holds in its effective set."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in CAP_NUMBERS.items() if mask & (1 << bit)}
    return set()


def host_paths(backend: str) -> tuple[HostPath, ...]:
    return tuple(h for h in HOST_PATHS if backend in h.backends)


def missing_capabilities(backend: str = "ebpf", status_path: str = "/proc/self/status") -> dict[str, str]:
    """The capabilities the agent lacks for `backend`, with what each is for ({} when all are there)."""
    have = effective_capabilities(status_path)
    # CAP_SYS_ADMIN covers bpf() and perf on kernels before CAP_BPF/CAP_PERFMON existed, and still
    # implies them for loading programs.
    if "SYS_ADMIN" in have:
        have |= {"BPF", "PERFMON"}
    need = BACKEND_CAPABILITIES[backend]
    return {name: why for name, why in CAPABILITIES.items() if name in need and name not in have}

"""The one place that loads, attaches, pins and detaches the agent's eBPF program.

Lifecycle, and why:

* **Compile once per process.** The controller compiles ``bpf/sk_lookup.c`` (in a loader
  child, see :func:`compile_in_child`) the first time it needs it and reuses the program;
  every pod namespace gets a link to that one program, and per-pod settings are map
  entries keyed by pod IP (the C file says why not by namespace).
* **One link per pod namespace, pinned.** ``BPF_LINK_CREATE`` attaches the program to the
  namespace; the link is pinned at ``<bpffs root>/netns-<cookie>/link`` so it outlives the
  agent process: a crashed or upgraded agent leaves steering in place (and, with its
  listeners gone, refusing connections instead of bypassing the mesh).
* **Re-adoption swaps the program, not the link.** A restarted agent compiles a fresh
  program with fresh maps, fills them for each pod it finds, then ``BPF_LINK_UPDATE``\\ s
  the pinned link to the new program: one atomic switch per namespace, no detach window.
  The old program and its maps go away with their last link.
* **Removal is exact.** Detach the link (``BPF_LINK_DETACH``, so it stops even if someone
  else holds an fd), unpin it, remove the directory, delete every map key of the pod.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from agent.redirect import bpf_syscall as sysbpf
from agent.redirect.model import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, RedirectUnavailable

log = logging.getLogger(__name__)

PROG_NAME = "nm_sk_lookup"
SOURCE_NAME = "sk_lookup.c"
LINK_PIN_NAME = "link"
PIN_DIR_PREFIX = "netns-"
BPF_FS_MAGIC = "bpf"

SLOT_OUTBOUND, SLOT_INBOUND, SLOT_HBONE = 0, 1, 2
SLOT_BY_PORT = {OUTBOUND_PORT: SLOT_OUTBOUND, INBOUND_PORT: SLOT_INBOUND, HBONE_PORT: SLOT_HBONE}
COUNTER_NAMES = ("inbound_steered", "outbound_steered", "passed_node", "passed_excluded_port", "refused_no_listener",
                 "passed_agent")
MAP_NAMES = ("pods", "in_excluded", "node_srcs", "listeners", "counters", "agent_conns")


def source_path() -> Path:
    """Where ``sk_lookup.c`` is: ``$NODEMESH_BPF_DIR`` if set, else the project's ``bpf/``."""
    env = os.environ.get("NODEMESH_BPF_DIR")
    if env:
        return Path(env) / SOURCE_NAME
    return Path(__file__).resolve().parents[2] / "bpf" / SOURCE_NAME


def kernel_headers_dir() -> str | None:
    """The header tree bcc will compile against, or None when there is none."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return env if os.path.isdir(os.path.join(env, "include")) else None
    build = f"/lib/modules/{platform.release()}/build"
    if os.path.isdir(os.path.join(build, "include")):
        return build
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None


def preflight() -> None:
    """Check, cheapest first, everything eBPF redirection needs; raise one clear reason.

    Raises :class:`RedirectUnavailable` whose ``cause`` names the missing piece: bcc, the
    kernel's sk_lookup support, the capabilities, or the kernel headers.
    """
    import importlib.util

    if importlib.util.find_spec("bcc") is None:  # found, not imported: the agent never maps LLVM
        raise RedirectUnavailable("ebpf", "bcc is not installed (Debian package python3-bpfcc)")
    try:
        sysbpf.probe_sk_lookup()
    except sysbpf.BpfError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            cause = "not permitted to load eBPF programs (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
        elif exc.errno == errno.EINVAL:
            cause = "the kernel does not support sk_lookup programs (needs Linux 5.9 or newer)"
        elif exc.errno == errno.ENOSYS:
            cause = "the kernel has no bpf() system call"
        else:
            cause = f"the kernel refused a test sk_lookup program: {os.strerror(exc.errno)}"
        raise RedirectUnavailable("ebpf", cause) from None
    if kernel_headers_dir() is None:
        where = os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{platform.release()}/build"
        raise RedirectUnavailable(
            "ebpf", f"kernel headers for {platform.release()} are missing (looked in {where}; bcc needs them)"
        )
    if not source_path().is_file():
        raise RedirectUnavailable("ebpf", f"the program source {source_path()} is missing")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what clang/libbpf print on fd 2 while compiling, for one error line instead of pages."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def _first_error(lines: list[str]) -> str:
    for line in lines:
        if "error" in line.lower() or "cannot" in line.lower() or "invalid" in line.lower():
            return line.strip()
    return lines[-1].strip() if lines else "no detail"


def compile_with_bcc(max_pods: int) -> tuple[object, int, dict[str, int]]:
    """Compile and load the program with bcc in *this* process: (the bcc object, program fd, map fds).

    Only the loader child calls this (see ``compile_in_child``): bcc maps LLVM and clang into the
    process, well over 100 MB that the long-running agent should not carry.
    """
    import bcc
    from bcc.libbcc import lib

    src = source_path()
    cflags = [f"-DMAX_PODS={int(max_pods)}"]
    with _stderr_captured() as out:
        try:
            bpf = bcc.BPF(src_file=os.fsencode(src), cflags=cflags)
            fn = bpf.load_func(PROG_NAME.encode(), sysbpf.BPF_PROG_TYPE_SK_LOOKUP, attach_type=sysbpf.BPF_SK_LOOKUP)
        except Exception as exc:
            failure: Exception | None = exc
        else:
            failure = None
    if failure is not None:
        text = str(failure)
        if "compile" in text.lower() or "headers" in " ".join(out).lower():
            cause = f"compiling {src.name} failed: {_first_error(out)}"
        elif "Permission" in text or "Operation not permitted" in text:
            cause = "not permitted to load eBPF programs (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
        else:
            cause = f"loading {src.name} failed: {text}; {_first_error(out)}"
        raise RedirectUnavailable("ebpf", cause)
    maps: dict[str, int] = {}
    for name in MAP_NAMES:
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd < 0:
            raise RedirectUnavailable("ebpf", f"map {name} missing from {src.name}")
        maps[name] = fd
    return bpf, fn.fd, maps


def compile_in_child(max_pods: int, timeout: float = 120.0) -> tuple[int, dict[str, int]]:
    """Have a short-lived child (``python -m agent.redirect.loader``) compile and load the program and
    hand over the program and map fds over a unix socket; the kernel objects live on in this process."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.redirect.loader", str(child.fileno()), str(int(max_pods))],
            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        child.close()
        parent.settimeout(timeout)
        try:
            msg, fds, _, _ = socket.recv_fds(parent, 65536, len(MAP_NAMES) + 1)
        except (TimeoutError, OSError) as exc:
            proc.kill()
            raise RedirectUnavailable("ebpf", f"the program loader did not answer: {exc}") from None
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    finally:
        parent.close()
        with contextlib.suppress(OSError):
            child.close()
    if not msg:
        raise RedirectUnavailable("ebpf", f"the program loader exited with status {proc.returncode}")
    reply = json.loads(msg)
    if "error" in reply:
        for fd in fds:
            os.close(fd)
        raise RedirectUnavailable("ebpf", reply["error"])
    names = reply["maps"]
    if len(fds) != len(names) + 1:
        for fd in fds:
            os.close(fd)
        raise RedirectUnavailable("ebpf", "the program loader handed over the wrong number of objects")
    return fds[0], dict(zip(names, fds[1:], strict=True))


@dataclass
class MapHandle:
    name: str
    fd: int
    key_size: int
    value_size: int
    type: int


class SkLookupProgram:
    """The compiled program and its maps, owned by this process.

    Not thread-safe for concurrent updates of one pod; the controller serialises per pod.
    """

    def __init__(self, max_pods: int = 1024) -> None:
        self.prog_fd, map_fds = compile_in_child(max_pods)
        self.prog_id = sysbpf.prog_info(self.prog_fd).id
        self.maps: dict[str, MapHandle] = {}
        for name in MAP_NAMES:
            fd = map_fds[name]
            info = sysbpf.map_info(fd)
            self.maps[name] = MapHandle(name, fd, info.key_size, info.value_size, info.type)
        self._ncpus = _possible_cpus()
        self._closed = False

    # -- per-pod map entries --------------------------------------------------------------

    def set_pod(
        self,
        pod_ip: IPv4Address,
        inbound_excluded: frozenset[int],
        node_sources: tuple[IPv4Network, ...],
        listener_fds: Mapping[int, int],
    ) -> None:
        """Make the maps say exactly this about one pod (stale keys of it are deleted).

        The ``pods`` entry is written last: until it exists the program ignores the pod, so
        a half-written configuration is never acted upon.
        """
        ip = pod_ip.packed
        want_ports = {struct.pack("=4sI", ip, p) for p in inbound_excluded}
        want_nodes = {
            struct.pack("=I4s4s", 32 + n.prefixlen, ip, n.network_address.packed) for n in node_sources
        }
        self._sync("in_excluded", ip, want_ports, b"\x01")
        self._sync("node_srcs", ip, want_nodes, b"\x01", key_offset=4)
        for port, fd in listener_fds.items():
            slot = SLOT_BY_PORT[port]
            sysbpf.map_update(self.maps["listeners"].fd, struct.pack("=4sI", ip, slot), struct.pack("=Q", fd))
        sysbpf.map_update(self.maps["pods"].fd, ip, struct.pack("=I", 0))

    def _sync(self, name: str, ip: bytes, want: set[bytes], value: bytes, key_offset: int = 0) -> None:
        m = self.maps[name]
        for key in sysbpf.map_keys(m.fd, m.key_size):
            if key[key_offset : key_offset + 4] == ip and key not in want:
                sysbpf.map_delete(m.fd, key)
        for key in want:
            sysbpf.map_update(m.fd, key, value)

    def clear_pod(self, pod_ip: IPv4Address) -> None:
        """Delete every key of this pod from every map; the ``pods`` entry first."""
        ip = pod_ip.packed
        sysbpf.map_delete(self.maps["pods"].fd, ip)
        for name, off in (("in_excluded", 0), ("node_srcs", 4), ("listeners", 0), ("counters", 0),
                          ("agent_conns", 0)):
            m = self.maps[name]
            for key in sysbpf.map_keys(m.fd, m.key_size):
                if key[off : off + 4] == ip:
                    sysbpf.map_delete(m.fd, key)

    def agent_conn_key(self, pod_ip: IPv4Address, client_ip: str, client_port: int, app_port: int) -> bytes:
        return struct.pack("=4s4sHH", pod_ip.packed, socket.inet_aton(client_ip), client_port, app_port)

    def announce_agent_conn(self, key: bytes) -> None:
        """Let the next SYN with this (pod, client address, ports) reach the application, not 15006."""
        sysbpf.map_update(self.maps["agent_conns"].fd, key, b"\x01")

    def forget_agent_conn(self, key: bytes) -> None:
        sysbpf.map_delete(self.maps["agent_conns"].fd, key)

    def pod_entries(self, pod_ip: IPv4Address) -> dict[str, int]:
        """How many keys each map holds for this pod (what a leak check counts)."""
        return _pod_entries({n: (h.fd, h.key_size) for n, h in self.maps.items()}, pod_ip)

    def counters(self, pod_ip: IPv4Address) -> dict[str, int]:
        m = self.maps["counters"]
        return _read_counters(m.fd, m.value_size, self._ncpus, pod_ip)

    def close(self) -> None:
        """Release this process's hold on the program; links attached elsewhere keep it alive."""
        if self._closed:
            return
        self._closed = True
        for fd in [self.prog_fd, *(m.fd for m in self.maps.values())]:
            with contextlib.suppress(OSError):
                os.close(fd)


def _pod_entries(maps: Mapping[str, tuple[int, int]], pod_ip: IPv4Address) -> dict[str, int]:
    ip = pod_ip.packed
    out: dict[str, int] = {}
    for name, (fd, key_size) in maps.items():
        off = 4 if name == "node_srcs" else 0
        out[name] = sum(1 for k in sysbpf.map_keys(fd, key_size) if k[off : off + 4] == ip)
    return out


def _read_counters(fd: int, value_size: int, ncpus: int, pod_ip: IPv4Address) -> dict[str, int]:
    out: dict[str, int] = {}
    stride = (value_size + 7) // 8 * 8
    for i, name in enumerate(COUNTER_NAMES):
        raw = sysbpf.map_lookup(fd, struct.pack("=4sI", pod_ip.packed, i), stride * ncpus)
        out[name] = 0 if raw is None else sum(struct.unpack_from("=Q", raw, c * stride)[0] for c in range(ncpus))
    return out


def _possible_cpus() -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += int(b or a) - int(a) + 1
    return n


# --- bpffs ----------------------------------------------------------------------------------


def _mount_fstype(path: str) -> str | None:
    """The filesystem type of the mount that holds ``path`` (longest matching mount point)."""
    best, fstype = "", None
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].encode().decode("unicode_escape")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, right.split()[0]
    except OSError:
        return None
    return fstype


def ensure_bpffs(root: str) -> None:
    """Make sure ``root`` sits on a bpffs (mounting one at its bpffs parent if none) and exists."""
    root = os.path.abspath(root)
    if _mount_fstype(root) != BPF_FS_MAGIC:
        mountpoint = "/sys/fs/bpf"
        if not root.startswith(mountpoint + "/"):
            raise RedirectUnavailable("ebpf", f"{root} is not on a bpf filesystem")
        os.makedirs(mountpoint, exist_ok=True)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.mount(b"bpf", mountpoint.encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise RedirectUnavailable("ebpf", f"cannot mount a bpf filesystem on {mountpoint}: {os.strerror(err)}")
        log.info("mounted bpffs on %s", mountpoint)
    os.makedirs(root, mode=0o700, exist_ok=True)


def pin_dir(root: str, cookie: int) -> str:
    return os.path.join(root, f"{PIN_DIR_PREFIX}{cookie}")


@dataclass
class AttachedLink:
    fd: int
    pin_path: str
    adopted: bool
    info: sysbpf.LinkInfo = field(repr=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def attach_or_adopt(program: SkLookupProgram, netns_fd: int, netns_ino: int, root: str, cookie: int) -> AttachedLink:
    """Give the namespace a link to ``program``: reuse a pinned one if it is ours and still
    attached there (pointing it at this program), else create and pin a new one."""
    d = pin_dir(root, cookie)
    path = os.path.join(d, LINK_PIN_NAME)
    if os.path.exists(path):
        fd = sysbpf.obj_get(path)
        try:
            info = sysbpf.link_info(fd)
            if info.is_sk_lookup and info.netns_ino == netns_ino:
                if info.prog_id != program.prog_id:
                    sysbpf.link_update(fd, program.prog_fd)
                    info = sysbpf.link_info(fd)
                return AttachedLink(fd, path, True, info)
            # A pin for a namespace that is gone or was replaced: not this pod's any more.
            with contextlib.suppress(sysbpf.BpfError):
                sysbpf.link_detach(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        os.unlink(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd = sysbpf.link_create_netns(program.prog_fd, netns_fd)
    try:
        sysbpf.obj_pin(fd, path)
        return AttachedLink(fd, path, False, sysbpf.link_info(fd))
    except BaseException:
        with contextlib.suppress(OSError):
            sysbpf.link_detach(fd)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(d)
        raise


def detach_link_id(link_id: int) -> bool:
    """Detach a link found by id (an operator's cleanup); False if it is already gone."""
    try:
        fd = sysbpf.link_fd_by_id(link_id)
    except sysbpf.BpfError:
        return False
    try:
        sysbpf.link_detach(fd)
    except sysbpf.BpfError:
        return False
    finally:
        os.close(fd)
    return True


def detach_pinned(pin_path: str, link_fd: int | None = None) -> bool:
    """Detach and unpin one pinned link and drop its directory; False if nothing was there."""
    found = False
    fd = link_fd
    opened = False
    if fd is None or fd < 0:
        try:
            fd = sysbpf.obj_get(pin_path)
            opened = True
        except sysbpf.BpfError:
            fd = None
    if fd is not None:
        found = True
        with contextlib.suppress(sysbpf.BpfError):
            sysbpf.link_detach(fd)
        if opened:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin_path)
        found = True
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(pin_path))
    return found


# --- inspection (for status and cleanup; works on any process's objects) ---------------------


@dataclass(frozen=True)
class NetnsLinkView:
    link_id: int
    prog_id: int
    prog_name: str
    pinned_at: str | None
    map_ids: dict[str, int]

    @property
    def ours(self) -> bool:
        return self.prog_name == PROG_NAME


def links_in_netns(netns_ino: int, pins: Mapping[int, str] | None = None) -> list[NetnsLinkView]:
    """Every sk_lookup link attached to the namespace with this inode, whoever made it."""
    out: list[NetnsLinkView] = []
    for lid in sysbpf.link_ids():
        try:
            fd = sysbpf.link_fd_by_id(lid)
        except sysbpf.BpfError:
            continue
        try:
            info = sysbpf.link_info(fd)
        finally:
            os.close(fd)
        if not info.is_sk_lookup or info.netns_ino != netns_ino:
            continue
        name, maps = "", {}
        with contextlib.suppress(sysbpf.BpfError):
            pfd = sysbpf.prog_fd_by_id(info.prog_id)
            try:
                pinfo = sysbpf.prog_info(pfd)
                name = pinfo.name
                for mid in pinfo.map_ids:
                    mfd = sysbpf.map_fd_by_id(mid)
                    try:
                        maps[sysbpf.map_info(mfd).name] = mid
                    finally:
                        os.close(mfd)
            finally:
                os.close(pfd)
        out.append(NetnsLinkView(lid, info.prog_id, name, (pins or {}).get(lid), maps))
    return out


def pinned_links(root: str) -> dict[int, str]:
    """link id → pin path for every link pinned under ``root``."""
    out: dict[int, str] = {}
    if not os.path.isdir(root):
        return out
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry, LINK_PIN_NAME)
        if not entry.startswith(PIN_DIR_PREFIX) or not os.path.exists(path):
            continue
        try:
            fd = sysbpf.obj_get(path)
        except sysbpf.BpfError:
            continue
        try:
            out[sysbpf.link_info(fd).id] = path
        finally:
            os.close(fd)
    return out


def map_entries_for(view: NetnsLinkView, pod_ip: IPv4Address) -> tuple[dict[str, int], dict[str, int]]:
    """(keys per map, counters) that the program behind ``view`` holds for ``pod_ip``."""
    fds: dict[str, tuple[int, int]] = {}
    infos: dict[str, sysbpf.MapInfo] = {}
    try:
        for name in MAP_NAMES:
            if name not in view.map_ids:
                continue
            fd = sysbpf.map_fd_by_id(view.map_ids[name])
            infos[name] = sysbpf.map_info(fd)
            fds[name] = (fd, infos[name].key_size)
        entries = _pod_entries(fds, pod_ip)
        counters: dict[str, int] = {}
        if "counters" in fds:
            counters = _read_counters(fds["counters"][0], infos["counters"].value_size, _possible_cpus(), pod_ip)
        return entries, counters
    finally:
        for fd, _ in fds.values():
            os.close(fd)


def pod_ips_in(view: NetnsLinkView) -> list[IPv4Address]:
    """The pod IPs the program behind ``view`` manages (keys of its ``pods`` map)."""
    if "pods" not in view.map_ids:
        return []
    fd = sysbpf.map_fd_by_id(view.map_ids["pods"])
    try:
        return [IPv4Address(k) for k in sysbpf.map_keys(fd, 4)]
    finally:
        os.close(fd)

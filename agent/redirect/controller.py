"""Per-pod redirection: install, re-adopt, remove. The API the agent uses.

::

    ctl = RedirectController(backend="auto")          # or "ebpf" / "nftables"
    red = ctl.install(PodNetInfo(uid, "/run/netns/x", ip, exclusions=..., node_addresses=...))
    server = await loop.create_server(factory, sock=red.listeners.inbound)
    ...
    ctl.remove(uid)

``install`` is idempotent and is also how a restarted agent takes a pod back: when it
finds the pod's steering already in the kernel (a pinned link, our rules, our nftables
table), it keeps it, fills this process's maps, opens fresh listeners and swaps the link
to this process's program; nothing a live connection depends on is deleted and re-added.
``adopt_existing`` does that for every pod in the state directory whose namespace can be
re-opened by path.

Backend choice: ``"auto"`` tries eBPF and, if anything it needs is missing, logs one line
naming the cause and the fallback (nftables), and records both in ``fallback_reason``.
An explicit backend that cannot work raises :class:`RedirectUnavailable` instead.

One controller per agent process: it compiles the eBPF program once (lazily, or eagerly
with :meth:`prepare`) and attaches it to every pod namespace. Methods are thread-safe;
the ``*_async`` variants run them on a worker thread for use from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.redirect import ebpf, nftables, routing
from agent.redirect import state as st
from agent.redirect.listeners import PodListeners, create_listeners, marked_socket
from agent.redirect.model import (
    BACKENDS,
    DEFAULT_BPFFS_ROOT,
    DEFAULT_STATE_DIR,
    PodNetInfo,
    RedirectError,
    RedirectUnavailable,
)
from agent.redirect.status import NetnsStatus, inspect_netns
from mesh.netns import NetnsError, NetnsRef, NetnsWorker, netns_cookie, open_netns

log = logging.getLogger("nodemesh.redirect")


@dataclass
class PodRedirection:
    """A pod whose TCP this process now captures.

    ``listeners`` are listening, non-blocking sockets in the pod's namespace, for
    ``loop.create_server(sock=...)``. ``adopted`` tells whether the kernel side was found
    in place (agent restart) rather than created. The controller keeps the pod's
    namespace open (``netns_fd``) until :meth:`RedirectController.remove`.
    """

    pod: PodNetInfo
    backend: str
    listeners: PodListeners
    netns_fd: int
    netns_cookie: int
    netns_ino: int
    adopted: bool
    pin_path: str | None = None
    # The eBPF program steering this pod (None with nftables): the proxy announces its own
    # client-address-preserving connections to the application through it.
    program: ebpf.SkLookupProgram | None = field(default=None, repr=False)
    _link: ebpf.AttachedLink | None = field(default=None, repr=False)
    _worker: NetnsWorker | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def uid(self) -> str:
        return self.pod.uid

    def _netns_worker(self) -> NetnsWorker:
        with self._lock:
            if self._worker is None:
                self._worker = NetnsWorker(self.netns_fd, name=f"netns-{self.pod.label}")
            return self._worker

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new marked socket in the pod's namespace, for the agent's own connections
        made on the pod's behalf (they leave with the pod's IP and are never captured)."""
        return self._netns_worker().run(marked_socket, family, type)

    async def socket_async(self) -> socket.socket:
        """`socket()` without blocking the event loop (the namespace hop runs on the pod's worker)."""
        return await self._netns_worker().arun(marked_socket)

    def _release(self) -> None:
        """Close what this process holds for the pod; kernel state is not touched."""
        self.listeners.close()
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None
        if self._link is not None:
            self._link.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1


class RedirectController:
    def __init__(
        self,
        backend: str = "auto",
        bpffs_root: str = DEFAULT_BPFFS_ROOT,
        state_dir: str = DEFAULT_STATE_DIR,
        max_pods: int = 1024,
    ) -> None:
        if backend not in (*BACKENDS, "auto"):
            raise RedirectError(f"redirect backend {backend!r}: choose one of auto, ebpf, nftables")
        self.requested = backend
        self.bpffs_root = os.path.abspath(bpffs_root)
        self.state_dir = os.path.abspath(state_dir)
        self.max_pods = max_pods
        self.fallback_reason: str | None = None
        self._backend: str | None = None
        self._program: ebpf.SkLookupProgram | None = None
        self._pods: dict[str, PodRedirection] = {}
        self._lock = threading.RLock()

    # -- backend --------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend in use ("ebpf" or "nftables"), deciding it on first use."""
        with self._lock:
            if self._backend is None:
                self._backend = self._resolve()
            return self._backend

    def prepare(self) -> str:
        """Decide the backend and compile the program now (agent start-up) rather than at
        the first pod; returns the backend."""
        return self.backend

    def _resolve(self) -> str:
        if self.requested == "nftables":
            nftables.check_available()
            return "nftables"
        try:
            self._program = self._load_ebpf()
            return "ebpf"
        except RedirectUnavailable as exc:
            if self.requested == "ebpf":
                raise
            nftables.check_available()
            self.fallback_reason = exc.cause
            log.warning("eBPF redirection unavailable: %s; falling back to the nftables backend", exc.cause)
            return "nftables"

    def _load_ebpf(self) -> ebpf.SkLookupProgram:
        ebpf.preflight()
        ebpf.ensure_bpffs(self.bpffs_root)
        return ebpf.SkLookupProgram(max_pods=self.max_pods)

    def _ebpf_program(self) -> ebpf.SkLookupProgram:
        """The program, also when the chosen backend is nftables but a pod must be taken
        back from eBPF (its old maps are then only needed to be cleaned, not filled)."""
        if self._program is None:
            self._program = self._load_ebpf()
        return self._program

    # -- install / adopt ------------------------------------------------------------------

    def install(self, pod: PodNetInfo) -> PodRedirection:
        """Capture the pod's TCP; return its listeners. Idempotent; re-adopts (see module doc)."""
        with self._lock:
            backend = self.backend
            existing = self._pods.get(pod.uid)
            if existing is not None:
                return self._reconfigure(existing, pod)
            for other in self._pods.values():
                if other.pod.ip == pod.ip:
                    raise RedirectError(f"pod {pod.label}: IP {pod.ip} is already used by pod {other.pod.label}")
            try:
                netns_fd = open_netns(pod.netns)
            except NetnsError as exc:
                raise RedirectError(f"pod {pod.label}: {exc.strerror}") from None
            try:
                return self._install_in(pod, netns_fd, backend)
            except BaseException:
                os.close(netns_fd)
                raise

    def _install_in(self, pod: PodNetInfo, netns_fd: int, backend: str) -> PodRedirection:
        st_ = os.fstat(netns_fd)
        cookie = netns_cookie(netns_fd)
        try:
            sysctls_now = routing.read_sysctls(netns_fd, pod.eth0)
        except FileNotFoundError:
            raise RedirectError(f"pod {pod.label}: interface {pod.eth0!r} not found in its namespace") from None
        prior = st.load(self.state_dir, pod.uid)
        if prior is not None and (prior.netns_cookie != cookie or prior.ip != pod.ip):
            # The record is of an earlier incarnation (another namespace or address).
            self._purge_record(prior)
            prior = None
        if prior is not None and prior.backend != backend:
            # Installed by an agent that used the other backend: take that down first.
            self._remove_kernel_state(prior, netns_fd)
            prior = None
        sysctls_before = prior.sysctls_before if prior is not None else sysctls_now
        # Was this pod's steering already in the kernel (an agent restart)? Then a failure
        # below must leave it alone: steering without listeners refuses connections, while
        # tearing it down would let the pod's traffic bypass the mesh.
        if backend == "ebpf":
            pin = os.path.join(ebpf.pin_dir(self.bpffs_root, cookie), ebpf.LINK_PIN_NAME)
            preexisting = prior is not None or os.path.exists(pin)
        else:
            preexisting = prior is not None or nftables.installed(netns_fd) is not None

        listeners = create_listeners(netns_fd)
        red = PodRedirection(
            pod=pod,
            backend=backend,
            listeners=listeners,
            netns_fd=netns_fd,
            netns_cookie=cookie,
            netns_ino=st_.st_ino,
            adopted=False,
        )
        record = st.PodRecord(
            uid=pod.uid,
            name=pod.name,
            namespace=pod.namespace,
            netns_path=None if isinstance(pod.netns, int) else os.path.abspath(_resolve_path(pod.netns)),
            netns_cookie=cookie,
            netns_ino=st_.st_ino,
            ip=pod.ip,
            eth0=pod.eth0,
            backend=backend,
            exclusions=pod.exclusions,
            node_addresses=pod.node_addresses,
            sysctls_before=sysctls_before,
        )
        try:
            if backend == "ebpf":
                self._install_ebpf(red, sysctls_now)
                record.pin_path = red.pin_path
            else:
                nftables.apply(netns_fd, self._nft_plan(pod))
                routing.apply(netns_fd, routing.plan_rules_nftables(), routing.plan_routes(pod.ip))
            st.save(self.state_dir, record)
            red.adopted = preexisting
        except BaseException:
            if not preexisting:
                # A fresh install failed half way: take down what was put up.
                with contextlib.suppress(Exception):
                    self._remove_kernel_state(record, netns_fd)
                st.delete(self.state_dir, pod.uid)
            red.netns_fd = -1  # the caller closes it
            red._release()
            raise
        self._pods[pod.uid] = red
        log.info(
            "redirecting pod %s (%s) with %s%s",
            pod.label,
            pod.ip,
            backend,
            " (adopted)" if red.adopted else "",
        )
        return red

    def _install_ebpf(self, red: PodRedirection, sysctls_now: dict[str, int]) -> None:
        """Fill maps, then sysctls, attach (or adopt) the link, and routing last."""
        pod = red.pod
        prog = self._ebpf_program()
        prog.set_pod(
            pod.ip,
            pod.exclusions.inbound_ports,
            pod.all_node_addresses(),
            {port: s.fileno() for port, s in red.listeners.by_port().items()},
        )
        # On failure the caller removes all of it for a fresh install, and keeps it (pod
        # entry without listeners: connections refused, never bypassing) for an adoption.
        routing.write_sysctls(red.netns_fd, routing.plan_sysctls(sysctls_now, pod.eth0))
        link = ebpf.attach_or_adopt(prog, red.netns_fd, red.netns_ino, self.bpffs_root, red.netns_cookie)
        red._link = link
        red.pin_path = link.pin_path
        red.program = prog
        routing.apply(
            red.netns_fd,
            routing.plan_rules(pod.exclusions, pod.all_node_addresses()),
            routing.plan_routes(pod.ip),
        )

    def _nft_plan(self, pod: PodNetInfo) -> nftables.NftPlan:
        return nftables.render(pod.ip, pod.all_node_addresses(), pod.exclusions)

    def _reconfigure(self, red: PodRedirection, pod: PodNetInfo) -> PodRedirection:
        """Install called again for a pod already here: apply changed exclusions in place."""
        if os.fstat(red.netns_fd).st_ino != _ino_of(pod.netns) or pod.ip != red.pod.ip:
            raise RedirectError(
                f"pod {pod.label}: already redirected in another namespace or with another IP; remove it first"
            )
        if pod == red.pod:
            return red
        if red.backend == "ebpf":
            prog = self._ebpf_program()
            prog.set_pod(
                pod.ip,
                pod.exclusions.inbound_ports,
                pod.all_node_addresses(),
                {port: s.fileno() for port, s in red.listeners.by_port().items()},
            )
            routing.apply(
                red.netns_fd, routing.plan_rules(pod.exclusions, pod.all_node_addresses()), routing.plan_routes(pod.ip)
            )
        else:
            nftables.apply(red.netns_fd, self._nft_plan(pod))
        red.pod = pod
        record = st.load(self.state_dir, pod.uid)
        if record is not None:
            record.exclusions = pod.exclusions
            record.node_addresses = pod.node_addresses
            st.save(self.state_dir, record)
        return red

    def adopt_existing(self) -> list[PodRedirection]:
        """Take back every pod a previous agent process left redirected (see module doc).

        Records whose namespace is gone are cleaned up (pins, map keys, state file);
        records made from an fd are left for the caller, who must call :meth:`install`
        with a fresh fd (as the CNI re-sends its snapshot).
        """
        adopted: list[PodRedirection] = []
        records, problems = st.load_all(self.state_dir)
        for p in problems:
            log.warning("skipping unreadable redirect state: %s", p)
        for rec in records:
            if rec.uid in self._pods:
                adopted.append(self._pods[rec.uid])
                continue
            if rec.netns_path is None:
                continue
            try:
                fd = open_netns(rec.netns_path)
            except NetnsError:
                log.info("pod %s: namespace %s is gone; cleaning up its redirection", rec.uid, rec.netns_path)
                self._purge_record(rec)
                continue
            try:
                if netns_cookie(fd) != rec.netns_cookie:
                    log.info("pod %s: %s is another namespace now; cleaning up", rec.uid, rec.netns_path)
                    self._purge_record(rec)
                    continue
            finally:
                os.close(fd)
            pod = PodNetInfo(
                uid=rec.uid,
                netns=rec.netns_path,
                ip=rec.ip,
                eth0=rec.eth0,
                name=rec.name,
                namespace=rec.namespace,
                exclusions=rec.exclusions,
                node_addresses=rec.node_addresses,
            )
            try:
                adopted.append(self.install(pod))
            except RedirectError as exc:
                log.error("pod %s: could not re-adopt its redirection: %s", rec.uid, exc)
        return adopted

    # -- removal --------------------------------------------------------------------------

    def remove(self, pod_uid: str) -> bool:
        """Undo everything installed for the pod; returns False if there was nothing."""
        with self._lock:
            red = self._pods.pop(pod_uid, None)
            record = st.load(self.state_dir, pod_uid)
            if red is None and record is None:
                return False
            if red is not None:
                rec = record or self._record_of(red)
                try:
                    self._remove_kernel_state(rec, red.netns_fd)
                finally:
                    red._release()
            else:
                assert record is not None
                self._purge_record(record)
            st.delete(self.state_dir, pod_uid)
            log.info("stopped redirecting pod %s", pod_uid)
            return True

    def _record_of(self, red: PodRedirection) -> st.PodRecord:
        return st.PodRecord(
            uid=red.uid,
            netns_path=None,
            netns_cookie=red.netns_cookie,
            netns_ino=red.netns_ino,
            ip=red.pod.ip,
            eth0=red.pod.eth0,
            backend=red.backend,
            pin_path=red.pin_path,
        )

    def _remove_kernel_state(self, rec: st.PodRecord, netns_fd: int | None) -> None:
        """Remove what ``rec`` describes; ``netns_fd`` None means the namespace is gone."""
        errors: list[str] = []

        def attempt(what: str, fn: Callable[..., object], *args: object) -> None:
            # Every step is tried even if an earlier one failed: leave as little as possible.
            try:
                fn(*args)
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        if rec.backend == "ebpf":
            if netns_fd is not None:
                attempt("routing", routing.remove, netns_fd)
            pin = rec.pin_path or os.path.join(ebpf.pin_dir(self.bpffs_root, rec.netns_cookie), ebpf.LINK_PIN_NAME)
            attempt("link", ebpf.detach_pinned, pin)
            if self._program is not None:
                attempt("maps", self._program.clear_pod, rec.ip)
            if netns_fd is not None:
                attempt("sysctls", self._restore_sysctls, netns_fd, rec)
        elif netns_fd is not None:
            attempt("nftables", nftables.remove, netns_fd)
            attempt("routing", routing.remove, netns_fd)
        if errors:
            raise RedirectError(f"pod {rec.uid}: removal incomplete: " + "; ".join(errors))

    def _restore_sysctls(self, netns_fd: int, rec: st.PodRecord) -> None:
        before = rec.sysctls_before or {f"{rec.eth0}/accept_local": 0}
        now = routing.read_sysctls(netns_fd, rec.eth0)
        routing.write_sysctls(netns_fd, {k: v for k, v in before.items() if now.get(k) != v})

    def _purge_record(self, rec: st.PodRecord) -> None:
        """Clean up after a record whose namespace may be gone; never raises for a gone one."""
        fd: int | None = None
        if rec.netns_path is not None:
            with contextlib.suppress(NetnsError):
                fd = open_netns(rec.netns_path)
                if netns_cookie(fd) != rec.netns_cookie:
                    os.close(fd)
                    fd = None
        try:
            self._remove_kernel_state(rec, fd)
        except RedirectError as exc:
            log.warning("%s", exc)
        finally:
            if fd is not None:
                os.close(fd)
        st.delete(self.state_dir, rec.uid)

    def remove_all(self) -> None:
        for uid in list(self._pods):
            self.remove(uid)

    def close(self) -> None:
        """Stop, leaving the kernel side in place for the next agent process to adopt.

        Listeners close (new connections are refused until a new agent adopts the pods),
        and this process's program and maps are released; pinned links keep them alive.
        """
        with self._lock:
            for red in self._pods.values():
                red._release()
            self._pods.clear()
            if self._program is not None:
                self._program.close()
                self._program = None

    # -- inspection -----------------------------------------------------------------------

    def pods(self) -> list[PodRedirection]:
        with self._lock:
            return list(self._pods.values())

    def get(self, pod_uid: str) -> PodRedirection | None:
        return self._pods.get(pod_uid)

    def status(self, netns: NetnsRef) -> NetnsStatus:
        """What is installed in a namespace (links, map entries, rules, nftables, listeners)."""
        return inspect_netns(netns, bpffs_root=self.bpffs_root, state_dir=self.state_dir)

    def counters(self, pod_uid: str) -> dict[str, int]:
        """Per-pod steering counters (eBPF backend; empty for nftables)."""
        red = self._pods.get(pod_uid)
        if red is None or red.backend != "ebpf" or self._program is None:
            return {}
        return self._program.counters(red.pod.ip)

    # -- asyncio faces --------------------------------------------------------------------

    async def install_async(self, pod: PodNetInfo) -> PodRedirection:
        return await asyncio.to_thread(self.install, pod)

    async def remove_async(self, pod_uid: str) -> bool:
        return await asyncio.to_thread(self.remove, pod_uid)


def _resolve_path(ns: str | os.PathLike[str]) -> str:
    """The path another process (a restarted agent, the CLI) can open for the same namespace."""
    path = os.fspath(ns)
    if "/" not in path:
        return os.path.join("/run/netns", path)
    for self_prefix in ("/proc/self/", "/proc/thread-self/"):
        if path.startswith(self_prefix):
            return f"/proc/{os.getpid()}/" + path[len(self_prefix) :]
    return path


def _ino_of(ns: NetnsRef) -> int:
    fd = open_netns(ns)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)

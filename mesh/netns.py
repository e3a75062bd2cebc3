"""Network namespaces: run code inside one without moving the whole process.

A socket belongs to the network namespace of the thread that created it, and keeps
that namespace for its whole life wherever it is used later. So the agent (and the
waypoint, and the tests) can own listeners and client sockets inside a pod's
namespace by creating them on a helper thread that has called ``setns(2)`` into that
namespace, then using them from the event loop as any other socket.

``setns`` changes only the calling thread, never the process, which is why this module
never calls it on a thread it did not start (the event loop thread, a pool thread):
every entry happens on a dedicated thread that restores its original namespace before
it ends. Python 3.11 has no ``os.setns``, hence the ``ctypes`` call.

A namespace is named by a path (``/run/netns/<name>``, ``/proc/<pid>/ns/net``), a bare
name (looked up under ``/run/netns``) or an open file descriptor; see :func:`open_netns`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import os
import queue
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "NETNS_RUN_DIR",
    "NetnsError",
    "NetnsId",
    "NetnsRef",
    "NetnsWorker",
    "netns_cookie",
    "netns_id",
    "open_netns",
    "run_in_netns",
    "socket_in_netns",
]

T = TypeVar("T")

#: Where ``ip netns add`` keeps its bind-mounted namespaces.
NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
#: ``SO_NETNS_COOKIE`` (Linux 5.14+): the 64-bit cookie of a socket's namespace, never reused while
#: the machine runs. The eBPF programs key their per-namespace state by it.
SO_NETNS_COOKIE = 71

NetnsRef = str | os.PathLike[str] | int


class NetnsError(OSError):
    """A namespace could not be opened or entered; the message names which one and why."""


@dataclass(frozen=True)
class NetnsId:
    """What identifies a namespace from outside: the nsfs inode and device (as ``ip netns identify``)."""

    dev: int
    ino: int


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def _resolve(ns: str | os.PathLike[str]) -> str:
    path = os.fspath(ns)
    if "/" not in path:
        path = os.path.join(NETNS_RUN_DIR, path)
    return path


def open_netns(ns: NetnsRef) -> int:
    """Return a new O_RDONLY|O_CLOEXEC fd for ``ns``; the caller closes it.

    Holding this fd keeps the namespace alive even after its last process exits, the way
    the agent holds a pod's namespace until the pod is removed.
    """
    if isinstance(ns, int):
        if ns < 0:
            raise NetnsError(errno.EBADF, f"netns fd {ns} is not a valid file descriptor")
        try:
            fd = os.dup(ns)
        except OSError as exc:
            raise NetnsError(exc.errno, f"netns fd {ns}: {exc.strerror}") from None
        label = f"fd {ns}"
    else:
        path = _resolve(ns)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(exc.errno, f"netns {path!r}: {exc.strerror}") from None
        label = repr(path)
    try:
        st = os.fstat(fd)
        # nsfs files are regular files on the nsfs pseudo filesystem; a plain file or a
        # directory here means the caller passed something that is not a namespace.
        if not stat.S_ISREG(st.st_mode) or not _is_netns_fd(fd):
            raise NetnsError(errno.EINVAL, f"netns {label} is not a network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


_NS_GET_NSTYPE = 0xB703  # ioctl: which kind of namespace an nsfs fd refers to


def _is_netns_fd(fd: int) -> bool:
    import fcntl

    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def netns_id(ns: NetnsRef) -> NetnsId:
    """The (device, inode) pair of a namespace, for comparing two references to it."""
    fd = open_netns(ns)
    try:
        st = os.fstat(fd)
        return NetnsId(dev=st.st_dev, ino=st.st_ino)
    finally:
        os.close(fd)


def _current_netns_fd() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _same_ns(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@contextlib.contextmanager
def _entered(target_fd: int) -> Iterator[None]:
    """Switch the *current thread* into ``target_fd`` and back; only for threads this module owns.

    Entering the namespace the thread is already in is skipped: it needs no privilege, which
    lets a process without CAP_SYS_ADMIN that was started inside a pod namespace still use
    this module on it.
    """
    home = _current_netns_fd()
    try:
        if _same_ns(home, target_fd):
            yield
            return
        _setns(target_fd)
        try:
            yield
        finally:
            # If this fails the thread is in the wrong namespace: nothing may run on it again.
            _setns(home)
    finally:
        os.close(home)


def run_in_netns(ns: NetnsRef, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on a fresh thread inside ``ns`` and return its result.

    Exceptions raised by ``fn`` propagate to the caller. Each call starts one short-lived
    thread; for many calls into the same namespace, keep a :class:`NetnsWorker`.
    """
    fd = open_netns(ns)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with _entered(fd):
                box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    try:
        t = threading.Thread(target=body, name="netns-call", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    return box["result"]


def socket_in_netns(
    ns: NetnsRef,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A new socket that lives in ``ns``, usable from any thread afterwards."""
    return run_in_netns(ns, socket.socket, family, type, proto)


def netns_cookie(ns: NetnsRef) -> int:
    """The namespace cookie, the same value ``bpf_get_netns_cookie()`` returns in eBPF programs."""

    def read() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

    return run_in_netns(ns, read)


class NetnsWorker:
    """One thread parked inside a namespace that runs submitted callables in order.

    For a hot path (the agent opening a client socket in a pod's namespace per proxied
    connection), starting a thread per call costs more than the work; this keeps one.
    The namespace is opened once at construction, so the worker keeps it alive until
    :meth:`close`.
    """

    def __init__(self, ns: NetnsRef, name: str = "netns-worker") -> None:
        self._fd = open_netns(ns)
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._lock = threading.Lock()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name=name, daemon=True)
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            os.close(self._fd)
            raise

    def _loop(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            ctx = _entered(self._fd)
            ctx.__enter__()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                fn, fut = item
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
        finally:
            ctx.__exit__(None, None, None)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("NetnsWorker is closed")
            fut: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._q.put((lambda: fn(*args, **kwargs), fut))
            return fut

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.submit(fn, *args, **kwargs).result()

    async def arun(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The asyncio face of :meth:`run`: awaits without blocking the event loop."""
        import asyncio

        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def socket(
        self,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        return self.run(socket.socket, family, type, proto)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(None)
        self._thread.join()
        os.close(self._fd)

    def __enter__(self) -> NetnsWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

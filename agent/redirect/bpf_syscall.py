"""The few ``bpf(2)`` commands bcc's Python API does not offer, called through ctypes.

bcc compiles and loads programs and hands back map and program fds; everything about
*links* (create, pin, update, detach, inspect) and sockhash updates goes through this
module. Layouts follow ``linux/bpf.h`` (uapi, stable): ``union bpf_attr`` is passed as a
zero-filled 144-byte buffer with the fields of one command set at their uapi offsets.

Every failure raises :class:`BpfError` carrying the command name and errno, so callers
can tell "not permitted" from "kernel too old" from "no such object".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

SYS_BPF = 321  # x86_64; the agent is built for x86_64 nodes (see docs/redirection.md)

# Commands (enum bpf_cmd).
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36  # enum bpf_attach_type
BPF_LINK_TYPE_NETNS = 5
BPF_MAP_TYPE_SOCKHASH = 18

_CMD_NAMES = {
    BPF_MAP_LOOKUP_ELEM: "MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "MAP_GET_NEXT_KEY",
    BPF_PROG_LOAD: "PROG_LOAD",
    BPF_OBJ_PIN: "OBJ_PIN",
    BPF_OBJ_GET: "OBJ_GET",
    BPF_PROG_GET_NEXT_ID: "PROG_GET_NEXT_ID",
    BPF_MAP_GET_NEXT_ID: "MAP_GET_NEXT_ID",
    BPF_PROG_GET_FD_BY_ID: "PROG_GET_FD_BY_ID",
    BPF_MAP_GET_FD_BY_ID: "MAP_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "OBJ_GET_INFO_BY_FD",
    BPF_LINK_CREATE: "LINK_CREATE",
    BPF_LINK_UPDATE: "LINK_UPDATE",
    BPF_LINK_GET_FD_BY_ID: "LINK_GET_FD_BY_ID",
    BPF_LINK_GET_NEXT_ID: "LINK_GET_NEXT_ID",
    BPF_LINK_DETACH: "LINK_DETACH",
}

_ATTR_SIZE = 144
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed; ``errno`` is the kernel's answer, ``command`` the command's name."""

    def __init__(self, err: int, command: str, detail: str = "") -> None:
        self.command = command
        msg = f"bpf({command}) failed: {os.strerror(err)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(err, msg)


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], detail: str = "") -> int:
    """Issue one bpf(2) command; returns the (non-negative) result or raises :class:`BpfError`."""
    ret = _libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, _CMD_NAMES.get(cmd, str(cmd)), detail)
    return int(ret)


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def _addr(obj: ctypes.Array[ctypes.c_char] | ctypes.Structure | ctypes._SimpleCData) -> int:
    return ctypes.addressof(obj)


# --- programs -------------------------------------------------------------------------------


def probe_sk_lookup() -> None:
    """Load (and drop) a two-instruction sk_lookup program that returns SK_PASS.

    This asks the kernel the two questions that decide whether eBPF redirection can work
    at all, without bcc or headers: does it know BPF_PROG_TYPE_SK_LOOKUP (Linux 5.9+),
    and may this process load it (CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN)? Raises
    :class:`BpfError` with EPERM or EINVAL accordingly.
    """
    insns = bytes([0xB7, 0, 0, 0, 1, 0, 0, 0]) + bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 1; exit
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(b"GPL")
    attr = _attr(
        (0, "I", BPF_PROG_TYPE_SK_LOOKUP),
        (4, "I", 2),
        (8, "Q", _addr(insn_buf)),
        (16, "Q", _addr(license_buf)),
        (68, "I", BPF_SK_LOOKUP),
    )
    fd = bpf(BPF_PROG_LOAD, attr, "probe for sk_lookup support")
    os.close(fd)


# --- objects in bpffs -----------------------------------------------------------------------


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, _attr((0, "Q", _addr(p)), (8, "I", fd)), path)


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, _attr((0, "Q", _addr(p))), path)


# --- links ----------------------------------------------------------------------------------


def link_create_netns(prog_fd: int, netns_fd: int) -> int:
    """Attach an sk_lookup program to a network namespace; returns the link fd."""
    attr = _attr((0, "I", prog_fd), (4, "I", netns_fd), (8, "I", BPF_SK_LOOKUP))
    return bpf(BPF_LINK_CREATE, attr, "attach sk_lookup to a netns")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Atomically point an existing link at another program (used on agent restart)."""
    bpf(BPF_LINK_UPDATE, _attr((0, "I", link_fd), (4, "I", new_prog_fd)))


def link_detach(link_fd: int) -> None:
    """Detach a link even if other fds or pins still reference it."""
    bpf(BPF_LINK_DETACH, _attr((0, "I", link_fd)))


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    netns_ino: int  # 0 once the namespace is gone (the link is then defunct)
    attach_type: int

    @property
    def is_sk_lookup(self) -> bool:
        return self.type == BPF_LINK_TYPE_NETNS and self.attach_type == BPF_SK_LOOKUP


def link_info(link_fd: int) -> LinkInfo:
    info = ctypes.create_string_buffer(48)
    bpf(BPF_OBJ_GET_INFO_BY_FD, _attr((0, "I", link_fd), (4, "I", len(info)), (8, "Q", _addr(info))))
    ltype, lid, prog_id = struct.unpack_from("III", info, 0)
    netns_ino, attach_type = struct.unpack_from("II", info, 16)
    return LinkInfo(id=lid, type=ltype, prog_id=prog_id, netns_ino=netns_ino, attach_type=attach_type)


def _ids(cmd: int) -> Iterator[int]:
    start = 0
    while True:
        attr = _attr((0, "I", start))
        try:
            bpf(cmd, attr)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        start = struct.unpack_from("I", attr, 4)[0]
        yield start


def link_ids() -> Iterator[int]:
    return _ids(BPF_LINK_GET_NEXT_ID)


def map_ids() -> Iterator[int]:
    return _ids(BPF_MAP_GET_NEXT_ID)


def link_fd_by_id(link_id: int) -> int:
    return bpf(BPF_LINK_GET_FD_BY_ID, _attr((0, "I", link_id)))


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, _attr((0, "I", prog_id)))


def map_fd_by_id(map_id: int) -> int:
    return bpf(BPF_MAP_GET_FD_BY_ID, _attr((0, "I", map_id)))


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


def prog_info(prog_fd: int) -> ProgInfo:
    ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(232)
    struct.pack_into("I", info, 52, 64)
    struct.pack_into("Q", info, 56, _addr(ids))
    bpf(BPF_OBJ_GET_INFO_BY_FD, _attr((0, "I", prog_fd), (4, "I", len(info)), (8, "Q", _addr(info))))
    ptype, pid = struct.unpack_from("II", info, 0)
    nr = struct.unpack_from("I", info, 52)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(id=pid, type=ptype, name=name, map_ids=tuple(ids[: min(nr, 64)]))


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(map_fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    bpf(BPF_OBJ_GET_INFO_BY_FD, _attr((0, "I", map_fd), (4, "I", len(info)), (8, "Q", _addr(info))))
    mtype, mid, ks, vs, me = struct.unpack_from("IIIII", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(id=mid, type=mtype, key_size=ks, value_size=vs, max_entries=me, name=name)


# --- map elements ---------------------------------------------------------------------------

BPF_ANY = 0


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, _attr((0, "I", map_fd), (8, "Q", _addr(k)), (16, "Q", _addr(v)), (24, "Q", flags)))


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete one key; returns False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(BPF_MAP_DELETE_ELEM, _attr((0, "I", map_fd), (8, "Q", _addr(k))))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, _attr((0, "I", map_fd), (8, "Q", _addr(k)), (16, "Q", _addr(v))))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """All keys of a map (a snapshot: keys added or removed meanwhile may be missed)."""
    keys: list[bytes] = []
    cur: ctypes.Array[ctypes.c_char] | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        attr = _attr((0, "I", map_fd), (8, "Q", _addr(cur) if cur is not None else 0), (16, "Q", _addr(nxt)))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)
        if len(keys) > 1_000_000:  # a map keeps changing under us; stop rather than loop forever
            return keys

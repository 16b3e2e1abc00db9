"""The few bpf(2) commands the control plane needs, through ctypes (no BCC needed).

Used to pin objects, open pinned maps and links from a fresh process, read and write
map elements (single and batched), and ask for link information.  Every failure is a
`KernelError` carrying the errno name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

from ..errors import KernelError
from . import syscalls

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_UPDATE_BATCH = 26
BPF_LINK_GET_FD_BY_ID = 30

BPF_ANY = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def libc() -> ctypes.CDLL:
    """The C library handle (opened once: find_library forks ldconfig)."""
    return _libc


def _nr() -> int:
    return syscalls.number("bpf")


def _fail(what: str, err: int) -> KernelError:
    name = errno.errorcode.get(err, f"E{err}")
    return KernelError(name, f"{what}: {os.strerror(err)}")


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char] | ctypes.Structure, what: str) -> int:
    """Run one bpf(2) command; returns its result, raises KernelError on failure."""
    ret = _libc.syscall(_nr(), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        raise _fail(what, ctypes.get_errno())
    return int(ret)


def bpf_errno(cmd: int, attr: ctypes.Array[ctypes.c_char] | ctypes.Structure) -> tuple[int, int]:
    """Like bpf() but returns (result, errno) instead of raising."""
    ret = _libc.syscall(_nr(), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    return int(ret), (ctypes.get_errno() if ret < 0 else 0)


class _CreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str) -> int:
    """A new map (the caller owns the fd); `name` is what bpftool shows (15 bytes at most)."""
    attr = _CreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                       map_flags=flags, map_name=name.encode()[:15])
    return bpf(BPF_MAP_CREATE, attr, f"create map {name} ({max_entries} entries)")


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
        ("_pad", ctypes.c_uint32),
    ]


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _IdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 128),
    ]


class _LinkInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 124),
    ]


def obj_pin(fd: int, path: str) -> None:
    buf = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(buf), bpf_fd=fd)
    bpf(BPF_OBJ_PIN, attr, f"pin {path}")


BPF_F_RDONLY = 1 << 3


def obj_get(path: str, read_only: bool = False) -> int:
    """Open a pinned object (a map read-only if asked); the caller owns the returned fd."""
    buf = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(buf), file_flags=BPF_F_RDONLY if read_only else 0)
    return bpf(BPF_OBJ_GET, attr, f"open {path}")


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, info.name.decode(errors="replace"))


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "link info")
    return LinkInfo(info.type, info.id, info.prog_id)


def link_exists(link_id: int) -> bool:
    """Whether a bpf_link with this id still exists in the kernel."""
    attr = _IdAttr(id=link_id)
    fd, err = bpf_errno(BPF_LINK_GET_FD_BY_ID, attr)
    if fd >= 0:
        os.close(fd)
        return True
    if err == errno.ENOENT:
        return False
    raise _fail(f"look up link {link_id}", err)


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(k), value=ctypes.addressof(v))
    ret, err = bpf_errno(BPF_MAP_LOOKUP_ELEM, attr)
    if ret < 0:
        if err == errno.ENOENT:
            return None
        raise _fail("map lookup", err)
    return v.raw


def update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(k), value=ctypes.addressof(v), flags=flags)
    bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")


def delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(k))
    ret, err = bpf_errno(BPF_MAP_DELETE_ELEM, attr)
    if ret < 0:
        if err == errno.ENOENT:
            return False
        raise _fail("map delete", err)
    return True


def keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (snapshot by GET_NEXT_KEY iteration)."""
    out: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    attr = _ElemAttr(map_fd=fd, key=0, value=ctypes.addressof(nxt))
    ret, err = bpf_errno(BPF_MAP_GET_NEXT_KEY, attr)
    cur = ctypes.create_string_buffer(key_size)
    while ret >= 0:
        out.append(nxt.raw)
        ctypes.memmove(cur, nxt, key_size)
        attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(cur), value=ctypes.addressof(nxt))
        ret, err = bpf_errno(BPF_MAP_GET_NEXT_KEY, attr)
    if err != errno.ENOENT:
        raise _fail("map iteration", err)
    return out


_BATCH = 16384


def _address(data: bytes | bytearray) -> tuple[int, object]:
    """Where `data`'s bytes are, for the kernel to read, and the object that keeps them there
    (no copy: a 100k-rule policy's arrays are 10 MB)."""
    if isinstance(data, bytearray):
        view = (ctypes.c_char * len(data)).from_buffer(data)
        return ctypes.addressof(view), view
    pointer = ctypes.c_char_p(data)
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0, pointer


def update_packed(fd: int, keys: bytes, values: bytes, key_size: int, value_size: int) -> None:
    """Write the elements packed back to back in `keys` and `values`: BPF_MAP_UPDATE_BATCH
    where the kernel has it, else one by one."""
    count = len(keys) // key_size
    if len(keys) != count * key_size or len(values) != count * value_size:
        raise ValueError(f"{len(keys)} key bytes and {len(values)} value bytes are not {count} whole elements")
    (kaddr, _k), (vaddr, _v) = _address(keys), _address(values)
    for at in range(0, count, _BATCH):
        n = min(_BATCH, count - at)
        attr = _BatchAttr(keys=kaddr + at * key_size, values=vaddr + at * value_size, count=n, map_fd=fd)
        ret, err = bpf_errno(BPF_MAP_UPDATE_BATCH, attr)
        if ret >= 0:
            continue
        if err not in (errno.EINVAL, 524) or attr.count != 0:  # 524: ENOTSUPP
            raise _fail(f"map batch update ({attr.count} of {n} written)", err)
        for i in range(at, at + n):
            update(fd, bytes(keys[i * key_size : (i + 1) * key_size]), bytes(values[i * value_size : (i + 1) * value_size]))


def inner_map_ids(fd: int, slots: int) -> list[int]:
    """The ids of the maps an array of maps holds at indexes 0..slots-1 (empty ones left out)."""
    ids = []
    for slot in range(slots):
        raw = lookup(fd, struct.pack("=I", slot), 4)  # bpf() reads a map-in-map's value as an id
        if raw is not None:
            ids.append(struct.unpack("=I", raw)[0])
    return ids


def possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values have one slot each)."""
    text = open("/sys/devices/system/cpu/possible", encoding="ascii").read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


BPF_PROG_GET_FD_BY_ID = 13
BPF_RAW_TRACEPOINT_OPEN = 17


class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def prog_fd_by_id(prog_id: int) -> int:
    """Open a loaded program by id (the caller owns the fd)."""
    return bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"open program {prog_id}")


def attach_lsm(prog_fd: int) -> int:
    """Attach an LSM program (what BCC's bpf_attach_lsm does); returns the link fd."""
    return bpf(BPF_RAW_TRACEPOINT_OPEN, _RawTpAttr(name=0, prog_fd=prog_fd), "attach LSM program")


def prog_exists(prog_id: int) -> bool:
    """Whether a BPF program with this id is still loaded."""
    fd, err = bpf_errno(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    if fd >= 0:
        os.close(fd)
        return True
    if err == errno.ENOENT:
        return False
    raise _fail(f"look up program {prog_id}", err)


BPF_MAP_GET_FD_BY_ID = 14
BPF_MAP_FREEZE = 22


def map_fd_by_id(map_id: int, read_only: bool = False) -> int:
    """Open a map by id, read-write unless `read_only` (the caller owns the fd)."""
    attr = _IdAttr(id=map_id, open_flags=BPF_F_RDONLY if read_only else 0)
    return bpf(BPF_MAP_GET_FD_BY_ID, attr, f"open map {map_id}")


class _FreezeAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def freeze(fd: int) -> bool:
    """BPF_MAP_FREEZE: no bpf() write through any fd, ever again; False if it already was
    (the kernel says EBUSY, or EPERM: a frozen map has no write permission left)."""
    ret, err = bpf_errno(BPF_MAP_FREEZE, _FreezeAttr(map_fd=fd))
    if ret < 0:
        if err in (errno.EBUSY, errno.EPERM) and is_frozen(fd):
            return False
        raise _fail("map freeze", err)
    return True


def is_frozen(fd: int) -> bool:
    """Whether the map of fd is frozen (its fdinfo says so)."""
    try:
        info = open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace").read()
    except OSError:
        return False
    return any(line.split() == ["frozen:", "1"] for line in info.splitlines())


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def prog_map_ids(prog_fd: int) -> list[int]:
    """The ids of the maps a loaded program uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = _ProgInfo(nr_map_ids=64, map_ids=ctypes.addressof(ids))
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    return list(ids[: min(info.nr_map_ids, 64)])

"""The seal: until reboot, the active policy, the mode and the programs cannot change.

    seal.read()                      # SealState (sealed since when), None if not loaded
    seal.seal(force=False)           # SealOutcome; EINVAL while permissive or without a policy
    seal.refuse_if_sealed("unload")  # SealedError (EPERM) once sealed: the control plane's guard

What `seal()` does, in this order, under the control lock (docs/seal.md):
 1. checks: loaded by the CO-RE loader with every seal hook attached; enforcing, with a policy
    active (unless forced);
 2. collects what is ipe-bpf's: every map (pinned, the policy's tables in them, and those its
    programs use) with its type, sizes and flags, program and link ids, the pin folders
    (device, inode), and each directory from / down to them (mount id, inode: statx);
 3. freezes every map but the ring buffer (BPF_MAP_FREEZE: bpf() never writes them again,
    through any fd, including fds opened before);
 4. writes the ipe_seal entry with sealed=1, from which on the program's seal hooks refuse
    what could change enforcement, and freezes that map too.
Interrupted after 3, maps are frozen but nothing is sealed: `seal` again completes it, `unload`
still works.  Nothing undoes 4 but a reboot: the maps die with the pins, which the hooks keep.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import KernelError
from . import bpfsys, syscalls
from .maps import PinnedPolicyMaps, SealEntry, kernel_dev
from .pins import LOADED_STATE, MAP_NAMES, PIN_ROOT, SEAL_HOOKS, control_lock, link_paths, links_dir, maps_dir

BPF_MAP_TYPE_RINGBUF = 27
_STATX_MNT_ID = 0x1000
_AT_FDCWD = -100


class SealedError(KernelError):
    """Refused: ipe-bpf is sealed until reboot (EPERM)."""


@dataclass(frozen=True)
class SealState:
    sealed_at: float | None  # epoch seconds; None: not sealed

    @property
    def sealed(self) -> bool:
        return self.sealed_at is not None

    @property
    def since(self) -> str:
        """The seal's time, UTC, ISO 8601 (empty when not sealed)."""
        if self.sealed_at is None:
            return ""
        return dt.datetime.fromtimestamp(self.sealed_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SealOutcome:
    state: SealState
    changed: bool  # False: it was sealed already
    maps: int  # how many maps are ipe-bpf's (frozen but the ring buffer)
    programs: int


def read(root: Path = PIN_ROOT) -> SealState | None:
    """Whether the loaded program is sealed; None if nothing is loaded."""
    if not link_paths(root):
        return None
    with PinnedPolicyMaps(root) as maps:
        entry = maps.seal_entry()
    return SealState(entry.sealed_at / 1e9 if entry is not None and entry.sealed else None)


def refuse_if_sealed(attempt: str, root: Path = PIN_ROOT) -> None:
    """SealedError (EPERM) naming `attempt` if ipe-bpf is sealed; nothing otherwise."""
    state = read(root)
    if state is not None and state.sealed:
        raise SealedError("EPERM", f"{attempt}: ipe-bpf is sealed since {state.since} until reboot: "
                                   f"the policy, the mode and the programs cannot change (docs/seal.md)")


# ------------------------------------------------------------------------------- sealing


def seal(root: Path = PIN_ROOT, *, force: bool = False, state_file: Path = LOADED_STATE) -> SealOutcome:
    """Seal the loaded program until reboot (see the module doc)."""
    with control_lock():
        _check_sealable(root, state_file)
        with PinnedPolicyMaps(root) as maps:
            entry = maps.seal_entry()
            if entry is None:
                raise KernelError("EOPNOTSUPP", "the loaded program has no seal map (loaded by an older "
                                                "ipe-bpf): unload and load it again")
            if entry.sealed:
                _freeze(maps.map_fd("ipe_seal", write=True))  # an interrupted seal's last step
                return SealOutcome(SealState(entry.sealed_at / 1e9), False, entry.nr_maps, entry.nr_progs)
            kernel = maps.state()
            if not force and not kernel.enforcing:
                raise KernelError("EINVAL", "ipe-bpf is permissive: sealing would keep it permissive until "
                                            "reboot (`ipe-bpf enforce on` first, or --force)")
            if not force and kernel.active_slot is None:
                raise KernelError("EINVAL", "no policy is active: sealing would allow everything until "
                                            "reboot (activate a policy first, or --force)")
            ours = _collect(root, maps)
            for map_id, map_type in zip(ours.map_id[: ours.nr_maps], ours.map_type[: ours.nr_maps]):
                if map_type != BPF_MAP_TYPE_RINGBUF and map_id != ours.map_id[0]:
                    _freeze_id(map_id)
            sealed = replace(ours, sealed=1, sealed_at=time.time_ns(),
                             sealed_boot_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME))
            maps.write_seal_entry(sealed)
            _freeze(maps.map_fd("ipe_seal", write=True))
    return SealOutcome(SealState(sealed.sealed_at / 1e9), True, sealed.nr_maps, sealed.nr_progs)


def _check_sealable(root: Path, state_file: Path) -> None:
    links = {p.name for p in link_paths(root)}
    if not links:
        raise KernelError("ENOENT", "ipe-bpf is not loaded (run `ipe-bpf load`)")
    from .loader import LoadedState  # here: the loader's modules are no part of a deploy's start

    loaded = LoadedState.read(state_file)
    if loaded is not None and loaded.loader != "core":
        raise KernelError("EOPNOTSUPP", f"loaded with the {loaded.loader} loader, which has no seal hooks: "
                                        f"unload and load with the CO-RE loader (the default)")
    missing = [h for h in SEAL_HOOKS if h not in links]
    if missing:
        raise KernelError("EOPNOTSUPP", f"the seal hooks {', '.join(missing)} are not attached (this kernel "
                                        f"({os.uname().release}) lacks them): sealing would leave holes")


def _freeze(fd: int) -> None:
    bpfsys.freeze(fd)  # False (EBUSY): frozen already


# The kernel's ENOTSUPP: a map with special fields (a bpf_spin_lock) cannot be frozen.
_CANNOT_FREEZE = "E524"


def _freeze_id(map_id: int) -> None:
    """Freeze one map; a map the kernel cannot freeze stays guarded by the bpf hook alone."""
    fd = bpfsys.map_fd_by_id(map_id)
    try:
        _freeze(fd)
    except KernelError as err:
        if err.errno_name != _CANNOT_FREEZE:
            raise
    finally:
        os.close(fd)


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("times", ctypes.c_uint8 * 64), ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("mnt_id", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 104)]


@dataclass(frozen=True)
class _Place:
    mnt_id: int
    dev: int  # kernel dev_t
    ino: int


def _place(path: Path) -> _Place:
    """Mount id, device and inode of path (statx with STATX_MNT_ID)."""
    buf = _Statx()
    name = ctypes.create_string_buffer(os.fsencode(path))
    ret = bpfsys.libc().syscall(syscalls.number("statx"), _AT_FDCWD, name, 0, _STATX_MNT_ID, ctypes.byref(buf))
    if ret != 0 or not buf.mask & _STATX_MNT_ID:
        err = ctypes.get_errno()
        raise KernelError("EOPNOTSUPP", f"statx {path}: no mount id ({os.strerror(err) if err else 'STATX_MNT_ID'})")
    return _Place(buf.mnt_id, kernel_dev(buf.dev_major, buf.dev_minor), buf.ino)


def _padded(values: list[int], size: int, what: str) -> tuple[int, ...]:
    if len(values) > size:
        raise KernelError("E2BIG", f"{len(values)} {what}, the seal has room for {size}")
    return tuple(values) + (0,) * (size - len(values))


def _collect(root: Path, maps: PinnedPolicyMaps) -> SealEntry:
    """What is ipe-bpf's, into an unsealed entry (ipe_seal's own map id first)."""
    header = maps.header
    links = [bpfsys.obj_get(str(p)) for p in link_paths(root)]
    try:
        infos = [bpfsys.link_info(fd) for fd in links]
    finally:
        for fd in links:
            os.close(fd)
    map_ids = [bpfsys.map_info(maps.map_fd("ipe_seal")).id]
    for name in MAP_NAMES:
        map_ids.append(bpfsys.map_info(maps.map_fd(name)).id)
    map_ids.extend(maps.table_ids())  # the policy's tables, held by ipe_digests and ipe_rules
    for info in infos:
        fd = bpfsys.prog_fd_by_id(info.prog_id)
        try:
            map_ids.extend(bpfsys.prog_map_ids(fd))
        finally:
            os.close(fd)
    map_ids = list(dict.fromkeys(map_ids))  # unique, ipe_seal first
    props = []
    for map_id in map_ids:
        fd = bpfsys.map_fd_by_id(map_id)
        try:
            props.append(bpfsys.map_info(fd))
        finally:
            os.close(fd)
    dirs = [_place(d) for d in (root, maps_dir(root), links_dir(root))]
    points = [_place(p) for p in (*reversed(root.parents), root, maps_dir(root), links_dir(root))]
    n = {name: header.constant(name) for name in ("IPE_SEAL_MAPS", "IPE_SEAL_PROGS", "IPE_SEAL_DIRS",
                                                  "IPE_SEAL_POINTS")}
    return SealEntry(
        sealed=0, bpffs_dev=dirs[0].dev, sealed_at=0, sealed_boot_ns=0,
        nr_maps=len(props), nr_progs=len(infos), nr_links=len(infos), nr_dirs=len(dirs), nr_points=len(points),
        map_id=_padded([m.id for m in props], n["IPE_SEAL_MAPS"], "maps"),
        map_type=_padded([m.type for m in props], n["IPE_SEAL_MAPS"], "maps"),
        map_key_size=_padded([m.key_size for m in props], n["IPE_SEAL_MAPS"], "maps"),
        map_value_size=_padded([m.value_size for m in props], n["IPE_SEAL_MAPS"], "maps"),
        map_flags=_padded([m.flags for m in props], n["IPE_SEAL_MAPS"], "maps"),
        prog_id=_padded([i.prog_id for i in infos], n["IPE_SEAL_PROGS"], "programs"),
        link_id=_padded([i.id for i in infos], n["IPE_SEAL_PROGS"], "links"),
        dir_dev=_padded([d.dev for d in dirs], n["IPE_SEAL_DIRS"], "pin folders"),
        dir_ino=_padded([d.ino for d in dirs], n["IPE_SEAL_DIRS"], "pin folders"),
        point_mnt=_padded([p.mnt_id for p in points], n["IPE_SEAL_POINTS"], "directories to the pins"),
        point_ino=_padded([p.ino for p in points], n["IPE_SEAL_POINTS"], "directories to the pins"),
    )

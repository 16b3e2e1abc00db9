"""Where the loaded program lives in bpffs, and the names of what is pinned there.

    /sys/fs/bpf/ipe_bpf/maps/<map name>     every map of bpf/bcc_compat.h
    /sys/fs/bpf/ipe_bpf/links/<lsm hook>    one bpf_link per attached LSM program

The links keep the programs attached after the loading process is gone; removing them
detaches (asynchronously).  The maps let a fresh process read and write policy state.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "ipe_bpf"
LOCK_FILE = Path("/run/ipe-bpf.lock")
LOADED_STATE = Path("/run/ipe-bpf/loaded.json")  # what the loaded program found (loader.py)

MAP_NAMES: tuple[str, ...] = (
    "ipe_config",
    "ipe_defaults",
    "ipe_digests",
    "ipe_rules",
    "ipe_devices",
    "ipe_counters",
    "ipe_events",
    "ipe_inodes",
    "ipe_seal",  # the seal's state (kernel/seal.py)
)

# What the seal guards with (CO-RE object only; idle until `ipe-bpf seal`): bpf() on our maps
# and links, new programs, the pin folders, the mounts leading to them (docs/seal.md).
SEAL_HOOKS: tuple[str, ...] = (
    "bpf",
    "bpf_prog",
    "inode_unlink",
    "inode_rmdir",
    "inode_rename",
    "sb_umount",
    "sb_mount",
    "move_mount",
)

HOOKS: tuple[str, ...] = (
    "bprm_check_security",
    "mmap_file",
    "file_mprotect",
    "kernel_read_file",
    "kernel_load_data",
    "bdev_setintegrity",
    "bdev_free_security",
    "inode_setintegrity",
    "file_open",  # with file_ioctl: which verity files' signature checks the program saw
    "file_ioctl",
    *SEAL_HOOKS,
)


def maps_dir(root: Path = PIN_ROOT) -> Path:
    return root / "maps"


def links_dir(root: Path = PIN_ROOT) -> Path:
    return root / "links"


def map_path(name: str, root: Path = PIN_ROOT) -> Path:
    return maps_dir(root) / name


def link_paths(root: Path = PIN_ROOT) -> list[Path]:
    d = links_dir(root)
    return sorted(d.iterdir()) if d.is_dir() else []


def is_loaded(root: Path = PIN_ROOT) -> bool:
    return bool(link_paths(root))


_held = threading.local()


@contextmanager
def control_lock(lock_file: Path = LOCK_FILE) -> Iterator[None]:
    """Serialise control-plane writers (load/unload/install/config) on this machine.

    Re-entrant within a thread (load() configures the maps it just pinned).
    """
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held.depth = 1
        yield
    finally:
        _held.depth = 0
        os.close(fd)

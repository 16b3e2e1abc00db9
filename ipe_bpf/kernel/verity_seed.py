"""The fs-verity signature state of files already in use when ipe-bpf loads.

The program learns a file's built-in signature state when fs-verity sets the file up (first
open, or enabling verity), through inode_setintegrity; for files set up before the load it has
no answer, and decisions that hang on one are denied (fail-closed).  `load` narrows that set:
it evicts unused inodes (they are set up again, in view, when next opened) and, for the verity
files still in use (mapped, open or running: /proc/*/map_files, fd, exe), tells the program
what the kernel decided when it set them up.  A verity file that is open carries a built-in
signature only if the kernel verified it (a bad one fails the set-up, and so the open), so
reading the signature metadata (FS_IOC_READ_VERITY_METADATA) gives the state exactly.  The
program's inode storage is written through the map's fd-keyed syscall interface, with the
file's own descriptor as the key, so each state lands on exactly that inode.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from ..errors import KernelError
from . import bpfsys
from .measure import signed_fd, verity_fd
from .pins import PIN_ROOT, map_path

PROC = Path("/proc")


def _links(proc: Path) -> Iterator[Path]:
    """Magic links to every file a process has mapped, open or running."""
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        yield pid / "exe"
        for folder in ("map_files", "fd"):
            try:
                yield from (pid / folder).iterdir()
            except OSError:
                continue  # gone, or a kernel thread


def _in_use(proc: Path) -> Iterator[int]:
    """An fd to each distinct regular file in use (the caller closes them)."""
    seen: set[tuple[int, int]] = set()
    for link in _links(proc):
        try:
            fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            os.close(fd)
            continue
        seen.add((st.st_dev, st.st_ino))
        yield fd


def seed(root: Path = PIN_ROOT, proc: Path = PROC) -> int:
    """Record the signature state of every verity file in use; returns how many."""
    from ..policy.layout import default_header

    layout = default_header().struct("ipe_inode_state")
    try:
        inodes = bpfsys.obj_get(str(map_path("ipe_inodes", root)))
    except KernelError:
        return 0
    count = 0
    try:
        for fd in _in_use(proc):
            try:
                if not verity_fd(fd):
                    continue
                value = layout.pack(fsv_sig_valid=1 if signed_fd(fd) else 0, fsv_observed=1)
                bpfsys.update(inodes, struct.pack("=i", fd), value)
                count += 1
            except KernelError:
                continue  # the file went away meanwhile: its inode is gone too
            finally:
                os.close(fd)
    finally:
        os.close(inodes)
    return count

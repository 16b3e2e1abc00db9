"""Checks of the machine that builds and boots the VM: tools on PATH, free disk space."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmError

GIB = 1 << 30


@dataclass(frozen=True)
class Tool:
    """A program the VM tooling runs, and the Debian/Ubuntu package that provides it."""

    command: str
    package: str
    purpose: str


TOOLS: Mapping[str, Tool] = {
    t.command: t
    for t in (
        Tool("qemu-system-x86_64", "qemu-system-x86", "boots the guest"),
        Tool("mmdebstrap", "mmdebstrap", "builds the guest root filesystem"),
        Tool("mke2fs", "e2fsprogs", "makes the ext4 disk images"),
        Tool("dpkg-deb", "dpkg", "packs the tiny no-initramfs package"),
        Tool("cpio", "cpio", "packs the initramfs"),
        Tool("tar", "tar", "carries the command and the results"),
    )
}
BUILD_TOOLS = ("mmdebstrap", "mke2fs", "dpkg-deb", "cpio", "tar")
RUN_TOOLS = ("qemu-system-x86_64", "mke2fs", "tar")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def missing_tools(commands: Iterable[str]) -> list[Tool]:
    return [TOOLS[c] for c in commands if shutil.which(c) is None]


def require_tools(commands: Iterable[str]) -> None:
    """Raise ENOENT naming every missing program and its package."""
    missing = missing_tools(commands)
    if missing:
        names = ", ".join(f"{t.command} (package {t.package})" for t in missing)
        raise VmError("ENOENT", f"missing {names}: run `ipe-bpf vm setup` as root")


def require_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        raise VmError("EPERM", f"{what} needs root (mmdebstrap --mode=root): run it with sudo")


def require_space(path: Path, needed: int, what: str) -> None:
    """Raise ENOSPC unless the filesystem holding PATH has NEEDED bytes free."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise VmError(
            "ENOSPC",
            f"{what} needs {needed / GIB:.1f} GiB free in {path}, only {free / GIB:.1f} GiB left "
            f"(set IPE_BPF_CACHE to a roomier place)",
        )


def tree_size(path: Path) -> int:
    """Bytes used by a directory tree (``du -sb``), without following mounts."""
    out = subprocess.run(["du", "-sbx", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])

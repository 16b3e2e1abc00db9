"""Seed dm-verity devices that were set up before ipe-bpf was loaded.

The BPF program learns a device's root hash on `bdev_setintegrity`, which dm-verity
calls when the table is resumed.  For devices already active at load time we read the
verity table (`dmsetup table --target verity`, whose root digest and algorithm are the
same the kernel passes to the hook) and write them into the devices map marked
`seeded`.  The signature flag cannot be recovered from userspace: a seeded device is
never `dmverity_signature=TRUE` (documented limitation; reopen the device after load).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .maps import PinnedPolicyMaps


@dataclass(frozen=True)
class VerityTable:
    name: str
    major: int
    minor: int
    alg: bytes
    roothash: bytes


def parse_verity_line(name: str, line: str) -> tuple[bytes, bytes] | None:
    """(alg, root digest) from one dm table line `start len verity v data hash dbs hbs nd nh alg root salt ...`."""
    parts = line.split()
    if len(parts) < 12 or parts[2] != "verity":
        return None
    alg, root = parts[10], parts[11]
    try:
        return alg.encode(), bytes.fromhex(root)
    except ValueError:
        return None


def _dev_numbers(name: str) -> tuple[int, int] | None:
    for block in Path("/sys/block").glob("dm-*"):
        try:
            if (block / "dm" / "name").read_text().strip() == name:
                major, minor = (block / "dev").read_text().strip().split(":")
                return int(major), int(minor)
        except OSError:
            continue
    return None


def verity_tables() -> list[VerityTable]:
    if shutil.which("dmsetup") is None:
        return []
    try:
        out = subprocess.run(
            ["dmsetup", "table", "--target", "verity"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.splitlines():
        name, sep, rest = line.partition(": ")
        if not sep:
            continue
        parsed = parse_verity_line(name, rest)
        numbers = _dev_numbers(name)
        if parsed and numbers:
            found.append(VerityTable(name, numbers[0], numbers[1], parsed[0], parsed[1]))
    return found


def seed(maps: "PinnedPolicyMaps") -> int:
    """Write every pre-existing dm-verity device into the devices map; returns how many."""
    from .maps import kernel_dev

    tables = verity_tables()
    for t in tables:
        maps.seed_device(kernel_dev(t.major, t.minor), t.alg, t.roothash)
    return len(tables)

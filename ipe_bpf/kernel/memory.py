"""How much kernel memory the loaded program's maps hold (`ipe-bpf status`).

The figure is the kernel's own: the `memlock:` line of /proc/self/fdinfo/<map fd>, which
kernels since 6.4 compute from what the map really uses; older kernels (6.1) estimate it from
max_entries and the element size.  The policy tables are preallocated hash maps of exactly the
policy's entries, so both count what they hold.  bpf_map_info gives the key and value sizes
and max_entries shown beside it.  ipe_digests and ipe_rules are arrays of maps: their figures add up the tables in
their slots (hash maps sized to each installed policy), whose key and value sizes they show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..policy.layout import default_header
from . import bpfsys
from .pins import MAP_NAMES, PIN_ROOT, map_path

POLICY_MAPS = ("ipe_digests", "ipe_rules")  # what grows with the policy


@dataclass(frozen=True)
class MapMemory:
    name: str
    memlock: int  # bytes, as the kernel counts them
    key_size: int
    value_size: int
    max_entries: int

    def as_dict(self) -> dict[str, object]:
        return {"memlock": self.memlock, "key_size": self.key_size, "value_size": self.value_size,
                "max_entries": self.max_entries}


def fdinfo_memlock(text: str) -> int | None:
    """The `memlock:` figure of an fdinfo file's text (None if the kernel gives none)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "memlock" and value.strip().isdigit():
            return int(value.strip())
    return None


def map_memory(fd: int, name: str) -> MapMemory:
    """The memory of the map behind `fd` (an fd of this process)."""
    info = bpfsys.map_info(fd)
    memlock = fdinfo_memlock(Path(f"/proc/self/fdinfo/{fd}").read_text())
    return MapMemory(name, memlock or 0, info.key_size, info.value_size, info.max_entries)


def with_tables(outer: MapMemory, fd: int) -> MapMemory:
    """`outer` (an array of maps, open as `fd`) with the tables in its slots added: their
    memory, their key and value sizes, their max_entries summed (0: no table installed)."""
    tables = []
    for table_id in bpfsys.inner_map_ids(fd, default_header().constant("IPE_SLOTS")):
        table_fd = bpfsys.map_fd_by_id(table_id, read_only=True)
        try:
            tables.append(map_memory(table_fd, outer.name))
        finally:
            os.close(table_fd)
    sizes = (tables[0].key_size, tables[0].value_size) if tables else (outer.key_size, outer.value_size)
    return MapMemory(outer.name, outer.memlock + sum(t.memlock for t in tables), *sizes,
                     sum(t.max_entries for t in tables))


def pinned_memory(root: Path = PIN_ROOT) -> tuple[MapMemory, ...]:
    """Every pinned map of the loaded program, read-only (works while sealed)."""
    out = []
    for name in MAP_NAMES:
        path = map_path(name, root)
        if not path.exists():
            continue
        fd = bpfsys.obj_get(str(path), read_only=True)
        try:
            found = map_memory(fd, name)
            out.append(with_tables(found, fd) if name in POLICY_MAPS else found)
        finally:
            os.close(fd)
    return tuple(out)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB', 33554432 -> '32.0 MiB' (binary units, one decimal)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe(maps: tuple[MapMemory, ...]) -> str:
    """One status line: the total, then the policy maps, then the rest."""
    total = sum(m.memlock for m in maps)
    parts = [f"{m.name} {human_bytes(m.memlock)}" for m in maps if m.name in POLICY_MAPS]
    rest = sum(m.memlock for m in maps if m.name not in POLICY_MAPS)
    parts.append(f"other maps {human_bytes(rest)}")
    return f"map memory: {human_bytes(total)} ({', '.join(parts)})"

"""The map memory figure of `ipe-bpf status`: parsing the kernel's fdinfo and formatting."""

from __future__ import annotations

import struct

import pytest

from ipe_bpf.kernel.memory import MapMemory, describe, fdinfo_memlock, human_bytes

FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t15
ino:\t1052
map_type:\t1
key_size:\t12
value_size:\t8
max_entries:\t2097152
map_flags:\t0x9
map_extra:\t0x0
memlock:\t67649600
map_id:\t23
frozen:\t0
"""


def test_fdinfo_memlock_reads_the_kernels_figure() -> None:
    assert fdinfo_memlock(FDINFO) == 67649600


def test_fdinfo_without_memlock_gives_none() -> None:
    assert fdinfo_memlock("pos:\t0\nflags:\t02\n") is None
    assert fdinfo_memlock("memlock:\tlots\n") is None


def test_human_bytes_uses_binary_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(32 << 20) == "32.0 MiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_bytes(5 << 40) == "5120.0 GiB"


def test_describe_puts_the_policy_maps_first_and_sums_the_rest() -> None:
    maps = (MapMemory("ipe_config", 4096, 4, 16, 1), MapMemory("ipe_digests", 1 << 20, 84, 4, 1 << 19),
            MapMemory("ipe_rules", 5 << 20, 12, 8, 1 << 21), MapMemory("ipe_events", 262144, 0, 0, 262144))
    assert describe(maps) == ("map memory: 6.3 MiB (ipe_digests 1.0 MiB, ipe_rules 5.0 MiB, "
                              "other maps 260.0 KiB)")


def test_an_array_of_maps_counts_the_tables_in_its_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """ipe_rules holds one table per slot: its figure is its own plus theirs (bpfsys faked)."""
    from ipe_bpf.kernel import bpfsys, memory

    outer = MapMemory("ipe_rules", 4096, 4, 4, 2)
    slots = {struct.pack("=I", 1): struct.pack("=I", 77)}  # slot 0 empty, slot 1 holds map 77
    monkeypatch.setattr(bpfsys, "lookup", lambda fd, key, size: slots.get(key) if fd == 5 else None)
    opened = []
    monkeypatch.setattr(bpfsys, "map_fd_by_id", lambda map_id, read_only=False: opened.append((map_id, read_only)) or 9)
    monkeypatch.setattr(memory, "map_memory", lambda fd, name: MapMemory(name, 3 << 20, 12, 8, 40_000))
    monkeypatch.setattr(memory.os, "close", lambda fd: None)
    assert memory.with_tables(outer, 5) == MapMemory("ipe_rules", 4096 + (3 << 20), 12, 8, 40_000)
    assert opened == [(77, True)]  # read-only: `status` works while sealed
    slots.clear()
    assert memory.with_tables(outer, 5) == MapMemory("ipe_rules", 4096, 4, 4, 0)

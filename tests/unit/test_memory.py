"""The map memory figure of `ipe-bpf status`: parsing the kernel's fdinfo and formatting."""

from __future__ import annotations

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

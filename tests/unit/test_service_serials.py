"""The per-boot serial counter: unique across processes, restarts with the boot id."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import pytest

from ipe_bpf.errors import ServiceError
from ipe_bpf.audit.serials import SerialAllocator, read_boot_id

BOOT_A = "11111111-1111-1111-1111-111111111111"
BOOT_B = "22222222-2222-2222-2222-222222222222"


def _allocate_many(path: str, seed: int, rounds: int, out: "multiprocessing.Queue[list[tuple[int, int]]]") -> None:
    rng = random.Random(seed)
    got = []
    with SerialAllocator(Path(path), boot_id=lambda: BOOT_A) as alloc:
        for _ in range(rounds):
            count = rng.randint(1, 5)
            got.append((alloc.allocate(count), count))
    out.put(got)


def test_unique_and_contiguous_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "serial"
    ctx = multiprocessing.get_context("fork")
    out: "multiprocessing.Queue[list[tuple[int, int]]]" = ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(str(path), seed, 150, out)) for seed in range(6)]
    for p in procs:
        p.start()
    blocks = [block for _ in procs for block in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    serials = [first + i for first, count in blocks for i in range(count)]
    assert len(serials) == len(set(serials)), "a serial was handed out twice"
    assert sorted(serials) == list(range(1, len(serials) + 1)), "the sequence has gaps"


def test_new_boot_starts_again_at_one(tmp_path: Path) -> None:
    boot = [BOOT_A]
    alloc = SerialAllocator(tmp_path / "serial", boot_id=lambda: boot[0])
    assert alloc.allocate(3) == 1
    assert alloc.allocate() == 4
    assert alloc.allocate(0) == 5  # peek: nothing reserved
    assert alloc.allocate() == 5
    boot[0] = BOOT_B
    assert alloc.allocate() == 1
    assert (tmp_path / "serial").read_text() == f"{BOOT_B} {2:020d}\n"


def test_empty_file_is_a_fresh_counter(tmp_path: Path) -> None:
    (tmp_path / "serial").write_bytes(b"")
    assert SerialAllocator(tmp_path / "serial", boot_id=lambda: BOOT_A).allocate() == 1


def test_corrupt_counter_is_refused_not_reset(tmp_path: Path) -> None:
    (tmp_path / "serial").write_text("garbage\n")
    with pytest.raises(ServiceError, match="EUCLEAN"):
        SerialAllocator(tmp_path / "serial", boot_id=lambda: BOOT_A).allocate()


def test_real_boot_id() -> None:
    assert len(read_boot_id()) == 36


def test_audit_tail_of_the_ring_buffer_numbers_from_the_sequence(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two ring-buffer readers, one after the other, never print the same serial (they used to
    start at :1 each)."""
    import ipe_bpf.kernel.events as events

    from .service_fixtures import access

    monkeypatch.setattr(events, "all_records", lambda *a, **kw: iter([access(pid=1), access(pid=2)]))
    serials = SerialAllocator(tmp_path / "serial", boot_id=lambda: BOOT_A)
    serials.allocate(4)  # e.g. a policy change
    out: list[str] = []
    for _ in range(2):
        events.tail(out.append, serials=serials)
    assert [int(line.split(":", 1)[1].split(")")[0]) for line in out] == [5, 6, 7, 8]

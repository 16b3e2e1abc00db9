"""The durable log: one writer, rotation, crash safety, and readers that follow like tail -F."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from ipe_bpf.errors import ServiceError
from ipe_bpf.service.durable import LogReader, LogWriter, Position, rotated_path, tail_position, writer_pid
from ipe_bpf.service.records import parse_line


def rec(serial: int, pad: int = 0) -> str:
    return f"type=1420 audit(1732100000.210:{serial}): ipe_op=EXECUTE pid={serial} comm=\"{'x' * pad}\""


def serials_in(text: str) -> list[int]:
    out = []
    for raw in text.split("\n")[:-1]:
        parsed = parse_line(raw)
        assert parsed is not None, f"unreadable line {raw[:80]!r}"
        out.append(parsed.serial)
    return out


def all_serials(log: Path, keep: int) -> list[int]:
    out: list[int] = []
    for index in range(keep, -1, -1):
        path = rotated_path(log, index)
        if path.exists():
            out += serials_in(path.read_text())
    return out


def test_rotation_keeps_n_files_and_every_line_of_them(tmp_path: Path) -> None:
    log = tmp_path / "log" / "audit.log"
    with LogWriter(log, max_size=4096, keep=3) as w:
        for serial in range(1, 301):
            w.append([rec(serial)])
    sizes = [rotated_path(log, i).stat().st_size for i in range(4)]
    assert all(0 < s <= 4096 for s in sizes)
    assert not rotated_path(log, 4).exists()
    kept = all_serials(log, 3)
    assert kept == list(range(kept[0], 301)), "lines lost or reordered inside the kept files"
    assert kept[0] > 1  # the oldest file was dropped
    assert oct(log.stat().st_mode & 0o777) == "0o640"


def test_batch_never_splits_across_files(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with LogWriter(log, max_size=4096, keep=2) as w:
        w.append([rec(1, 3000)])
        w.append([rec(2, 500), rec(3, 500)])  # would cross 4096: rotates first, stays together
    assert serials_in(rotated_path(log, 1).read_text()) == [1]
    assert serials_in(log.read_text()) == [2, 3]


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    first = LogWriter(log, 1 << 20, 2)
    first.open()
    try:
        assert writer_pid(log) == os.getpid()
        ctx = multiprocessing.get_context("fork")
        queue: "multiprocessing.Queue[str]" = ctx.Queue()

        def second() -> None:
            try:
                LogWriter(log, 1 << 20, 2).open()
                queue.put("opened")
            except ServiceError as err:
                queue.put(str(err))

        p = ctx.Process(target=second)
        p.start()
        message = queue.get(timeout=30)
        p.join()
        assert message == f"{log}.lock: EBUSY: another writer (pid {os.getpid()}) holds the log lock"
    finally:
        first.close()
    assert writer_pid(log) is None
    with LogWriter(log, 1 << 20, 2):
        pass


def test_lock_is_released_when_the_writer_dies(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()

    def hold() -> None:
        LogWriter(log, 1 << 20, 2).open()
        ready.set()
        time.sleep(60)

    p = ctx.Process(target=hold)
    p.start()
    assert ready.wait(30)
    assert writer_pid(log) == p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert writer_pid(log) is None
    with LogWriter(log, 1 << 20, 2):
        pass


def test_torn_last_line_is_cut_and_nothing_else(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    complete = rec(1) + "\n" + rec(2) + "\n"
    log.write_text(complete + rec(3)[:25])  # a writer died inside its write
    w = LogWriter(log, 1 << 20, 2)
    assert w.open() == 25
    w.append([rec(3)])
    w.close()
    assert log.read_text() == complete + rec(3) + "\n"
    log.write_text("no newline at all")
    with LogWriter(log, 1 << 20, 2) as w:
        assert w.size == 0


def _write_forever(log: str, acked: "multiprocessing.Queue[int]") -> None:
    w = LogWriter(Path(log), max_size=1 << 22, keep=3)
    w.open()
    serial = 1
    while True:
        batch = [rec(s, 200) for s in range(serial, serial + 2000)]  # ~500 KiB: many pages per write
        w.append(batch)
        serial += len(batch)
        acked.put(serial - 1)


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.29, 0.41])
def test_writer_killed_mid_write_leaves_a_readable_log(tmp_path: Path, delay: float) -> None:
    log = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("fork")
    acked: "multiprocessing.Queue[int]" = ctx.Queue()
    p = ctx.Process(target=_write_forever, args=(str(log), acked))
    p.start()
    last_acked = acked.get(timeout=60)  # the first batch is on disk
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    while not acked.empty():
        last_acked = acked.get()
    size_before = sum(rotated_path(log, i).stat().st_size for i in range(4) if rotated_path(log, i).exists())
    w = LogWriter(log, 1 << 22, 3)
    cut = w.open()
    w.close()
    on_disk = all_serials(log, 3)  # every line parses: a torn one would fail here
    assert on_disk == list(range(on_disk[0], on_disk[-1] + 1))
    assert on_disk[-1] >= last_acked, "an acknowledged record is missing"
    size_after = sum(rotated_path(log, i).stat().st_size for i in range(4) if rotated_path(log, i).exists())
    torn_line = len(rec(on_disk[-1] + 1, 200)) + 1  # the record after the last whole one (serials grow wider)
    assert size_before - size_after == cut < torn_line, "more than one torn line was cut"


def test_reader_follows_across_rotation_exactly_once(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    got: list[int] = []
    with LogWriter(log, max_size=2048, keep=50) as w:
        w.append([rec(0)])
        reader = LogReader(log, keep=50)  # from the current end: after serial 0
        for serial in range(1, 400):
            w.append([rec(serial)])
            if serial % 7 == 0:
                got += [parse_line(t).serial for _, t in reader.read()]  # type: ignore[union-attr]
        got += [parse_line(t).serial for _, t in reader.read()]  # type: ignore[union-attr]
    assert got == list(range(1, 400))
    assert reader.position == Position(log.stat().st_ino, log.stat().st_size)


def test_reader_resumes_from_a_position_in_a_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with LogWriter(log, max_size=2048, keep=50) as w:
        marks = {}
        for serial in range(1, 200):
            marks[serial] = w.append([rec(serial)])
    reader = LogReader(log, keep=50, start=marks[20])
    assert not reader.skipped
    assert [parse_line(t).serial for _, t in reader.read()] == list(range(21, 200))  # type: ignore[union-attr]
    gone = LogReader(log, keep=50, start=Position(ino=1, offset=0))
    assert gone.skipped
    assert parse_line(gone.read()[0][1]).serial == 1  # type: ignore[union-attr]  # the oldest kept file


def test_reader_skips_a_torn_tail_that_was_cut(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text(rec(1) + "\n")
    reader = LogReader(log, keep=2, start=Position(log.stat().st_ino, 0))
    with open(log, "a") as f:
        f.write(rec(2)[:30])  # torn
    assert [parse_line(t).serial for _, t in reader.read()] == [1]  # type: ignore[union-attr]
    with LogWriter(log, 1 << 20, 2) as w:  # cuts the fragment, writes the record whole
        w.append([rec(2), rec(3)])
    assert [parse_line(t).serial for _, t in reader.read()] == [2, 3]  # type: ignore[union-attr]


def test_tail_position(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    assert tail_position(log, 3) is None
    log.write_text("".join(rec(s) + "\n" for s in range(1, 11)) + "torn")
    pos = tail_position(log, 3)
    assert pos is not None
    assert [parse_line(t).serial for _, t in LogReader(log, 2, start=pos).read()] == [8, 9, 10]  # type: ignore[union-attr]
    assert tail_position(log, 100).offset == 0  # type: ignore[union-attr]

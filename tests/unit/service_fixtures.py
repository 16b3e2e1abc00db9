"""Shared pieces of the service tests: decisions, raw ring-buffer events, a fake ring buffer."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from ipe_bpf.audit.record import AccessRecord, decode
from ipe_bpf.policy.layout import load_header

BOOT_ID = "11111111-1111-1111-1111-111111111111"


@dataclasses.dataclass(frozen=True)
class IdentifiedRecord(AccessRecord):
    """An AccessRecord as it will be once the BPF event carries the subject's identity."""

    uid: int | None = None
    auid: int | None = None
    ses: int | None = None
    exe: bytes | None = None


def access(**changes: object) -> AccessRecord:
    base = AccessRecord(
        timestamp=1732100000.210, op="EXECUTE", hook="BPRM_CHECK", enforcing=True, action="DENY",
        source="op_default", rule_index=None, generation=7, pid=4711, comm=b"bash",
        path=b"/tmp/payload", path_is_name_only=False, dev=b"tmpfs", ino=31,
        rule="DEFAULT op=EXECUTE action=DENY",
    )
    if any(k in changes for k in ("uid", "auid", "ses", "exe")):
        return IdentifiedRecord(**{**dataclasses.asdict(base), **changes})  # type: ignore[arg-type]
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def raw_event(pid: int, path: bytes = b"/tmp/payload", **fields: object) -> bytes:
    """A ring-buffer record (struct ipe_event of bpf/ipe_bpf.h) for a DENY of an exec."""
    layout = load_header().struct("ipe_event")
    base: dict[str, object] = dict(
        boot_ns=int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1e9), generation=7, ino=31, pid=pid,
        rule_index=0, op=0, hook=0, enforcing=1, action=1, source=1, path_kind=1,
        path_len=len(path), comm=b"bash", dev=b"tmpfs", path=path,
    )
    base.update(fields)
    return layout.pack(**base)  # type: ignore[arg-type]


class FakeRing:
    """The daemon's EventSource over a list, with the kernel ring buffer's position arithmetic.

    ``produce`` appends records (or counts a drop when ``capacity`` records are unconsumed);
    positions advance by the record size; ``advance`` is the consumer_pos write.
    """

    def __init__(self, identity: str = "map:1", capacity: int = 1 << 30,
                 decoder: Callable[[bytes], AccessRecord] = decode) -> None:
        self.identity = identity
        self.record_size = (len(raw_event(1)) + 8 + 7) & ~7
        self.capacity = capacity
        self.records: list[bytes] = []  # every record ever produced, by index
        self.consumed = 0  # index of the first unconsumed record
        self.dropped = 0
        self.decoder = decoder
        self.closed = False

    def produce(self, raw: bytes) -> None:
        if len(self.records) - self.consumed >= self.capacity:
            self.dropped += 1
            return
        self.records.append(raw)

    def consumer_pos(self) -> int:
        return self.consumed * self.record_size

    def peek(self, limit: int) -> list[tuple[int, bytes]]:
        end = min(len(self.records), self.consumed + limit)
        return [((i + 1) * self.record_size, self.records[i]) for i in range(self.consumed, end)]

    def advance(self, pos: int) -> None:
        assert pos % self.record_size == 0 and pos >= self.consumer_pos()
        self.consumed = pos // self.record_size

    def pending(self) -> int:
        return len(self.records) - self.consumed

    def drops(self) -> int:
        return self.dropped

    def decode(self, raw: bytes) -> AccessRecord:
        return self.decoder(raw)

    def wait(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FileRing(FakeRing):
    """A FakeRing whose records and consumer position live in files, so that a daemon in another
    process can be SIGKILLed and a new one find the ring as the kernel would keep it."""

    def __init__(self, directory: Path, identity: str = "map:1") -> None:
        super().__init__(identity)
        self.data = directory / "ring.bin"
        self.cons = directory / "ring.cons"
        self.size = len(raw_event(1))
        if not self.cons.exists():
            self.cons.write_bytes((0).to_bytes(8, "little"))
            self.data.write_bytes(b"")

    def produce(self, raw: bytes) -> None:
        with open(self.data, "ab") as f:
            f.write(raw)

    def _count(self) -> int:
        return self.data.stat().st_size // self.size

    def consumer_pos(self) -> int:
        return int.from_bytes(self.cons.read_bytes(), "little")

    def peek(self, limit: int) -> list[tuple[int, bytes]]:
        first = self.consumer_pos() // self.record_size
        with open(self.data, "rb") as f:
            f.seek(first * self.size)
            blob = f.read(limit * self.size)
        n = len(blob) // self.size
        return [((first + i + 1) * self.record_size, blob[i * self.size : (i + 1) * self.size]) for i in range(n)]

    def advance(self, pos: int) -> None:
        fd = os.open(self.cons, os.O_WRONLY)
        try:
            os.pwrite(fd, pos.to_bytes(8, "little"), 0)
        finally:
            os.close(fd)

    def pending(self) -> int:
        return self._count() - self.consumer_pos() // self.record_size

"""Events read back from the durable log, and their delivery to one sink each.

The durable log is the single source of truth: the journald and kernel-audit sinks do not get
records from the ring buffer but follow the log, each from its own position.  A sink that is
slow or away (journald restarting, a full socket queue) only falls behind; it catches up from
the log, as far back as the rotated files go.

Delivery is at most once, and every possible loss is written down.  Each sink's position is a
24-byte file beside the log (``.audit.log.<sink>.pos``: inode, offset of the first undelivered
byte, and the end of the event being sent, 0 when none), rewritten with one ``pwrite`` before
each send.  After a SIGKILL the event that was being sent may or may not have arrived: it is
not sent again, and a ``lost=1 reason=killed_while_sending sink=<sink>`` record says so.  A
position whose file was rotated away gives ``lost=? reason=rotated_before_delivery``.  The
position file is not fsync-ed: after a power failure a sink may get again the records of its
last seconds (journald itself keeps its own unsynced entries only in memory).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import IpeBpfError
from .durable import LogReader, Position
from .records import AUDIT_IPE_ACCESS, AUDIT_SYSCALL, Event, LogRecord, Record, lost, parse_line
from .sink import Sink, SinkBusy

_PROGRESS = struct.Struct("<QQQ")
RETRY_SECONDS = 5.0


class EventStream:
    """Events, each with the position after it, from a LogReader.

    A 1420 that is the last complete line is held until its 1300 companion is there or the
    log has been at its end for ``grace`` more polls (the daemon's sinks read a log nobody is
    writing to: 0; ``audit tail`` reads while the daemon writes: 1).
    """

    def __init__(self, reader: LogReader, grace: int = 0) -> None:
        self.reader = reader
        self.grace = grace
        self.unreadable = 0  # lines that are no record (skipped)
        self._held: list[tuple[Position, LogRecord]] = []
        self._idle = 0

    def poll(self, budget: int = 1 << 20) -> list[tuple[Position, Event]]:
        lines = self.reader.read(budget)
        self._idle = 0 if lines else self._idle + 1
        for pos, text in lines:
            rec = parse_line(text)
            if rec is None:
                self.unreadable += 1
                continue
            self._held.append((pos, rec))
        out: list[tuple[Position, Event]] = []
        held, i = self._held, 0
        while i < len(held):
            pos, rec = held[i]
            if rec.type == AUDIT_IPE_ACCESS:
                if i + 1 == len(held):
                    if not (self.reader.at_end and self._idle >= self.grace):
                        break
                elif held[i + 1][1].type == AUDIT_SYSCALL and held[i + 1][1].stamp == rec.stamp:
                    out.append((held[i + 1][0], Event(rec, held[i + 1][1])))
                    i += 2
                    continue
            out.append((pos, Event(rec)))
            i += 1
        self._held = held[i:]
        return out


@dataclass
class SinkStats:
    delivered: int = 0
    skipped: int = 0  # not sent because the sink was not ready (e.g. no auditd): not a loss
    lost: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"delivered": self.delivered, "skipped": self.skipped, "lost": self.lost,
                "error": self.error}


class Follower:
    """Delivers the durable log to one sink, each event at most once."""

    def __init__(self, sink: Sink, log: Path, keep: int, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.sink = sink
        self.log = Path(log)
        self.keep = keep
        self.progress_path = self.log.with_name(f".{self.log.name}.{sink.name}.pos")
        self.stats = SinkStats()
        self._clock = clock
        self._fd: int | None = None
        self._stream: EventStream | None = None
        self._backlog: list[tuple[Position, Event]] = []
        self._done = Position(0, 0)
        self._failed_at: float | None = None

    @property
    def position(self) -> Position:
        return self._done

    def start(self, default: Position) -> list[Record]:
        """Resume from the saved position (or ``default``); returns the loss records to log."""
        self._fd = os.open(self.progress_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        raw = os.pread(self._fd, _PROGRESS.size, 0)
        losses: list[Record] = []
        if len(raw) != _PROGRESS.size:
            start = default
        else:
            ino, done, inflight = _PROGRESS.unpack(raw)
            start = Position(ino, inflight or done)
            if inflight:
                losses.append(lost(1, "killed_while_sending", self.sink.name))
                self.stats.lost += 1
        reader = LogReader(self.log, self.keep, start=start)
        if reader.skipped:
            losses.append(lost(None, "rotated_before_delivery", self.sink.name))
        self._stream = EventStream(reader, grace=0)
        self._done = reader.position
        self._save(self._done, 0)
        return losses

    def _save(self, at: Position, inflight_end: int) -> None:
        assert self._fd is not None
        os.pwrite(self._fd, _PROGRESS.pack(at.ino, at.offset, inflight_end), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stream is not None:
            self._stream.reader.close()
        self.sink.close()

    def pump(self, max_events: int = 256) -> int:
        """Deliver what the log holds beyond our position, at most ``max_events`` (the daemon's
        loop goes back to the ring buffer in between); returns how many events were handled."""
        assert self._stream is not None, "start() first"
        if self._failed_at is not None and self._clock() - self._failed_at < RETRY_SECONDS:
            return 0
        if len(self._backlog) < max_events:
            self._backlog += self._stream.poll()
        try:
            ready = self.sink.ready()
        except IpeBpfError as err:
            self._fail(err)
            return 0
        handled, failed = 0, False
        for pos, event in self._backlog[:max_events]:
            begin = self._done.offset if self._done.ino == pos.ino else 0
            if ready:
                self._save(Position(pos.ino, begin), pos.offset)
                try:
                    self.sink.send(event)
                except SinkBusy:
                    self._save(Position(pos.ino, begin), 0)
                    break
                except IpeBpfError as err:
                    self._save(Position(pos.ino, begin), 0)
                    self._fail(err)
                    failed = True
                    break
                self.stats.delivered += 1
            else:
                self.stats.skipped += 1
            self._done = pos
            handled += 1
        del self._backlog[:handled]
        if handled:
            self._save(self._done, 0)
        if not failed:
            self._failed_at, self.stats.error = None, None
        return handled

    def _fail(self, err: IpeBpfError) -> None:
        self._failed_at = self._clock()
        self.stats.error = str(err)

    @property
    def behind(self) -> bool:
        return bool(self._backlog) or self._failed_at is not None

"""``ipe-bpf auditd``: drain the ring buffer into the durable log; feed journald and auditd from it.

One loop, one thread.  Each turn takes a batch: the control records waiting in the spool (see
:mod:`.control`), a ``lost`` record if the kernel's drop counter moved, and up to 4096
decisions from the ring buffer.  The batch is made durable in three steps:

1. intent: ``<run dir>/auditd.cursor`` (JSON, replaced by rename) records the ring-buffer range
   ``[from, to)``, the spool range, the first serial of the decisions, the daemon's own lines,
   and the log's (inode, size) before the write;
2. one ``write`` of all the batch's lines to the log, ``fdatasync``-ed (``log_fsync = batch``);
3. release: the kernel's consumer position moves to ``to``, and the cursor is rewritten with
   the batch done.

A daemon killed anywhere in between finds the intent on restart.  The log says how many of the
batch's lines it got (complete lines after the recorded size; a torn one was cut when the log
was opened); the ring buffer still holds the unreleased records at the same positions, so the
missing lines are rendered again, with the serials of the intent, and written; then the range
is released.  Nothing is written twice, nothing released unwritten.  If the records are gone
from the ring meanwhile (read by an ``audit tail`` while the daemon was down, or ipe-bpf reloaded)
a ``lost`` record counts them.  Drops by a full ring buffer become ``lost=N
reason=ring_buffer_full``, where N is the growth of the kernel's counter.

After each batch the sinks follow the log (:mod:`.followers`).  ``<run dir>/auditd.status``
(JSON, rewritten at most once a second) is what ``ipe-bpf status`` shows: the state, the records
waiting in the ring buffer, and how far each sink is behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..audit.control_log import SPOOL
from ..audit.serials import SerialAllocator, read_boot_id
from .config import Config
from .durable import LogReader, LogWriter, Position, encode_lines
from .followers import Follower
from .records import (Record, access_lines, access_record_count, daemon_started, daemon_stopped, lost,
                      parse_line)
from .sink import Sink
from .source import EventSource
from .status import STATUS

BATCH_MAX = 4096
CHECK_SECONDS = 1.0
CURSOR = "auditd.cursor"


@dataclass
class Pending:
    """A batch being written (the intent)."""

    source: str | None
    ring_from: int
    ring_to: int
    ring_records: int
    spool_from: int
    spool_to: int
    extra: list[str]
    first_serial: int
    log_ino: int
    log_size: int
    drops: int


@dataclass
class Cursor:
    boot_id: str
    source: str | None = None  # the ring buffer the positions below belong to
    ring_pos: int = 0
    drops_seen: int = 0
    spool_offset: int = 0
    clean: bool = False  # the last daemon stopped after draining everything
    pending: Pending | None = None

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> "Cursor":
        pending = obj.pop("pending", None)
        cursor = cls(**obj)  # type: ignore[arg-type]
        cursor.pending = None if pending is None else Pending(**pending)  # type: ignore[arg-type]
        return cursor


def _replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class Counts:
    decisions: int = 0
    records: int = 0
    lost: int = 0
    lost_unknown: int = 0  # lost records whose count is unknown (lost=?)


class Daemon:
    def __init__(
        self,
        cfg: Config,
        sinks: Sequence[Sink],
        *,
        open_source: Callable[[], EventSource | None],
        current_identity: Callable[[], str | None],
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        boot_id: Callable[[], str] = read_boot_id,
    ) -> None:
        self.cfg = cfg
        self.writer = LogWriter(cfg.log_file, cfg.log_max_size, cfg.log_keep, cfg.fsync_batches)
        self.serials = SerialAllocator(cfg.run_dir / "serial", boot_id=boot_id)
        self.followers = [Follower(s, cfg.log_file, cfg.log_keep, clock=monotonic) for s in sinks]
        self.cursor_path = cfg.run_dir / CURSOR
        self.status_path = cfg.run_dir / STATUS
        self.spool_path = cfg.run_dir / SPOOL
        self._open_source = open_source
        self._current_identity = current_identity
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._boot_id = boot_id
        self.source: EventSource | None = None
        self.counts = Counts()
        self.cursor = Cursor(boot_id="")
        self._checked = -1e9
        self._status_at = -1e9
        self.started_at = 0
        self.state = "starting"

    # ------------------------------------------------------------------- cursor

    def _load_cursor(self) -> Cursor:
        boot = self._boot_id()
        try:
            cursor = Cursor.from_json(json.loads(self.cursor_path.read_bytes()))
        except FileNotFoundError:
            return Cursor(boot_id=boot)
        return cursor if cursor.boot_id == boot else Cursor(boot_id=boot)

    def _save_cursor(self) -> None:
        _replace_file(self.cursor_path, json.dumps(asdict(self.cursor)).encode())

    # ------------------------------------------------------------------- start / stop

    def start(self) -> None:
        self.cfg.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        repaired = self.writer.open()
        self.started_at = self._clock_ns()
        begin = self.writer.position
        losses: list[Record] = []
        for follower in self.followers:
            losses += follower.start(begin)
        self.cursor = self._load_cursor()
        self.source = self._open_source()
        losses += self._recover()
        losses += self._adopt_source()
        self._save_cursor()
        self._write_own([daemon_started(os.getpid(), str(self.cfg.log_file), repaired), *losses])
        self.state = "running"

    def stop(self) -> None:
        self.state = "stopping"
        while self._drain_once():
            pass
        self._write_own([daemon_stopped(os.getpid(), self.counts.decisions, self.counts.lost)])
        for follower in self.followers:
            for _ in range(1000):
                if not follower.pump():
                    break
        self.cursor.clean = True
        self._save_cursor()
        self.state = "stopped"
        self.write_status(force=True)
        for follower in self.followers:
            follower.close()
        if self.source is not None:
            self.source.close()
        self.writer.close()
        self.serials.close()

    def run(self, stopping: Callable[[], bool], notify: Callable[[str], None] = lambda _: None) -> None:
        self.start()
        notify("READY=1")
        while not stopping():
            worked = self.step()
            delivered = self.pump()
            self.write_status()
            if not worked and not delivered:
                if self.source is not None:
                    self.source.wait(0.2)
                else:
                    time.sleep(0.2)
        notify("STOPPING=1")
        self.stop()

    # ------------------------------------------------------------------- the loop

    def step(self) -> bool:
        """Check the source (once a second), then write one batch; False if there was nothing."""
        if self._monotonic() - self._checked >= CHECK_SECONDS:
            self._checked = self._monotonic()
            self._follow_reload()
        return self._drain_once()

    def pump(self) -> int:
        return sum(follower.pump() for follower in self.followers)

    def _drops(self) -> int:
        return self.source.drops() if self.source is not None else self.cursor.drops_seen

    def _write_own(self, records: list[Record]) -> None:
        self._commit([], self.cursor.spool_offset, records, [], self.cursor.drops_seen)

    def _drain_once(self) -> bool:
        spool_lines, spool_to = self._read_spool(self.cursor.spool_offset)
        drops = self._drops()
        extra = [lost(drops - self.cursor.drops_seen, "ring_buffer_full")] if drops > self.cursor.drops_seen else []
        if self.source is not None and self.source.consumer_pos() > self.cursor.ring_pos:
            gone = self.source.consumer_pos() - self.cursor.ring_pos  # another reader consumed them
            extra.append(lost(gone // self.source.record_size, "consumed_elsewhere"))
            self.cursor.ring_pos = self.source.consumer_pos()
        raws = self.source.peek(BATCH_MAX) if self.source is not None else []
        if not (spool_lines or extra or raws or spool_to != self.cursor.spool_offset):
            return False
        self._commit(spool_lines, spool_to, extra, raws, drops)
        return True

    def _commit(self, spool_lines: list[str], spool_to: int, extra: list[Record],
                raws: list[tuple[int, bytes | None]], drops: int) -> None:
        src = self.source
        decisions = [src.decode(raw) for _, raw in raws if raw is not None] if src else []
        first = self.serials.allocate(len(extra) + len(decisions))
        now = self._clock_ns()
        extra_lines = [record.line(now, first + i) for i, record in enumerate(extra)]
        ring_first = first + len(extra)
        lines = spool_lines + extra_lines
        for i, decision in enumerate(decisions):
            lines += access_lines(decision, ring_first + i)
        data = encode_lines(lines)
        self.writer.make_room(len(data))
        ring_from = self.cursor.ring_pos
        ring_to = raws[-1][0] if raws else ring_from
        self.cursor.pending = Pending(
            source=src.identity if src else self.cursor.source, ring_from=ring_from, ring_to=ring_to,
            ring_records=len(decisions), spool_from=self.cursor.spool_offset, spool_to=spool_to,
            extra=extra_lines, first_serial=ring_first, log_ino=self.writer.ino,
            log_size=self.writer.size, drops=drops)
        self._save_cursor()
        self.writer.write(data)
        if raws and src is not None:
            src.advance(ring_to)
        self._finish(self.cursor.pending)
        self.counts.decisions += len(decisions)
        self.counts.records += len(spool_lines) + len(extra) + len(decisions)
        for record in extra:
            self._count_loss(record)

    def _finish(self, p: Pending) -> None:
        c = self.cursor
        c.source, c.ring_pos, c.spool_offset, c.drops_seen = p.source, p.ring_to, p.spool_to, p.drops
        c.pending, c.clean = None, False
        self._save_cursor()

    def _count_loss(self, record: Record) -> None:
        if not record.body.startswith("op=lost "):
            return
        count = record.body.split()[1].removeprefix("lost=")
        if count.isdigit():
            self.counts.lost += int(count)
        else:
            self.counts.lost_unknown += 1

    def _read_spool(self, offset: int, end: int | None = None) -> tuple[list[str], int]:
        """Complete spool lines from ``offset`` (up to ``end``); a line that is no record is
        passed over (the spool's writers only ever add whole records)."""
        try:
            with open(self.spool_path, "rb") as f:
                f.seek(offset)
                data = f.read((1 << 20) if end is None else end - offset)
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.decode("utf-8", "surrogateescape").split("\n")[:-1]
        return [t for t in lines if parse_line(t) is not None], offset + len(complete)

    # ------------------------------------------------------------------- sources

    def _adopt_source(self) -> list[Record]:
        """Line the cursor up with the ring buffer pinned now; losses found on the way."""
        src, c = self.source, self.cursor
        if src is None:
            return []
        losses: list[Record] = []
        if c.source == src.identity:
            pos = src.consumer_pos()
            if pos > c.ring_pos:
                losses.append(lost((pos - c.ring_pos) // src.record_size, "consumed_elsewhere"))
            c.ring_pos = pos
        else:
            if c.source is not None and not c.clean:
                losses.append(lost(None, "reloaded_while_stopped"))
            c.source, c.ring_pos, c.drops_seen = src.identity, src.consumer_pos(), 0
        return losses

    def _follow_reload(self) -> None:
        """After unload/load, drain the old ring buffer to its end, then take the new one."""
        ident = self._current_identity()
        if self.source is not None and ident == self.source.identity:
            return
        if self.source is not None:
            while self._drain_once():
                pass
            self.source.close()
            self.source = None
        if ident is None:
            return
        self.source = self._open_source()
        if self.source is not None:
            c = self.cursor
            c.source, c.ring_pos, c.drops_seen = self.source.identity, self.source.consumer_pos(), 0
            self._save_cursor()

    # ------------------------------------------------------------------- recovery

    def _recover(self) -> list[Record]:
        """Finish the batch a killed daemon left half-written; returns losses found."""
        p = self.cursor.pending
        if p is None:
            return []
        reader = LogReader(self.cfg.log_file, self.cfg.log_keep, start=Position(p.log_ino, p.log_size))
        written = [] if reader.skipped else [text for _, text in reader.read(1 << 62)]
        reader.close()
        head = self._read_spool(p.spool_from, p.spool_to)[0] + p.extra
        to_write = head[len(written):]
        ring_done_lines = max(0, len(written) - len(head))
        losses: list[Record] = []
        src = self.source
        same = src is not None and src.identity == p.source
        if p.ring_records and same and src.consumer_pos() == p.ring_from:  # type: ignore[union-attr]
            rest = self._render_range(src, p)[ring_done_lines:]  # type: ignore[arg-type]
            if rest and rest[0].startswith("type=1300 ") and written:
                rest[0] = _stamp_of(written[-1]) + rest[0][rest[0].index("): ") + 3:]
            to_write += rest
        elif p.ring_records and not (same and src.consumer_pos() == p.ring_to):  # type: ignore[union-attr]
            missing = p.ring_records - access_record_count(written[len(head):])
            if missing:
                losses.append(lost(missing, "consumed_elsewhere" if same else "reloaded_while_stopped"))
        if to_write:
            self.writer.write(encode_lines(to_write))
        if same and src.consumer_pos() == p.ring_from:  # type: ignore[union-attr]
            src.advance(p.ring_to)  # type: ignore[union-attr]
        self._finish(p)
        return losses

    def _render_range(self, src: EventSource, p: Pending) -> list[str]:
        count = (p.ring_to - p.ring_from) // src.record_size
        raws = [(end, raw) for end, raw in src.peek(count) if end <= p.ring_to]
        decisions = [src.decode(raw) for _, raw in raws if raw is not None]
        lines: list[str] = []
        for i, decision in enumerate(decisions):
            lines += access_lines(decision, p.first_serial + i)
        return lines

    # ------------------------------------------------------------------- status

    def write_status(self, force: bool = False) -> None:
        now = self._monotonic()
        if not force and now - self._status_at < 1.0:
            return
        self._status_at = now
        src = self.source
        data = {
            "pid": os.getpid(),
            "state": "waiting for `ipe-bpf load`" if src is None and self.state == "running" else self.state,
            "started_ns": self.started_at, "updated_ns": self._clock_ns(),
            "source": src.identity if src else None, "ring_pending": src.pending() if src else 0,
            "decisions_written": self.counts.decisions, "records_written": self.counts.records,
            "lost": self.counts.lost, "lost_unknown": self.counts.lost_unknown,
            "log": {"path": str(self.cfg.log_file), "ino": self.writer.ino, "size": self.writer.size},
            "sinks": {f.sink.name: {**f.stats.as_dict(), "lag_bytes": self._lag(f.position)}
                      for f in self.followers},
        }
        _replace_file(self.status_path, json.dumps(data).encode())

    def _lag(self, at: Position) -> int | None:
        return self.writer.size - at.offset if at.ino == self.writer.ino else None


def _stamp_of(text: str) -> str:
    """``type=1300 audit(S.MS:SERIAL): `` with the stamp of the (1420) line ``text``."""
    return "type=1300 " + text[text.index("audit("): text.index("): ") + 3]

"""Control-plane records (1421, 1422, 1404, load/unload): serials, and the way to every sink.

The policy lifecycle (kernel/lifecycle.py) and ``load``/``unload`` (kernel/control.py) number
their records from the per-boot sequence (:mod:`.serials`) and hand them on through this::

    control = ControlLog.default(store.audit_log_path)
    lines = control.stamp(records, clock_ns())   # before the store commit
    ...commit the store...
    warnings = control.append(lines)             # after it: the store's audit.log, and the
                                                 # audit daemon's spool

The spool, ``<run dir>/spool.log``, is an append-only file for this boot: the audit daemon
copies each complete line into the durable log (with the serial it already has), and from there
to journald and the kernel audit subsystem.  A line appended while the daemon is stopped is
picked up when it starts, in the same boot.  Appends hold an exclusive ``flock``; the bytes of
a line torn by a killed writer (after the last newline: the daemon reads complete lines only,
so it never saw them) are cut by the next append.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .policy_records import AuditLog, Record
from .serials import SerialAllocator

SPOOL = "spool.log"
DEFAULT_RUN_DIR = Path("/run/ipe-bpf")
RUN_DIR_ENV = "IPE_BPF_RUN_DIR"


def run_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The per-boot state directory: ``$IPE_BPF_RUN_DIR``, else /run/ipe-bpf (a tmpfs)."""
    env = os.environ if environ is None else environ
    return Path(env.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


class ControlLog:
    def __init__(self, store_log: Path | None, run: Path, serials: SerialAllocator | None = None) -> None:
        self.store_log = store_log
        self.spool = Path(run) / SPOOL
        self.serials = serials or SerialAllocator.in_dir(run)

    @classmethod
    def default(cls, store_log: Path | None) -> "ControlLog":
        return cls(store_log, run_dir())

    def stamp(self, records: Sequence[Record], time_ns: int) -> tuple[str, ...]:
        """The records' lines, numbered from the per-boot serial sequence."""
        if not records:
            return ()
        first = self.serials.allocate(len(records))
        return tuple(record.line(time_ns, first + i) for i, record in enumerate(records))

    def append(self, lines: Sequence[str]) -> tuple[str, ...]:
        """Write ``lines`` to the store's audit.log and the spool; returns warnings (never raises
        for a log that cannot be written: the change itself is already committed)."""
        warnings = []
        if not lines:
            return ()
        if self.store_log is not None:
            try:
                AuditLog(self.store_log).append(lines)
            except OSError as exc:
                warnings.append(f"audit records not written to {self.store_log}: {exc.strerror}")
        try:
            append_spool(self.spool, lines)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            warnings.append(f"audit records not handed to the audit daemon ({self.spool}: {name}: "
                            f"{exc.strerror})")
        return tuple(warnings)

    def emit(self, records: Sequence[Record], time_ns: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """stamp + append: (lines, warnings), for callers with nothing to commit in between."""
        lines = self.stamp(records, time_ns)
        return lines, self.append(lines)


def append_spool(spool: Path, lines: Sequence[str]) -> None:
    spool.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    data = "".join(text + "\n" for text in lines).encode("utf-8", "surrogateescape")
    fd = os.open(spool, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _cut_torn_tail(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # releases the flock


def _cut_torn_tail(fd: int) -> None:
    size = os.fstat(fd).st_size
    tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
    if tail and not tail.endswith(b"\n"):
        os.ftruncate(fd, size - len(tail) + tail.rfind(b"\n") + 1)

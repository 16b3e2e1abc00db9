"""The durable log: /var/log/ipe-bpf/audit.log, one record a line, one writer, rotated by size.

Writer (:class:`LogWriter`, the audit daemon only):

- one writer at a time: an exclusive ``flock`` on ``audit.log.lock`` (which also holds the
  writer's pid); a second writer fails with EBUSY naming the first;
- append only, ``O_APPEND``; each batch of lines is one ``write``; with ``log_fsync = batch``
  (the default) it is ``fdatasync``-ed before the daemon releases the batch from the ring
  buffer, so a record acknowledged to the kernel survives a power failure;
- nothing is ever truncated or rewritten, with one exception: a line torn by a crash (the
  writer killed inside ``write``, a power failure) is an incomplete last line, and the next
  writer cuts exactly those bytes (after the last newline) before appending.  They are the
  start of a record the daemon had not released from the ring buffer, which it writes again
  whole (see :mod:`.daemon`);
- rotation by size, between batches: ``audit.log.N-1`` -> ``.N`` ... ``audit.log`` ->
  ``audit.log.1``, then a new ``audit.log``; the oldest (``.log_keep``) is dropped.

Readers (:class:`LogReader`: ``audit tail --follow``, the journald and kernel-audit sinks)
follow by position (inode, offset), like ``tail -F``: complete lines only; at the end of a
file whose name now points elsewhere they finish it and go on with the next newer file; a file
that shrank below the reader's offset (a torn tail cut) is read on from its new end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ServiceError

_LOG_MODE = 0o640
_CHUNK = 1 << 16


def _errno(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


def _fail(exc: OSError, what: str, path: Path) -> ServiceError:
    return ServiceError(_errno(exc), f"{what}: {exc.strerror}", path=str(path))


def encode_lines(lines: Sequence[str]) -> bytes:
    return "".join(text + "\n" for text in lines).encode("utf-8", "surrogateescape")


def lock_path(log: Path) -> Path:
    return log.with_name(log.name + ".lock")


def rotation_lock_path(log: Path) -> Path:
    return log.with_name(log.name + ".rotate")


@contextlib.contextmanager
def rotation_lock(log: Path, exclusive: bool) -> Iterator[None]:
    """Held by the writer while it renames files, and by readers while they look up names."""
    try:
        fd = os.open(rotation_lock_path(log), (os.O_RDWR | os.O_CREAT) if exclusive else os.O_RDONLY,
                     0o644)
    except FileNotFoundError:  # no writer ever rotated here
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def rotated_path(log: Path, index: int) -> Path:
    return log if index == 0 else log.with_name(f"{log.name}.{index}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, order=True)
class Position:
    """A place in the log: the file's inode and a byte offset in it."""

    ino: int
    offset: int


def writer_pid(log: Path) -> int | None:
    """The pid of the process holding the writer lock of ``log`` (0 if unknown), None if free."""
    try:
        fd = os.open(lock_path(log), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class LogWriter:
    """The single writer of the durable log (``open`` takes the lock, ``close`` releases it)."""

    def __init__(self, path: Path, max_size: int, keep: int, fsync: bool = True) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.keep = keep
        self.fsync = fsync
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self.ino = 0
        self.size = 0

    # ----------------------------------------------------------------- open / close

    def open(self) -> int:
        """Lock, open, cut a torn last line; returns how many torn bytes were cut."""
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            lock = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _fail(exc, "cannot open the log lock", lock_path(self.path)) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(lock)
            raise ServiceError("EBUSY", f"another writer (pid {holder}) holds the log lock",
                               path=str(lock_path(self.path))) from None
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = lock
        try:
            self._open_log()
            return self._cut_torn_tail()
        except BaseException:
            self.close()
            raise

    def _open_log(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _LOG_MODE)
        except OSError as exc:
            raise _fail(exc, "cannot open the log", self.path) from None
        st = os.fstat(fd)
        self._fd, self.ino, self.size = fd, st.st_ino, st.st_size

    def _cut_torn_tail(self) -> int:
        """Cut the bytes after the last newline (an incomplete record) and return how many."""
        assert self._fd is not None
        if self.size == 0:
            return 0
        with open(self.path, "rb") as f:
            end = self.size
            while end > 0:
                start = max(0, end - _CHUNK)
                f.seek(start)
                at = f.read(end - start).rfind(b"\n")
                if at >= 0:
                    keep = start + at + 1
                    break
                end = start
            else:
                keep = 0
        torn = self.size - keep
        if torn:
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            self.size = keep
        return torn

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "LogWriter":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- writing

    @property
    def position(self) -> Position:
        return Position(self.ino, self.size)

    def append(self, lines: Sequence[str]) -> Position:
        """Append ``lines`` (each gets a newline) in one write; returns the position after them."""
        data = encode_lines(lines)
        self.make_room(len(data))
        return self.write(data)

    def make_room(self, incoming: int) -> None:
        """Rotate first if ``incoming`` bytes would take the log past its size (never splits)."""
        if self.size and self.size + incoming > self.max_size:
            self._rotate()

    def write(self, data: bytes) -> Position:
        """Append ``data`` (whole lines) in one write, fdatasync-ed if so configured.

        A failed write (ENOSPC, EIO) is undone to the last complete line before it is reported.
        """
        if self._fd is None:
            raise ServiceError("EBADF", "the log is not open", path=str(self.path))
        if not data:
            return self.position
        fd, before = self._fd, self.size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fdatasync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise _fail(exc, "cannot append to the log", self.path) from None
        self.size = before + len(data)
        return self.position

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def _rotate(self) -> None:
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)
            with rotation_lock(self.path, exclusive=True):
                self._shift_files()
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise _fail(exc, "cannot rotate the log", self.path) from None

    def _shift_files(self) -> None:
        """audit.log.N-1 -> .N, ..., audit.log -> .1, a new audit.log (under the rotation lock)."""
        for index in range(self.keep - 1, 0, -1):
            older = rotated_path(self.path, index)
            if older.exists():
                os.replace(older, rotated_path(self.path, index + 1))
        os.replace(self.path, rotated_path(self.path, 1))
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self._open_log()


# --------------------------------------------------------------------------- reading


class LogReader:
    """Complete lines of the log from a position on, across rotations (``tail -F``).

    ``start`` None: the current end of the log.  If the file of ``start`` no longer exists
    (rotated away), reading starts at the oldest file kept and ``skipped`` is True.
    """

    def __init__(self, path: Path, keep: int, start: Position | None = None) -> None:
        self.path = Path(path)
        self.keep = keep
        self.skipped = False
        self.at_end = False  # the last read() stopped at the end of the log, not at its budget
        self._fd: int | None = None
        self.ino = 0
        self.offset = 0
        self._partial = b""
        if start is None:
            if self._open(self.path):
                self.offset = os.fstat(self._fd).st_size  # type: ignore[arg-type]
        else:
            with rotation_lock(self.path, exclusive=False):
                files = self._files()
                found = next((p for _, p, i in files if i == start.ino), None)
                if found is None:
                    self.skipped = True
                    self._open(files[-1][1] if files else self.path)  # the oldest kept
                elif self._open(found):
                    self.offset = start.offset

    @property
    def position(self) -> Position:
        """Where the next complete line starts."""
        return Position(self.ino, self.offset - len(self._partial))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self.close()
        self._fd, self.ino, self.offset, self._partial = fd, os.fstat(fd).st_ino, 0, b""
        return True

    def _files(self) -> list[tuple[int, Path, int]]:
        """(index, path, inode) of the log and its rotated files that exist, newest first."""
        found = []
        for index in range(self.keep + 1):
            path = rotated_path(self.path, index)
            with contextlib.suppress(FileNotFoundError):
                found.append((index, path, os.stat(path).st_ino))
        return found

    def _next_file(self) -> int | None:
        """An fd of the file written after ours, None while ours is the newest.

        Names are looked up under the rotation lock: a reader never sees the writer's renames
        half done (``.1`` already ``.2`` while ``audit.log`` is not ``.1`` yet).
        """
        with rotation_lock(self.path, exclusive=False):
            files = self._files()
            index = next((index for index, _, ino in files if ino == self.ino), None)
            if index == 0:
                return None
            newer = self.path if index is None else rotated_path(self.path, index - 1)  # None: deleted
            try:
                return os.open(newer, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None

    def read(self, budget: int = 1 << 20) -> list[tuple[Position, str]]:
        """The complete lines now readable, each with the position after it."""
        out: list[tuple[Position, str]] = []
        self.at_end = True
        if self._fd is None and not self._open(self.path):
            return out
        read = 0
        while True:
            if read >= budget:
                self.at_end = False
                break
            got = self._pull(out)
            read += got
            if got:
                continue
            newer = self._next_file()
            if newer is None:
                self._check_shrunk()
                break
            while self._pull(out):  # the writer finished this file before renaming it
                pass
            self.close()
            self._fd, self.ino, self.offset, self._partial = newer, os.fstat(newer).st_ino, 0, b""
        return out

    def _pull(self, out: list[tuple[Position, str]]) -> int:
        assert self._fd is not None
        data = os.pread(self._fd, _CHUNK, self.offset)
        if not data:
            return 0
        base = self.offset - len(self._partial)
        buf = self._partial + data
        self.offset += len(data)
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            out.append((Position(self.ino, base + end + 1),
                        buf[start:end].decode("utf-8", "surrogateescape")))
            start = end + 1
        self._partial = buf[start:]
        return len(data)

    def _check_shrunk(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size < self.offset:  # a torn tail was cut: the partial line is gone
            self.offset, self._partial = size, b""


def tail_position(path: Path, lines: int) -> Position | None:
    """The position ``lines`` complete lines before the end of ``path`` (None: no log)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        start = max(0, st.st_size - max(1 << 18, lines * 2048))
        data = os.pread(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    floor = 0 if start == 0 else data.find(b"\n") + 1  # a line cut by `start` is not counted
    cut = data.rfind(b"\n") + 1
    for _ in range(lines):
        if cut <= floor:
            break
        cut = max(floor, data.rfind(b"\n", 0, cut - 1) + 1)
    return Position(st.st_ino, start + max(cut, floor))

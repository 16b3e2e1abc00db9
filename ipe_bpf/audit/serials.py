"""One serial sequence per boot for every record ipe-bpf writes, shared by all its processes.

The kernel numbers audit records ``audit(<time>:<serial>)`` with one counter per boot; ipe-bpf
does the same for its decisions (1420), policy changes (1421, 1422), mode changes and
load/unload (1404), and the daemon's own records.  The counter lives in ``<run dir>/serial``
(/run is a tmpfs: it starts again at 1 on every boot) as one fixed-width text line::

    <boot id> <next serial, 20 digits>

Every allocation takes an exclusive ``flock`` on the file, reads the line, and rewrites it in
place with one ``pwrite`` (58 bytes inside the first page: a process killed at any point leaves
the old line or the new one, never half of each).  A line naming another boot id (a /run that
is not a tmpfs) starts the sequence again at 1.  An empty file (its creator died before the
first write) is a fresh counter.

Who calls it: the audit daemon reserves a block for each drained batch; the policy lifecycle,
load/unload and ``audit tail`` (reading the ring buffer) through :mod:`.control_log`.  Serials are unique per boot; they are
increasing per writer and roughly in time order overall (like the kernel's, which are taken at
record creation).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import ServiceError

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
SERIAL_FILE = "serial"
_WIDTH = 20


def read_boot_id(path: Path = BOOT_ID_FILE) -> str:
    """This boot's random id (36 characters)."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ServiceError(errno.errorcode.get(exc.errno or 0, "EIO"),
                           f"cannot read the boot id: {exc.strerror}", path=str(path)) from None


def _errno(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


class SerialAllocator:
    """Hands out blocks of consecutive serials, unique across processes for this boot."""

    def __init__(self, path: Path, boot_id: Callable[[], str] = read_boot_id) -> None:
        self.path = Path(path)
        self._boot_id = boot_id
        self._fd: int | None = None

    @classmethod
    def in_dir(cls, run_dir: Path) -> "SerialAllocator":
        return cls(Path(run_dir) / SERIAL_FILE)

    def _open(self) -> int:
        if self._fd is None:
            try:
                self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ServiceError(_errno(exc), f"cannot open the serial counter: {exc.strerror}",
                                   path=str(self.path)) from None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SerialAllocator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self, fd: int, boot: str) -> int:
        raw = os.pread(fd, 128, 0)
        if not raw:
            return 1
        parts = raw.decode("ascii", "replace").split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ServiceError("EUCLEAN", f"the serial counter is corrupt ({raw[:60]!r}); it is only "
                               f"ever rewritten whole, so something else wrote it", path=str(self.path))
        return int(parts[1]) if parts[0] == boot else 1

    def allocate(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive serials; returns the first (count 0: the next one, unreserved)."""
        if count < 0:
            raise ValueError("count must not be negative")
        boot = self._boot_id()
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                first = self._next(fd, boot)
                if count:
                    line = f"{boot} {first + count:0{_WIDTH}d}\n".encode("ascii")
                    if os.pwrite(fd, line, 0) != len(line):
                        raise ServiceError("EIO", "short write of the serial counter", path=str(self.path))
                return first
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise ServiceError(_errno(exc), f"cannot update the serial counter: {exc.strerror}",
                               path=str(self.path)) from None

"""Reading a policy (or key, certificate, signed blob) from a file, with limits.

A policy larger than MAX_INPUT_BYTES, a directory or a device is refused before anything is
read: `/dev/zero` would otherwise be read until memory runs out.  Regular files and pipes
(`<(...)`, `/dev/stdin`) are read, a pipe up to the limit.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import InputError

MAX_INPUT_BYTES = 64 << 20  # 64 MiB: ~500k rules; kernel IPE takes at most a few MiB
_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory",
          stat.S_IFSOCK: "a socket"}


def read_input(path: Path, limit: int | None = None) -> bytes:
    """The bytes of `path` (at most `limit`, MAX_INPUT_BYTES by default); InputError otherwise."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    where = str(path)
    try:
        _check_kind(os.stat(path).st_mode, where)  # before open(): opening a device may block
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise _os_error(exc, where) from None
    try:
        info = os.fstat(fd)
        _check_kind(info.st_mode, where)
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise InputError("EFBIG", f"{info.st_size} bytes, more than the {_mib(limit)} ipe-bpf reads", path=where)
        chunks: list[bytes] = []
        size = 0
        # a regular file in one read of its size and a byte more, so that join() has one chunk
        # to return as it is (no copy: 0.03 s for a 100k-rule policy in the VM); pipes by MiB
        step = info.st_size + 1 if stat.S_ISREG(info.st_mode) else 1 << 20
        while chunk := os.read(fd, min(step, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            step = 1 << 20
            if size > limit:
                raise InputError("EFBIG", f"more than the {_mib(limit)} ipe-bpf reads", path=where)
        return b"".join(chunks)
    except OSError as exc:
        raise _os_error(exc, where) from None
    finally:
        os.close(fd)


def _check_kind(mode: int, where: str) -> None:
    kind = _KINDS.get(stat.S_IFMT(mode))
    if kind is not None:
        raise InputError("EINVAL", f"is {kind}, not a file", path=where)


def _mib(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"


def _os_error(exc: OSError, where: str) -> InputError:
    name = errno.errorcode.get(exc.errno or 0, "EIO")
    return InputError(name, exc.strerror or str(exc), path=where)

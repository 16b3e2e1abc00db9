"""A consumer of the pinned BPF ring buffer (ipe_events), in plain Python (mmap + epoll).

The records it yields are decoded by ipe_bpf.audit.record.decode (ipe_bpf.kernel.events does both).

Kernel protocol (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (we write it); page 1
holds producer_pos; the data area follows, mapped twice so a record never wraps.  Each
record starts with an 8-byte header: __u32 len (bit 31 BUSY: not committed yet, bit 30
DISCARD), __u32 page offset; the record is padded to 8 bytes.

Consuming removes records for every reader: run one `audit tail --follow` at a time.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

from ..errors import KernelError
from . import bpfsys
from .pins import PIN_ROOT, map_path

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBuffer:
    def __init__(self, root: Path = PIN_ROOT) -> None:
        path = map_path("ipe_events", root)
        if not path.exists():
            raise KernelError("ENOENT", "ipe-bpf is not loaded (run `ipe-bpf load`)")
        self.fd = bpfsys.obj_get(str(path))
        info = bpfsys.map_info(self.fd)
        self.size = info.max_entries  # data area bytes (a power of two)
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self.page = page
        self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._epoll = select.epoll()
        self._epoll.register(self.fd, select.EPOLLIN)

    def close(self) -> None:
        self._epoll.close()
        self._cons.close()
        self._prod.close()
        os.close(self.fd)

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drain(self) -> Iterator[bytes]:
        """Every committed record now in the buffer, in order."""
        cons = struct.unpack_from("=Q", self._cons, 0)[0]
        while True:
            prod = struct.unpack_from("=Q", self._prod, 0)[0]
            if cons >= prod:
                break
            at = self.page + (cons & self.mask)
            length = struct.unpack_from("=I", self._prod, at)[0]
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            record = None if length & _DISCARD else bytes(self._prod[at + _HDR : at + _HDR + size])
            cons += (size + _HDR + 7) & ~7
            struct.pack_into("=Q", self._cons, 0, cons)
            if record is not None:
                yield record

    def pending_bytes(self) -> int:
        """Bytes of records written and not yet consumed."""
        cons = struct.unpack_from("=Q", self._cons, 0)[0]
        return max(0, struct.unpack_from("=Q", self._prod, 0)[0] - cons)

    def wait(self, timeout: float | None) -> bool:
        """Block until the kernel signals new data (or timeout); True if signalled."""
        return bool(self._epoll.poll(-1 if timeout is None else timeout))

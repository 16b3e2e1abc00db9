"""Where the audit daemon gets decisions: the pinned BPF ring buffer, read without consuming.

This module is the service's only door into ``ipe_bpf.kernel`` and the ring-buffer half of
``ipe_bpf.audit``.  ``audit tail`` consumes records as it prints them; the daemon must not: it
reads a batch (:meth:`RingSource.peek`), makes it durable, and only then moves the kernel's
``consumer_pos`` past it (:meth:`RingSource.advance`).  Positions are the kernel's own 64-bit
byte counters, which never wrap, so they double as the daemon's cursor.

The ring buffer lives as long as its pin: ``unload`` + ``load`` make a new one, with a new map
id, which is the source's ``identity``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Protocol

from ..errors import IpeBpfError
from ..audit.record import AccessRecord, RuleLookup, SealRecord, decode_any, event_size
from ..kernel.ringbuf import RingBuffer
from ..kernel import bpfsys
from ..kernel.maps import PinnedPolicyMaps
from ..kernel.pins import PIN_ROOT, map_path

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class EventSource(Protocol):
    identity: str
    record_size: int  # bytes one record takes in the ring (header and padding included)

    def consumer_pos(self) -> int: ...

    def peek(self, limit: int) -> list[tuple[int, bytes | None]]:
        """Up to ``limit`` committed records from consumer_pos on: (position after it, bytes or
        None for a discarded one)."""

    def advance(self, pos: int) -> None: ...

    def pending(self) -> int:
        """Records written and not yet consumed."""

    def drops(self) -> int:
        """Records the kernel could not write (ring full) since load."""

    def decode(self, raw: bytes) -> "AccessRecord | SealRecord": ...

    def wait(self, timeout: float) -> None: ...

    def close(self) -> None: ...


def pinned_identity(root: Path = PIN_ROOT) -> str | None:
    """The identity of the ring buffer pinned now, None if ipe-bpf is not loaded."""
    path = map_path("ipe_events", root)
    try:
        fd = bpfsys.obj_get(str(path))
    except (IpeBpfError, OSError):  # not pinned, or being unpinned
        return None
    try:
        return f"map:{bpfsys.map_info(fd).id}"
    finally:
        os.close(fd)


def _store_rules() -> RuleLookup | None:
    try:
        from ..kernel.lifecycle import Lifecycle
        from ..kernel.store import PolicyStore

        return Lifecycle(PolicyStore.default()).rule_text
    except Exception:  # noqa: BLE001 (records then say rule#N)
        return None


class RingSource:
    """The pinned ipe_events ring buffer and the drop counter of the same load."""

    def __init__(self, root: Path = PIN_ROOT, rules: RuleLookup | None = None) -> None:
        self._rb = RingBuffer(root)
        self._maps = PinnedPolicyMaps(root)
        self.identity = f"map:{bpfsys.map_info(self._rb.fd).id}"
        self.record_size = (event_size() + _HDR + 7) & ~7
        self._rules = rules if rules is not None else _store_rules()

    def consumer_pos(self) -> int:
        return struct.unpack_from("=Q", self._rb._cons, 0)[0]

    def _producer_pos(self) -> int:
        return struct.unpack_from("=Q", self._rb._prod, 0)[0]

    def peek(self, limit: int) -> list[tuple[int, bytes | None]]:
        rb = self._rb
        pos = self.consumer_pos()
        prod = self._producer_pos()
        out: list[tuple[int, bytes | None]] = []
        while len(out) < limit and pos < prod:
            at = rb.page + (pos & rb.mask)
            length = struct.unpack_from("=I", rb._prod, at)[0]
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            pos += (size + _HDR + 7) & ~7
            out.append((pos, None if length & _DISCARD else bytes(rb._prod[at + _HDR : at + _HDR + size])))
            if pos >= prod:
                prod = self._producer_pos()
        return out

    def advance(self, pos: int) -> None:
        struct.pack_into("=Q", self._rb._cons, 0, pos)

    def pending(self) -> int:
        return max(0, self._producer_pos() - self.consumer_pos()) // self.record_size

    def drops(self) -> int:
        return self._maps.drops()

    def decode(self, raw: bytes) -> "AccessRecord | SealRecord":
        return decode_any(raw, self._rules)

    def wait(self, timeout: float) -> None:
        self._rb.wait(timeout)

    def close(self) -> None:
        self._maps.close()
        self._rb.close()


def open_source(root: Path = PIN_ROOT) -> RingSource | None:
    """The pinned ring buffer, or None if ipe-bpf is not loaded (or is being unloaded)."""
    try:
        return RingSource(root)
    except (IpeBpfError, OSError):
        return None

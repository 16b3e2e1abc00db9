"""Audited decisions, and attempts refused by the seal, from the loaded program: drain the ring
buffer, decode, print (`audit tail` when no audit daemon runs: reading consumes, so each record
reaches one reader only)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..audit.control_log import run_dir
from ..audit.record import AccessRecord, RuleLookup, SealRecord, decode_any
from ..audit.render import any_json, any_text
from ..audit.serials import SerialAllocator
from .pins import PIN_ROOT
from .ringbuf import RingBuffer


def records(
    follow: bool = False,
    rules: RuleLookup | None = None,
    root: Path = PIN_ROOT,
    idle_exit: float | None = None,
) -> Iterator[AccessRecord]:
    """Decoded decisions (the seal's records are consumed and left out; see all_records)."""
    for r in all_records(follow, rules, root, idle_exit):
        if isinstance(r, AccessRecord):
            yield r


def all_records(
    follow: bool = False,
    rules: RuleLookup | None = None,
    root: Path = PIN_ROOT,
    idle_exit: float | None = None,
) -> Iterator["AccessRecord | SealRecord"]:
    """Decoded records: what is buffered now, then (follow) new ones as they come.

    With follow and idle_exit, stop after idle_exit seconds without a record.
    """
    with RingBuffer(root) as rb:
        last = time.monotonic()
        while True:
            got = False
            for raw in rb.drain():
                got = True
                yield decode_any(raw, rules)
            if got:
                last = time.monotonic()
            if not follow:
                return
            if idle_exit is not None and time.monotonic() - last > idle_exit:
                return
            rb.wait(0.5)


def tail(
    emit: Callable[[str], None],
    follow: bool = False,
    as_json: bool = False,
    rules: RuleLookup | None = None,
    root: Path = PIN_ROOT,
    serials: SerialAllocator | None = None,
) -> int:
    """Print records through `emit`, numbered from the per-boot serial sequence (the one every
    ipe-bpf record takes its serial from); returns how many."""
    count = 0
    serials = SerialAllocator.in_dir(run_dir()) if serials is None else serials
    for r in all_records(follow, rules, root):
        n = serials.allocate(1)
        emit(any_json(r, n) if as_json else any_text(r, n))
        count += 1
    return count

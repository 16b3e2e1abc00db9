"""``audit tail [--follow] [--json]`` while the audit daemon runs: read the durable log.

The ring buffer gives each record to one reader only; the durable log gives every record to
any number of readers, with the serials every sink shows.  So ``audit tail`` reads the log
when a daemon holds its writer lock (:func:`daemon_pid`), like ``tail -n N -F``: the last
``lines`` records, then (follow) new ones as they are written, across rotations.  Text mode
prints the log's lines as they are (a 1420 with its 1300 companion); JSON mode one object
per event (:func:`.records.event_json`).  Without a daemon the CLI reads the ring buffer as
before (``ipe_bpf.audit.tail``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from .config import Config
from .durable import LogReader, tail_position, writer_pid
from .followers import EventStream
from .records import event_json


def daemon_pid(cfg: Config) -> int | None:
    """The pid of the running audit daemon (0 if it cannot be read), None if none runs."""
    return writer_pid(cfg.log_file)


def tail_log(emit: Callable[[str], None], cfg: Config, *, follow: bool = False, as_json: bool = False,
             lines: int = 10, poll: float = 0.25, idle_exit: float | None = None,
             stop: Callable[[], bool] = lambda: False) -> int:
    """Print the last ``lines`` events, then (follow) new ones; returns how many were printed.

    With follow, stops when ``stop()`` says so or after ``idle_exit`` seconds without a record.
    """
    start = tail_position(cfg.log_file, lines) if lines else None
    reader = LogReader(cfg.log_file, cfg.log_keep, start=start)
    stream = EventStream(reader, grace=1)
    printed, last, empty = 0, time.monotonic(), 0
    try:
        while not stop():
            events = stream.poll()
            for _, event in events:
                if as_json:
                    emit(json.dumps(event_json(event)))
                else:
                    emit(event.record.text)
                    if event.companion is not None:
                        emit(event.companion.text)
                printed += 1
            if events:
                last, empty = time.monotonic(), 0
                continue
            empty += 1
            if not follow and empty >= 2:  # the second empty poll flushed a held 1420
                break
            if idle_exit is not None and time.monotonic() - last > idle_exit:
                break
            time.sleep(poll)
    finally:
        reader.close()
    return printed

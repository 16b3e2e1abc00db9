"""What the daemon's sinks (journald, kernel audit) have in common."""

from __future__ import annotations

from typing import Protocol

from .records import Event


class SinkBusy(Exception):
    """The sink cannot take a record right now: nothing was sent, try the same record later."""


class Sink(Protocol):
    name: str

    def ready(self) -> bool:
        """Deliver now?  False: the records are skipped for this sink (e.g. no auditd)."""

    def send(self, event: Event) -> None:
        """Deliver one event; SinkBusy to retry later, ServiceError if the sink is broken."""

    def close(self) -> None: ...

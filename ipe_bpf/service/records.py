"""Every record the service writes, as one line ``type=NNNN audit(SECONDS.MILLIS:SERIAL): BODY``.

This module is the service's only door into ``ipe_bpf.audit`` (rendering of kernel IPE's
records); the rest of the package imports from here.

What the durable log holds (one serial sequence per boot, see :mod:`.serials`):

=====  ==================  ====================================================================
type   name                body
=====  ==================  ====================================================================
1420   AUDIT_IPE_ACCESS    a decision, byte for byte as kernel IPE writes it
1300   AUDIT_SYSCALL       right after a 1420, same stamp, when the decision carries who made
                           it: ``pid=P auid=A uid=U ses=S exe=E``, the fields of the kernel's
                           accompanying SYSCALL record that ipe-bpf knows (the kernel's has
                           more: arch, syscall, gid, tty, ...)
1421   CONFIG_CHANGE       kernel IPE's (policy activation)
1422   POLICY_LOAD         kernel IPE's (deploy, update)
1404   AUDIT_MAC_STATUS    kernel IPE's for an enforce change; also ``load`` (``enabled=1
                           old-enabled=0``) and ``unload`` (``enabled=0 old-enabled=1``), with
                           the fields the kernel uses for an LSM being switched on or off
1130   SERVICE_START       the audit daemon started: ``op=start pid=P ... lsm=ipe res=1``
1131   SERVICE_STOP        the audit daemon stopped cleanly
1121   TRUSTED_APP         records lost: ``op=lost lost=N reason=R [sink=S] lsm=ipe res=0``;
                           the seal (``op=seal``) and attempts it refused (``op=seal_refused``,
                           from the ring buffer or the control plane; docs/seal.md), the
                           ring buffer's with a 1300 companion
=====  ==================  ====================================================================

1130, 1131 and 1121 are user-space message types of the audit subsystem, so the kernel-audit
sink can send them unchanged (see :mod:`.netlink`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

from ..audit.policy_records import (AUDIT_MAC_STATUS, AUDIT_TRUSTED_APP, UNSET_ID, AuditIdentity, AuditLog,
                                    Record, records_lost)
from ..audit.record import AccessRecord, SealRecord
from ..audit.render import AUDIT_IPE_ACCESS, ipe_text, seal_text, untrusted

AUDIT_SYSCALL = 1300
AUDIT_SERVICE_START = 1130
AUDIT_SERVICE_STOP = 1131

__all__ = ["AUDIT_IPE_ACCESS", "AUDIT_MAC_STATUS", "AccessRecord", "AuditIdentity", "AuditLog",
           "Record", "UNSET_ID"]


# ------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class Identity:
    """Who triggered a decision: what the kernel's SYSCALL record would say about the task."""

    uid: int
    auid: int
    ses: int
    exe: bytes | None  # the task's executable path at decision time; None: unknown

    def body(self, pid: int) -> str:
        exe = "?" if self.exe is None else untrusted(self.exe)
        return f"pid={pid} auid={self.auid} uid={self.uid} ses={self.ses} exe={exe}"


def identity_of(record: "AccessRecord | SealRecord") -> Identity | None:
    """The subject's identity as the ring-buffer event carried it (None: a record without it)."""
    if record.uid is None:
        return None
    return Identity(record.uid, UNSET_ID if record.auid is None else record.auid,
                    UNSET_ID if record.ses is None else record.ses, record.exe)


def stamp(time_ns: int) -> str:
    """``SECONDS.MILLIS`` as the kernel prints it."""
    seconds, rest = divmod(time_ns, 1_000_000_000)
    return f"{seconds}.{rest // 1_000_000:03d}"


def line(record_type: int, time_ns: int, serial: int, body: str) -> str:
    return Record(record_type, body).line(time_ns, serial)


def access_lines(record: "AccessRecord | SealRecord", serial: int) -> list[str]:
    """The 1420 line, byte-identical to kernel IPE's, and its 1300 companion if known; for an
    attempt the seal refused, its 1121 line and the 1300 companion."""
    if isinstance(record, SealRecord):
        text = seal_text(record, serial)
        kind = AUDIT_TRUSTED_APP
    else:
        text = ipe_text(record, serial)
        kind = AUDIT_IPE_ACCESS
    who = identity_of(record)
    if who is None:
        return [text]
    head = text[: text.index("): ") + 3].replace(f"type={kind} ", f"type={AUDIT_SYSCALL} ", 1)
    return [text, head + who.body(record.pid)]


def access_record_count(lines: Iterable[str]) -> int:
    return sum(1 for text in lines if text.startswith(f"type={AUDIT_IPE_ACCESS} "))


def daemon_started(pid: int, log: str, repaired_bytes: int) -> Record:
    return Record(AUDIT_SERVICE_START, f"op=start pid={pid} log={untrusted(log.encode())} "
                                       f"repaired={repaired_bytes} lsm=ipe res=1")


def daemon_stopped(pid: int, written: int, lost: int) -> Record:
    return Record(AUDIT_SERVICE_STOP, f"op=stop pid={pid} written={written} lost={lost} lsm=ipe res=1")


def lost(count: int | None, reason: str, sink: str | None = None) -> Record:
    """Records that never reached the log (sink None) or one sink: ``count`` None if unknown."""
    return Record(AUDIT_TRUSTED_APP, records_lost(count, reason, sink))


# ------------------------------------------------------------------------------ reading

_HEAD = re.compile(r"type=(\d+) audit\((\d+)\.(\d{3}):(\d+)\): ")
_FIELD = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)=("(?:.*?)"(?= [A-Za-z_][A-Za-z0-9_-]*=|$)|[^ ]*)')
_HEX = re.compile(r"(?:[0-9A-F]{2})+")
_UNTRUSTED_KEYS = frozenset({"comm", "path", "dev", "exe"})


@dataclass(frozen=True)
class LogRecord:
    """One parsed line of the durable log."""

    type: int
    seconds: int
    millis: int
    serial: int
    body: str
    text: str  # the whole line, without its newline

    @property
    def stamp(self) -> str:
        return f"{self.seconds}.{self.millis:03d}:{self.serial}"

    @property
    def time(self) -> float:
        return self.seconds + self.millis / 1000


def parse_line(text: str) -> LogRecord | None:
    """A log line as a LogRecord, or None if it is not one (e.g. a torn fragment)."""
    found = _HEAD.match(text)
    if found is None:
        return None
    t, s, ms, serial = (int(g) for g in found.groups())
    return LogRecord(t, s, ms, serial, text[found.end():], text)


def body_fields(body: str) -> list[tuple[str, str]]:
    """``key=value`` pairs in order, values as printed.  A value in double quotes runs to the
    first quote followed by `` key=`` or the end (so 1420's last field ``rule="..."``, whose
    digests print as ``"sha256":HEX``, stays whole)."""
    return _FIELD.findall(body)


def decode_value(key: str, value: str) -> bytes | str | None:
    """A printed value back to what it stands for: ``?`` None, ``"x"`` x, hex (untrusted
    strings: comm, path, dev, exe) the raw bytes, anything else the text itself."""
    if value == "?":
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if key in _UNTRUSTED_KEYS and _HEX.fullmatch(value):
        return bytes.fromhex(value)
    return value


@dataclass(frozen=True)
class Event:
    """One record and, for a 1420, its 1300 companion (same stamp) if there is one."""

    record: LogRecord
    companion: LogRecord | None = None

    @property
    def lines(self) -> int:
        return 1 if self.companion is None else 2

    @cached_property
    def _fields(self) -> tuple[tuple[str, str], ...]:
        pairs = body_fields(self.record.body)
        if self.companion is not None:
            pairs += [(k, v) for k, v in body_fields(self.companion.body) if k != "pid"]
        return tuple(pairs)

    def fields(self) -> list[tuple[str, str]]:
        """The record's fields, then the companion's (its pid, the same, left out)."""
        return list(self._fields)


def group(records: Iterable[LogRecord]) -> Iterator[Event]:
    """Events from records in log order: a 1300 joins the 1420 just before it with its stamp."""
    pending: LogRecord | None = None
    for rec in records:
        if (pending is not None and rec.type == AUDIT_SYSCALL and pending.type == AUDIT_IPE_ACCESS
                and rec.stamp == pending.stamp):
            yield Event(pending, rec)
            pending = None
            continue
        if pending is not None:
            yield Event(pending)
        pending = rec
    if pending is not None:
        yield Event(pending)


def _json_value(key: str, printed: str) -> object:
    value = decode_value(key, printed)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if value is not None and printed.isdigit():
        return int(printed)
    return value


def rule_outcome(rule: str) -> tuple[str | None, str]:
    """(action, source) as the ring-buffer JSON names them, read back from a 1420's rule text."""
    action = rule.rsplit("action=", 1)[1] if "action=" in rule else None
    if rule.startswith("DEFAULT op="):
        return action, "op_default"
    return action, "global_default" if rule.startswith("DEFAULT ") else "rule"


def event_json(event: Event) -> dict[str, object]:
    """An event as one JSON object: type, serial, time, then every field of the record(s).

    A 1420 also gets ``action`` and ``source`` (from its rule) and ``uid``, ``auid``, ``ses``,
    ``exe`` (from its 1300 companion; null when the decision did not carry them).
    """
    rec = event.record
    obj: dict[str, object] = {"type": rec.type, "serial": rec.serial, "time": rec.time}
    for key, printed in event.fields():
        obj[key] = _json_value(key, printed)
    if rec.type == AUDIT_IPE_ACCESS:
        obj["action"], obj["source"] = rule_outcome(str(obj.get("rule", "")))
        for key in ("uid", "auid", "ses", "exe"):
            obj.setdefault(key, None)
    return obj

"""journald sink: each record as one structured journal entry, over journald's native protocol.

The protocol (systemd's JOURNAL_NATIVE_PROTOCOL document) is spoken here directly, with no
libsystemd or python3-systemd: one ``AF_UNIX``/``SOCK_DGRAM`` datagram to
/run/systemd/journal/socket per entry, holding the fields one after another:

- ``NAME=value\\n`` when the value has no newline;
- ``NAME\\n`` + the value's length as a 64-bit little-endian integer + the value + ``\\n``
  otherwise (values are bytes: a path that is not UTF-8 arrives unchanged).

An entry too big for a datagram (EMSGSIZE) goes into a sealed memfd passed alone with
SCM_RIGHTS.  Field names are ``[A-Z0-9_]``, not starting with ``_`` (journald sets the trusted
``_PID``, ``_UID``, ``_SYSTEMD_UNIT``... itself).

Fields of an entry: ``MESSAGE`` (the record's line, for a 1420 byte-identical to kernel IPE's),
``PRIORITY`` (4 an enforced DENY, 5 a permissive DENY and control records, 6 an ALLOW, 3 lost
records), ``SYSLOG_IDENTIFIER=ipe-bpf`` (so ``journalctl -t ipe-bpf``), ``IPE_TYPE``,
``IPE_SERIAL``, ``IPE_STAMP`` (``SECONDS.MILLIS:SERIAL``, the audit stamp), then every field of
the record: ``ipe_op`` -> ``IPE_OP``, ``pid`` -> ``IPE_PID``, ``old-enabled`` ->
``IPE_OLD_ENABLED``, with untrusted strings decoded (hex back to bytes), ``?`` left out, and for
a 1420 ``IPE_ACTION`` plus ``IPE_UID``/``IPE_AUID``/``IPE_SES``/``IPE_EXE`` from its 1300
companion.  So ``journalctl -t ipe-bpf IPE_OP=EXECUTE IPE_ACTION=DENY`` works.

journald rate-limits each unit (10000 messages per 30 s by default): the daemon's unit sets
``LogRateLimitIntervalSec=0``.  A full journald socket queue (EAGAIN) is not an error: the sink
reports :class:`SinkBusy` and the daemon retries from the same record later.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ..errors import ServiceError
from .records import AUDIT_IPE_ACCESS, AUDIT_TRUSTED_APP, Event, decode_value, rule_outcome
from .sink import SinkBusy

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = b"ipe-bpf"


@lru_cache(maxsize=256)
def field_name(key: str) -> str:
    name = key.upper().replace("-", "_")
    return name if name.startswith("IPE_") else "IPE_" + name


def encode_field(name: str, value: bytes) -> bytes:
    if b"\n" not in value:
        return name.encode("ascii") + b"=" + value + b"\n"
    return name.encode("ascii") + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


def encode_entry(fields: Sequence[tuple[str, bytes]]) -> bytes:
    return b"".join(encode_field(name, value) for name, value in fields)


def _priority(event: Event) -> bytes:
    rec = event.record
    if rec.type == AUDIT_TRUSTED_APP:
        return b"3"
    if rec.type != AUDIT_IPE_ACCESS:
        return b"5"
    denied = rec.body.endswith('action=DENY"')
    if not denied:
        return b"6"
    return b"4" if " enforcing=1 " in rec.body else b"5"


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def journal_fields(event: Event) -> list[tuple[str, bytes]]:
    """The fields of the journal entry for ``event``, in order."""
    rec = event.record
    out = [
        ("MESSAGE", _bytes(rec.text)),
        ("PRIORITY", _priority(event)),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("IPE_TYPE", str(rec.type).encode()),
        ("IPE_SERIAL", str(rec.serial).encode()),
        ("IPE_STAMP", rec.stamp.encode()),
    ]
    action = None
    for key, printed in event.fields():
        value = decode_value(key, printed)
        if value is not None:
            out.append((field_name(key), _bytes(value)))
            if key == "rule" and rec.type == AUDIT_IPE_ACCESS:
                action = rule_outcome(str(value))[0]
    if action is not None:
        out.append(("IPE_ACTION", action.encode()))
    return out


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("ipe-bpf-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class JournalSink:
    """Sends events to journald; ``datagram_limit`` forces the memfd path above that size."""

    name = "journal"

    def __init__(self, path: Path = JOURNAL_SOCKET, datagram_limit: int | None = None) -> None:
        self.path = Path(path)
        self.datagram_limit = datagram_limit
        self._sock: socket.socket | None = None

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def send(self, event: Event) -> None:
        self.send_entry(journal_fields(event))

    def send_entry(self, fields: Sequence[tuple[str, bytes]]) -> None:
        payload = encode_entry(fields)
        try:
            if self.datagram_limit is not None and len(payload) > self.datagram_limit:
                self._send_memfd(payload)
                return
            try:
                self._socket().sendto(payload, str(self.path))
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                self._send_memfd(payload)
        except BlockingIOError:
            raise SinkBusy("the journald socket queue is full") from None
        except OSError as exc:
            self.close()
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            raise ServiceError(name, f"journald: {exc.strerror}", path=str(self.path)) from None

    def _send_memfd(self, payload: bytes) -> None:
        fd = _memfd_with(payload)
        try:
            self._socket().sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                                   0, str(self.path))
        finally:
            os.close(fd)

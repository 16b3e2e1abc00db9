"""Kernel-audit sink: each record as a user message on the audit netlink socket.

Why: auditd writes what the kernel audit subsystem hands it to /var/log/audit/audit.log, and
``ausearch``, ``aureport``, audisp plugins (``audisp-remote``, ``af_unix``, syslog) and SIEM
forwarders read from there.  A user-space program may add records to that stream by sending
a netlink message (``socket(AF_NETLINK, SOCK_RAW, NETLINK_AUDIT)``) whose type is in the user
ranges 1100-1199 or 2100-2999; this needs ``CAP_AUDIT_WRITE`` in the initial user namespace.
The kernel checks the audit user filter (``auditctl -a exclude,...``), then logs::

    type=MAC_CHECK msg=audit(1732100000.214:9123): pid=<daemon> uid=0 auid=4294967295
      ses=4294967295 subj=... msg='<our text>'

with its own time and serial; ``pid``, ``uid``, ``auid``, ``ses`` before ``msg=`` are the
daemon's.  With auditing disabled (``audit=0``, ``auditctl -e 0``) the kernel drops the message
and acknowledges it; with auditing on but no auditd registered it prints it to the kernel log
(rate-limited).  So by default (``kernel_audit = auto``) records are sent only while an auditd
is registered (``AUDIT_GET``: status.pid != 0, checked at most once a second; this needs
``CAP_AUDIT_CONTROL``); records written meanwhile stay in the durable log and journald.

Message types (records keep their own body; ``ausearch -m TYPE -i`` finds them):

==========  ===================================  =========================================
log type    audit type sent                      why
==========  ===================================  =========================================
1420        1134 AUDIT_MAC_CHECK                 "user space MAC decision results"
1422        2310 AUDIT_USER_MAC_POLICY_LOAD      a policy was loaded (deploy, update)
1421        2312 AUDIT_USER_MAC_CONFIG_CHANGE    the active policy changed
1404        2313 AUDIT_USER_MAC_STATUS           enforce changed; load/unload (enabled=)
1130, 1131  the same (SERVICE_START, _STOP)      the audit daemon started / stopped
1121        the same (TRUSTED_APP)               records lost
==========  ===================================  =========================================

The text sent is the record's body, then for a 1420 the subject's identity from its 1300
companion as ``ipe_uid= ipe_auid= ipe_ses= ipe_exe=`` (prefixed: the bare names already belong
to the daemon), then ``ipe_type=<log type> ipe_serial=<serial>``, tying the auditd record to
the durable log's.  So: ``ausearch -m MAC_CHECK,USER_MAC_STATUS -i``.

Framing: ``struct nlmsghdr`` (u32 length, u16 type, u16 flags NLM_F_REQUEST|NLM_F_ACK, u32
sequence, u32 port 0) + the text + one NUL (the kernel overwrites the last byte of the payload
with NUL), padded to 4 bytes; the kernel answers NLMSG_ERROR whose error is 0 or -errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ServiceError
from .records import (AUDIT_IPE_ACCESS, AUDIT_SERVICE_START, AUDIT_SERVICE_STOP, AUDIT_TRUSTED_APP, Event,
                      body_fields)
from .sink import SinkBusy

NETLINK_AUDIT = 9
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
AUDIT_GET = 1000
AUDIT_MAC_CHECK = 1134
AUDIT_USER_MAC_POLICY_LOAD = 2310
AUDIT_USER_MAC_CONFIG_CHANGE = 2312
AUDIT_USER_MAC_STATUS = 2313
AUDIT_MESSAGE_TEXT_MAX = 8560  # the kernel prints at most this much of msg='...'

USER_TYPES = {
    AUDIT_IPE_ACCESS: AUDIT_MAC_CHECK,
    1422: AUDIT_USER_MAC_POLICY_LOAD,
    1421: AUDIT_USER_MAC_CONFIG_CHANGE,
    1404: AUDIT_USER_MAC_STATUS,
    AUDIT_SERVICE_START: AUDIT_SERVICE_START,
    AUDIT_SERVICE_STOP: AUDIT_SERVICE_STOP,
    AUDIT_TRUSTED_APP: AUDIT_TRUSTED_APP,
}

_HDR = struct.Struct("=IHHII")
_STATUS = struct.Struct("=8I")  # mask enabled failure pid rate_limit backlog_limit lost backlog


def audit_message(event: Event) -> tuple[int, bytes]:
    """(audit message type, text) for ``event``; the text has no NUL."""
    rec = event.record
    text = rec.body
    if event.companion is not None:
        extra = [f"ipe_{k}={v}" for k, v in body_fields(event.companion.body) if k != "pid"]
        text += " " + " ".join(extra)
    text += f" ipe_type={rec.type} ipe_serial={rec.serial}"
    msg_type = USER_TYPES.get(rec.type, AUDIT_TRUSTED_APP)
    return msg_type, text.encode("utf-8", "surrogateescape").replace(b"\0", b"")


def frame(msg_type: int, payload: bytes, seq: int, flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """One netlink message: header, payload, NUL, zero padding to a multiple of 4."""
    body = payload + b"\0"
    length = _HDR.size + len(body)
    padded = body + b"\0" * (-length % 4)
    return _HDR.pack(length + (-length % 4), msg_type, flags, seq, 0) + padded


def parse_ack(data: bytes, seq: int) -> int | None:
    """The errno of the NLMSG_ERROR answering ``seq`` in ``data`` (0: accepted), or None."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, msg_type, _flags, got_seq, _port = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            break
        if msg_type == NLMSG_ERROR and got_seq == seq:
            return -struct.unpack_from("=i", data, offset + _HDR.size)[0]
        offset += (length + 3) & ~3
    return None


@dataclass(frozen=True)
class AuditStatus:
    enabled: int
    failure: int
    pid: int  # the registered audit daemon, 0 if none
    rate_limit: int
    backlog_limit: int
    lost: int
    backlog: int


class AuditSocket:
    """A NETLINK_AUDIT socket speaking request/ack."""

    def __init__(self, timeout: float = 5.0) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT)
            self.sock.bind((0, 0))
        except OSError as exc:
            raise _error(exc, "cannot open the audit netlink socket") from None
        self.sock.settimeout(timeout)
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def send_user(self, msg_type: int, text: bytes) -> None:
        """Log one user message; raises ServiceError with the kernel's errno if refused."""
        seq = self._next_seq()
        try:
            self.sock.send(frame(msg_type, text[:AUDIT_MESSAGE_TEXT_MAX], seq))
            while True:
                err = parse_ack(self.sock.recv(8192), seq)
                if err is not None:
                    break
        except socket.timeout:
            raise SinkBusy("no answer from the kernel audit subsystem") from None
        except OSError as exc:
            raise _error(exc, "audit netlink") from None
        if err:
            name = errno.errorcode.get(err, "EIO")
            raise ServiceError(name, f"the kernel refused audit message type {msg_type}: {os.strerror(err)}")

    def status(self) -> AuditStatus:
        """AUDIT_GET (needs CAP_AUDIT_CONTROL)."""
        seq = self._next_seq()
        try:
            self.sock.send(_HDR.pack(_HDR.size, AUDIT_GET, NLM_F_REQUEST, seq, 0))
            while True:
                data = self.sock.recv(8192)
                length, msg_type, _f, got_seq, _p = _HDR.unpack_from(data, 0)
                if got_seq != seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, _HDR.size)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    continue
                if msg_type == AUDIT_GET:
                    v = _STATUS.unpack_from(data, _HDR.size)
                    return AuditStatus(v[1], v[2], v[3], v[4], v[5], v[6], v[7])
        except socket.timeout:
            raise ServiceError("ETIMEDOUT", "no answer to AUDIT_GET from the kernel") from None
        except OSError as exc:
            raise _error(exc, "AUDIT_GET") from None


def _error(exc: OSError, what: str) -> ServiceError:
    return ServiceError(errno.errorcode.get(exc.errno or 0, "EIO"), f"{what}: {exc.strerror or exc}")


class KernelAuditSink:
    """Sends events to the kernel audit subsystem (``mode`` "yes": always, "auto": while an
    auditd is registered)."""

    name = "kernel_audit"

    def __init__(self, mode: str = "auto", opener: Callable[[], AuditSocket] = AuditSocket,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self._opener = opener
        self._sock: AuditSocket | None = None
        self._checked_at = -1e9
        self._auditd = False
        self._clock = clock

    def _socket(self) -> AuditSocket:
        if self._sock is None:
            self._sock = self._opener()
        return self._sock

    def ready(self) -> bool:
        if self.mode == "yes":
            return True
        now = self._clock()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            self._auditd = self._socket().status().pid != 0
        return self._auditd

    def send(self, event: Event) -> None:
        self._socket().send_user(*audit_message(event))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""The journald sink (native protocol, against a datagram socket bound here) and the kernel-audit
sink (netlink framing: exact bytes, and the real kernel audit socket of this machine)."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
from pathlib import Path

import pytest

from ipe_bpf.errors import ServiceError
from ipe_bpf.service.journal import JournalSink, encode_entry
from ipe_bpf.service.netlink import (
    AUDIT_MAC_CHECK,
    AUDIT_USER_MAC_STATUS,
    AuditSocket,
    KernelAuditSink,
    audit_message,
    frame,
    parse_ack,
)
from ipe_bpf.audit.policy_records import lsm_switched
from ipe_bpf.service.records import AuditIdentity, Event, Record, access_lines, line, lost, parse_line
from ipe_bpf.service.sink import SinkBusy

from .service_fixtures import access


def event_of(lines: list[str]) -> Event:
    first = parse_line(lines[0])
    assert first is not None
    return Event(first, parse_line(lines[1]) if len(lines) > 1 else None)


def parse_native(data: bytes) -> list[tuple[str, bytes]]:
    """journald's side of the native protocol, written from its description."""
    out = []
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        head = data[pos:nl]
        if b"=" in head:
            name, value = head.split(b"=", 1)
            out.append((name.decode(), value))
            pos = nl + 1
        else:
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            out.append((head.decode(), data[start : start + size]))
            assert data[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
    return out


@pytest.fixture
def journald(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield path, server
    server.close()


def test_a_decision_becomes_one_structured_entry(journald) -> None:  # type: ignore[no-untyped-def]
    path, server = journald
    lines = access_lines(access(uid=1000, auid=1001, ses=3, exe=b"/usr/bin/bash",
                                path=b"/tmp/new\nline"), 88)
    sink = JournalSink(path)
    sink.send(event_of(lines))
    fields = parse_native(server.recv(65536))
    assert fields[:6] == [
        ("MESSAGE", lines[0].encode()), ("PRIORITY", b"4"), ("SYSLOG_IDENTIFIER", b"ipe-bpf"),
        ("IPE_TYPE", b"1420"), ("IPE_SERIAL", b"88"), ("IPE_STAMP", b"1732100000.210:88"),
    ]
    got = dict(fields)
    assert got["IPE_OP"] == b"EXECUTE" and got["IPE_HOOK"] == b"BPRM_CHECK"
    assert got["IPE_PATH"] == b"/tmp/new\nline"  # hex in the record, raw bytes in the journal
    assert got["IPE_ENFORCING"] == b"1" and got["IPE_PID"] == b"4711" and got["IPE_INO"] == b"31"
    assert got["IPE_RULE"] == b"DEFAULT op=EXECUTE action=DENY"
    assert (got["IPE_UID"], got["IPE_AUID"], got["IPE_SES"], got["IPE_EXE"]) == (b"1000", b"1001", b"3", b"/usr/bin/bash")
    assert got["IPE_ACTION"] == b"DENY"
    assert all(name.replace("_", "").isalnum() and name.isupper() and not name.startswith("_") for name, _ in fields)
    sink.close()


def test_binary_framing_of_a_value_with_a_newline() -> None:
    assert encode_entry([("A", b"x"), ("B", b"1\n2")]) == b"A=x\nB\n" + struct.pack("<Q", 3) + b"1\n2\n"


def test_priorities_and_control_records(journald) -> None:  # type: ignore[no-untyped-def]
    path, server = journald
    sink = JournalSink(path)
    cases = [
        (access_lines(access(enforcing=False), 1), b"5"),
        (access_lines(access(action="ALLOW", rule="DEFAULT op=EXECUTE action=ALLOW"), 2), b"6"),
        ([Record(1404, lsm_switched(True, False, AuditIdentity(0, 3))).line(0, 3)], b"5"),
        ([lost(5, "ring_buffer_full").line(0, 4)], b"3"),
    ]
    for lines, priority in cases:
        sink.send(event_of(lines))
        got = dict(parse_native(server.recv(65536)))
        assert got["PRIORITY"] == priority
    assert got["IPE_LOST"] == b"5" and got["IPE_REASON"] == b"ring_buffer_full"


def test_large_entry_goes_through_a_sealed_memfd(journald) -> None:  # type: ignore[no-untyped-def]
    path, server = journald
    lines = access_lines(access(), 9)
    JournalSink(path, datagram_limit=64).send(event_of(lines))
    fds = array.array("i")
    data, anc, _flags, _addr = server.recvmsg(1024, socket.CMSG_SPACE(4))
    assert data == b""
    for level, kind, payload in anc:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(payload[:4])
    assert len(fds) == 1
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        content = os.pread(fd, 1 << 16, 0)
    finally:
        os.close(fd)
    assert dict(parse_native(content))["MESSAGE"] == lines[0].encode()


def test_full_queue_is_busy_not_an_error(journald) -> None:  # type: ignore[no-untyped-def]
    path, _server = journald  # never read: the queue fills up
    sink = JournalSink(path)
    event = event_of(access_lines(access(), 1))
    with pytest.raises(SinkBusy):
        for _ in range(100000):
            sink.send(event)


def test_no_journald_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as caught:
        JournalSink(tmp_path / "absent").send(event_of(access_lines(access(), 1)))
    assert str(caught.value) == f"{tmp_path / 'absent'}: ENOENT: journald: No such file or directory"


# ------------------------------------------------------------------------ kernel audit


def test_message_text_and_type() -> None:
    with_id = access_lines(access(uid=1000, auid=1001, ses=3, exe=b"/usr/bin/bash"), 88)
    msg_type, text = audit_message(event_of(with_id))
    assert msg_type == AUDIT_MAC_CHECK == 1134
    assert text == (b'ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=1 pid=4711 comm="bash" '
                    b'path="/tmp/payload" dev="tmpfs" ino=31 rule="DEFAULT op=EXECUTE action=DENY" '
                    b'ipe_auid=1001 ipe_uid=1000 ipe_ses=3 ipe_exe="/usr/bin/bash" ipe_type=1420 ipe_serial=88')
    status_type, status_text = audit_message(event_of([Record(1404, lsm_switched(True, True, AuditIdentity(0, 3))).line(0, 4)]))
    assert status_type == AUDIT_USER_MAC_STATUS == 2313
    assert status_text.endswith(b"enabled=1 old-enabled=0 lsm=ipe res=1 ipe_type=1404 ipe_serial=4")
    assert audit_message(event_of([line(1421, 0, 5, "x=1")]))[0] == 2312
    assert audit_message(event_of([line(1422, 0, 6, "x=1")]))[0] == 2310
    assert audit_message(event_of([lost(1, "r").line(0, 7)]))[0] == 1121


def test_frame_exact_bytes() -> None:
    got = frame(1134, b"abc", seq=7)
    # nlmsghdr: len=16+4 (abc + NUL), type 1134, flags REQUEST|ACK, seq 7, port 0; no padding needed
    assert got == struct.pack("=IHHII", 20, 1134, 5, 7, 0) + b"abc\0"
    got = frame(2313, b"ab", seq=1)  # 16 + 3 -> padded to 20
    assert got == struct.pack("=IHHII", 20, 2313, 5, 1, 0) + b"ab\0\0"
    assert len(frame(1134, b"x" * 100, 1)) % 4 == 0


def test_parse_ack() -> None:
    ack = struct.pack("=IHHII", 36, 2, 0x100, 9, 0) + struct.pack("=i", -1) + b"\0" * 16
    other = struct.pack("=IHHII", 36, 2, 0x100, 8, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert parse_ack(other + ack, 9) == 1  # EPERM
    assert parse_ack(other, 9) is None


class FakeAudit:
    def __init__(self, pid: int) -> None:
        self.pid, self.sent, self.asked = pid, [], 0

    def status(self):  # type: ignore[no-untyped-def]
        self.asked += 1
        from ipe_bpf.service.netlink import AuditStatus
        return AuditStatus(1, 1, self.pid, 0, 64, 0, 0)

    def send_user(self, msg_type: int, text: bytes) -> None:
        self.sent.append((msg_type, text))

    def close(self) -> None:
        pass


def test_auto_sends_only_while_auditd_is_registered() -> None:
    now = [0.0]
    fake = FakeAudit(pid=0)
    sink = KernelAuditSink("auto", opener=lambda: fake, clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    assert not sink.ready()
    fake.pid = 321
    assert not sink.ready()  # checked at most once a second
    now[0] = 1.5
    assert sink.ready() and fake.asked == 2
    assert KernelAuditSink("yes", opener=lambda: fake).ready()  # type: ignore[arg-type,return-value]


def _kernel_audit() -> AuditSocket:
    try:
        return AuditSocket()
    except ServiceError as err:
        pytest.fail(f"this machine gives no audit netlink socket ({err}): these tests need one")


def test_real_kernel_answers_audit_get() -> None:
    sock = _kernel_audit()
    try:
        status = sock.status()
    finally:
        sock.close()
    assert status.enabled in (0, 1, 2)
    assert status.backlog_limit > 0


def test_real_kernel_accepts_our_user_message_and_refuses_a_kernel_type() -> None:
    sock = _kernel_audit()
    try:
        msg_type, text = audit_message(event_of(access_lines(access(), 1)))
        sock.send_user(msg_type, text)  # accepted (and logged if this host audits; dropped if it does not)
        with pytest.raises(ServiceError, match="EINVAL"):
            sock.send_user(1200, b"op=test")  # AUDIT_DAEMON_START: not a user type, refused
    finally:
        sock.close()

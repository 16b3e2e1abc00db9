"""1421/1422/1404 records, field by field against kernel IPE 6.12's (docs/audit-records.md)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from ipe_bpf.audit.policy_records import (
    AUDIT_IPE_CONFIG_CHANGE,
    AUDIT_IPE_POLICY_LOAD,
    AUDIT_MAC_STATUS,
    EMPTY_DIGEST,
    UNSET_ID,
    AuditIdentity,
    AuditLog,
    PolicyRef,
    Record,
    config_change,
    lsm_switched,
    mac_status,
    policy_load,
)

WHO = AuditIdentity(auid=0, ses=3)
PROD_DIGEST = bytes(range(32))
PROD_HEX = PROD_DIGEST.hex().upper()


# Record lines in the kernel's format (6.12, security/ipe/audit.c), with placeholders where a
# value depends on the blob: <64HEX> is any SHA-256 in uppercase hex, A…B abbreviates a value.
EXAMPLES = {
    1404: "type=1404 audit(1732100200.000:91): enforcing=0 old_enforcing=1 auid=0 ses=3 enabled=1 "
          "old-enabled=1 lsm=ipe res=1",
    1422: "type=1422 audit(1732100050.500:89): policy_name=\"prod\" policy_version=1.2.0 "
          "policy_digest=sha256:<64HEX> auid=0 ses=3 lsm=ipe res=1",
    1421: "type=1421 audit(1732100100.001:90): old_active_pol_name=\"boot\" old_active_pol_version=0.0.0 "
          "old_policy_digest=sha256:E3B0…B855 new_active_pol_name=\"prod\" new_active_pol_version=1.2.0 "
          "new_policy_digest=sha256:<64HEX> auid=0 ses=3 lsm=ipe res=1",
}
# The kernel's field lists, in its order.
LOAD_FIELDS = "policy_name policy_version policy_digest auid ses lsm res".split()
CHANGE_FIELDS = ("old_active_pol_name old_active_pol_version old_policy_digest new_active_pol_name "
                 "new_active_pol_version new_policy_digest auid ses lsm res").split()


def example_line(record_type: int) -> str:
    return EXAMPLES[record_type]


def fields(line: str) -> list[tuple[str, str]]:
    """(key, value) pairs of a record (its body after `): `)."""
    body = line.split("): ", 1)[1]
    return [tuple(token.split("=", 1)) for token in body.split(" ")]  # type: ignore[misc]


def header(line: str) -> tuple[int, str, int]:
    found = re.fullmatch(r"type=(\d+) audit\((\d+\.\d{3}):(\d+)\): .*", line)
    assert found, line
    return int(found.group(1)), found.group(2), int(found.group(3))


def ns(stamp: str) -> int:
    seconds, millis = stamp.split(".")
    return int(seconds) * 1_000_000_000 + int(millis) * 1_000_000


def assert_matches_example(ours: str, example: str) -> None:
    """Same header, same keys in the same order, same values except the placeholders."""
    assert header(ours) == header(example)
    ours_fields, example_fields = fields(ours), fields(example)
    assert [k for k, _ in ours_fields] == [k for k, _ in example_fields]
    for (key, value), (_, expected) in zip(ours_fields, example_fields):
        if "<64HEX>" in expected:
            assert re.fullmatch(r"sha256:[0-9A-F]{64}", value), (key, value)
        elif "…" in expected:  # abbreviated: E3B0…B855
            head, tail = expected.split("…")
            assert value.startswith(head) and value.endswith(tail), (key, value)
        else:
            assert value == expected, key


def test_1404_matches_kernel_example_exactly() -> None:
    example = example_line(1404)
    _, stamp, serial = header(example)
    line = Record(AUDIT_MAC_STATUS, mac_status(False, True, WHO)).line(ns(stamp), serial)
    assert line == example


def test_1422_matches_example_line() -> None:
    example = example_line(1422)
    _, stamp, serial = header(example)
    body = policy_load(PolicyRef(b"prod", (1, 2, 0), PROD_DIGEST), WHO)
    line = Record(AUDIT_IPE_POLICY_LOAD, body).line(ns(stamp), serial)
    assert_matches_example(line, example)
    assert line.endswith(f"policy_digest=sha256:{PROD_HEX} auid=0 ses=3 lsm=ipe res=1")


@pytest.mark.parametrize("release, appended", [
    ("6.1.0-50-cloud-amd64", False), ("6.12.57+deb13-cloud-amd64", False), ("6.14.0", False),
    ("6.15.0-rc1", True), ("7.3.4+deb13-cloud-amd64", True), ("garbage", True)])
def test_1422_ends_with_errno_where_the_kernel_writes_it(
        monkeypatch: pytest.MonkeyPatch, release: str, appended: bool) -> None:
    monkeypatch.delenv("IPE_BPF_AUDIT_ERRNO")
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", release, "#1", "x86_64")))
    body = policy_load(PolicyRef(b"prod", (1, 2, 0), PROD_DIGEST), WHO)
    assert body.endswith(" lsm=ipe res=1 errno=0") == appended
    assert body.endswith(" lsm=ipe res=1") != appended


def test_1421_matches_kernel_example_with_boot_policy() -> None:
    example = example_line(1421)
    _, stamp, serial = header(example)
    boot = PolicyRef(b"boot", (0, 0, 0), hashlib.sha256(b"").digest())
    body = config_change(boot, PolicyRef(b"prod", (1, 2, 0), PROD_DIGEST), WHO)
    line = Record(AUDIT_IPE_CONFIG_CHANGE, body).line(ns(stamp), serial)
    assert_matches_example(line, example)
    assert f"old_policy_digest=sha256:{EMPTY_DIGEST} " in line


def test_1421_without_previous_policy() -> None:
    body = config_change(None, PolicyRef(b"prod", (1, 2, 0), PROD_DIGEST), WHO)
    assert body == ("old_active_pol_name=? old_active_pol_version=? old_policy_digest=? "
                    f'new_active_pol_name="prod" new_active_pol_version=1.2.0 new_policy_digest=sha256:{PROD_HEX} '
                    "auid=0 ses=3 lsm=ipe res=1")


def test_field_order_is_the_kernels() -> None:
    ours = [k for k, _ in fields("x): " + policy_load(PolicyRef(b"n", (1, 0, 0), PROD_DIGEST), WHO))]
    assert ours == LOAD_FIELDS
    ours_change = config_change(PolicyRef(b"o", (0, 0, 1), PROD_DIGEST), PolicyRef(b"n", (1, 0, 0), PROD_DIGEST), WHO)
    assert [k for k, _ in fields("x): " + ours_change)] == CHANGE_FIELDS


def test_version_is_normalised_decimal() -> None:
    body = policy_load(PolicyRef(b"p", (65535, 0, 7), PROD_DIGEST), WHO)
    assert " policy_version=65535.0.7 " in body


def test_names_are_raw_inside_quotes() -> None:
    odd = b'we"ird\xff\xe9'
    body = policy_load(PolicyRef(odd, (1, 0, 0), PROD_DIGEST), WHO)
    assert body.encode("utf-8", "surrogateescape").startswith(b'policy_name="we"ird\xff\xe9" ')


def test_unset_identity() -> None:
    body = mac_status(True, False, AuditIdentity())
    assert f"auid={UNSET_ID} ses={UNSET_ID}" in body and UNSET_ID == 4294967295


@pytest.mark.parametrize(("loginuid", "sessionid", "expected"), [
    ("1000", "7", (1000, 7)),
    ("4294967295", "4294967295", (UNSET_ID, UNSET_ID)),
    (None, None, (UNSET_ID, UNSET_ID)),
    ("garbage", "-1", (UNSET_ID, UNSET_ID)),
    ("0\n", "3\n", (0, 3)),
])
def test_identity_from_proc(tmp_path: Path, loginuid: str | None, sessionid: str | None,
                            expected: tuple[int, int]) -> None:
    if loginuid is not None:
        (tmp_path / "loginuid").write_text(loginuid)
    if sessionid is not None:
        (tmp_path / "sessionid").write_text(sessionid)
    who = AuditIdentity.from_proc(tmp_path)
    assert (who.auid, who.ses) == expected


def test_identity_of_this_process() -> None:
    who = AuditIdentity.from_proc()
    assert 0 <= who.auid <= UNSET_ID and 0 <= who.ses <= UNSET_ID


@pytest.mark.parametrize(("time_ns", "stamp"), [
    (1_732_100_000_210_000_000, "1732100000.210"),
    (1_000_000_000, "1.000"),
    (1_005_999_999, "1.005"),  # truncated like the kernel (nsec / 1000000)
    (999_999_999, "0.999"),
])
def test_timestamp(time_ns: int, stamp: str) -> None:
    assert Record(1404, "x").line(time_ns, 42) == f"type=1404 audit({stamp}:42): x"


def test_audit_log_appends_lines(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    assert log.lines() == []
    log.append([])
    assert not log.path.exists()
    log.append(["type=1404 audit(1.000:1): a", 'type=1422 audit(1.001:2): policy_name="\udcff\x1c"'])
    log.append(["type=1404 audit(2.000:3): b"])
    assert log.lines() == ["type=1404 audit(1.000:1): a", 'type=1422 audit(1.001:2): policy_name="\udcff\x1c"',
                           "type=1404 audit(2.000:3): b"]
    assert b'policy_name="\xff\x1c"\n' in log.path.read_bytes()


def test_load_and_unload_records() -> None:
    who = AuditIdentity(auid=0, ses=3)
    assert lsm_switched(True, False, who) == ("enforcing=0 old_enforcing=0 auid=0 ses=3 enabled=1 "
                                              "old-enabled=0 lsm=ipe res=1")
    assert lsm_switched(False, True, who) == ("enforcing=1 old_enforcing=1 auid=0 ses=3 enabled=0 "
                                              "old-enabled=1 lsm=ipe res=1")

"""Record lines the service writes, and reading them back (fields, events, JSON)."""

from __future__ import annotations

from ipe_bpf.audit.render import ipe_text
from ipe_bpf.service.records import (
    Event,
    access_lines,
    body_fields,
    decode_value,
    event_json,
    group,
    line,
    lost,
    parse_line,
)

from .service_fixtures import access

SPEC_1420 = ('type=1420 audit(1732100000.210:88): ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=1 '
             'pid=4711 comm="bash" path="/tmp/payload" dev="tmpfs" ino=31 '
             'rule="DEFAULT op=EXECUTE action=DENY"')


def test_1420_line_is_kernel_ipes_and_alone_without_identity() -> None:
    lines = access_lines(access(), 88)
    assert lines == [SPEC_1420]
    assert lines[0] == ipe_text(access(), 88)


def test_identity_goes_to_a_1300_companion_with_the_same_stamp() -> None:
    record = access(uid=1000, auid=1000, ses=3, exe=b"/usr/bin/bash")
    first, companion = access_lines(record, 88)
    assert first == SPEC_1420  # the 1420 itself does not change
    assert companion == ('type=1300 audit(1732100000.210:88): pid=4711 auid=1000 uid=1000 ses=3 '
                         'exe="/usr/bin/bash"')
    odd = access_lines(access(uid=0, auid=4294967295, ses=4294967295, exe=b"/tmp/a b"), 5)[1]
    assert odd.endswith("auid=4294967295 uid=0 ses=4294967295 exe=2F746D702F612062")


def test_lost_record() -> None:
    assert lost(12, "ring_buffer_full").body == "op=lost lost=12 reason=ring_buffer_full lsm=ipe res=0"
    assert lost(None, "killed", sink="journal").body == "op=lost lost=? reason=killed sink=journal lsm=ipe res=0"
    assert line(1121, 1_732_100_000_210_000_000, 7, "x=1") == "type=1121 audit(1732100000.210:7): x=1"


def test_parse_and_fields_round_trip() -> None:
    rec = parse_line(SPEC_1420)
    assert rec is not None
    assert (rec.type, rec.seconds, rec.millis, rec.serial, rec.stamp) == (1420, 1732100000, 210, 88, "1732100000.210:88")
    assert body_fields(rec.body) == [
        ("ipe_op", "EXECUTE"), ("ipe_hook", "BPRM_CHECK"), ("enforcing", "1"), ("pid", "4711"),
        ("comm", '"bash"'), ("path", '"/tmp/payload"'), ("dev", '"tmpfs"'), ("ino", "31"),
        ("rule", '"DEFAULT op=EXECUTE action=DENY"'),
    ]
    assert parse_line("type=1420 audit(1732100000.21") is None  # a torn fragment
    assert parse_line("") is None


def test_rule_with_quoted_digest_algorithm_stays_whole() -> None:
    body = ('ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=1 pid=1 comm="sh" path=2F6120 dev="vda" '
            'ino=2 rule="op=EXECUTE fsverity_digest="sha256":AB01 boot_verified=FALSE action=ALLOW"')
    fields = dict(body_fields(body))
    assert fields["rule"] == '"op=EXECUTE fsverity_digest="sha256":AB01 boot_verified=FALSE action=ALLOW"'
    assert decode_value("path", fields["path"]) == b"/a "
    assert decode_value("rule", fields["rule"]).startswith("op=EXECUTE fsverity_digest=")  # type: ignore[union-attr]


def test_policy_names_with_odd_bytes() -> None:
    body = ('old_active_pol_name=? old_active_pol_version=? old_policy_digest=? '
            'new_active_pol_name="a"b" new_active_pol_version=1.0.0 new_policy_digest=sha256:AB '
            'auid=0 ses=3 lsm=ipe res=1')
    fields = dict(body_fields(body))
    assert fields["new_active_pol_name"] == '"a"b"'
    assert fields["new_active_pol_version"] == "1.0.0"
    assert decode_value("old_active_pol_name", "?") is None


def test_group_joins_companions_only_to_their_1420() -> None:
    with_id = access_lines(access(uid=1000, auid=1000, ses=3, exe=b"/bin/sh"), 10)
    other = access_lines(access(), 11)
    stray = with_id[1].replace(":10)", ":12)")
    records = [parse_line(t) for t in [*with_id, *other, stray]]
    events = list(group(r for r in records if r is not None))
    assert [(e.record.serial, e.companion is not None) for e in events] == [(10, True), (11, False), (12, False)]


def test_event_json_carries_identity_or_null() -> None:
    first, companion = access_lines(access(uid=1000, auid=1001, ses=3, exe=b"/usr/bin/bash"), 88)
    obj = event_json(Event(parse_line(first), parse_line(companion)))  # type: ignore[arg-type]
    assert obj == {
        "type": 1420, "serial": 88, "time": 1732100000.21, "ipe_op": "EXECUTE",
        "ipe_hook": "BPRM_CHECK", "enforcing": 1, "pid": 4711, "comm": "bash",
        "path": "/tmp/payload", "dev": "tmpfs", "ino": 31, "rule": "DEFAULT op=EXECUTE action=DENY",
        "auid": 1001, "uid": 1000, "ses": 3, "exe": "/usr/bin/bash", "action": "DENY",
        "source": "op_default",
    }
    bare = event_json(Event(parse_line(SPEC_1420)))  # type: ignore[arg-type]
    assert (bare["uid"], bare["auid"], bare["ses"], bare["exe"]) == (None, None, None, None)
    control = event_json(Event(parse_line(line(1422, 0, 4, 'policy_name="123" policy_version=1.0.0 auid=0 ses=3 lsm=ipe res=1'))))  # type: ignore[arg-type]
    assert control["policy_name"] == "123" and control["auid"] == 0 and control["res"] == 1

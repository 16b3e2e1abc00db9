"""Audit decoding and the spec's 1420 rendering (no kernel needed)."""

from __future__ import annotations

import json
import time

from ipe_bpf.audit.record import decode, rules_from_policies
from ipe_bpf.audit.render import ipe_fields, json_line
from ipe_bpf.policy.model import untrusted
from ipe_bpf.policy.layout import load_header
from ipe_bpf.policy.model import Action, BoolKey, BoolProperty, Digest, DigestKey, DigestProperty, Op, Rule


def _event(**fields: object) -> bytes:
    layout = load_header().struct("ipe_event")
    base: dict[str, object] = dict(
        boot_ns=int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1e9), generation=7, ino=31, pid=4711,
        rule_index=0, op=0, hook=0, enforcing=1, action=1, source=1, path_kind=1,
        path_len=len(b"/tmp/payload"), comm=b"bash", dev=b"tmpfs", path=b"/tmp/payload",
    )
    base.update(fields)
    return layout.pack(**base)  # type: ignore[arg-type]


def test_untrusted_encoding() -> None:
    assert untrusted(b"bash") == '"bash"'
    assert untrusted(b"a b") == "612062"
    assert untrusted(b'a"b') == "612262"
    assert untrusted(b"\xa0") == "A0"
    assert untrusted(b"/x (deleted)") == b"/x (deleted)".hex().upper()


def test_spec_example_op_default() -> None:
    r = decode(_event())
    assert ipe_fields(r) == (
        'ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=1 pid=4711 comm="bash" path="/tmp/payload" '
        'dev="tmpfs" ino=31 rule="DEFAULT op=EXECUTE action=DENY"'
    )
    assert abs(r.timestamp - time.time()) < 5


def test_subject_fields_decode_and_reach_json_only() -> None:
    """uid/auid/ses/exe (the kernel's SYSCALL record) go to JSON; the 1420 text stays IPE's."""
    r = decode(_event(uid=1000, auid=1001, ses=7, exe_kind=1, exe_len=len(b"/usr/bin/sh"), exe=b"/usr/bin/sh"))
    assert (r.uid, r.auid, r.ses, r.exe) == (1000, 1001, 7, b"/usr/bin/sh")
    assert "uid" not in ipe_fields(r) and "/usr/bin/sh" not in ipe_fields(r)
    obj = json.loads(json_line(r, 3))
    assert (obj["uid"], obj["auid"], obj["ses"], obj["exe"]) == (1000, 1001, 7, "/usr/bin/sh")
    kthread = decode(_event(exe_kind=0, auid=0xFFFFFFFF, ses=0xFFFFFFFF))
    assert kthread.exe is None and kthread.auid == 4294967295


def test_no_file_and_global_default() -> None:
    r = decode(_event(path_kind=0, op=7, hook=4, source=2, enforcing=0, action=0))
    assert ipe_fields(r) == (
        'ipe_op=UNKNOWN ipe_hook=KERNEL_LOAD enforcing=0 pid=4711 comm="bash" path=? dev=? ino=? '
        'rule="DEFAULT action=ALLOW"'
    )


def test_rule_text_from_lookup_and_fallback() -> None:
    rule = Rule(
        Op.EXECUTE,
        (
            BoolProperty(BoolKey.BOOT_VERIFIED, False),
            DigestProperty(DigestKey.FSVERITY_DIGEST, Digest(b"sha256", bytes.fromhex("ab01"))),
        ),
        Action.ALLOW,
    )
    assert str(rule) == 'op=EXECUTE boot_verified=FALSE fsverity_digest="sha256":AB01 action=ALLOW'

    class P:
        rules = (rule,)

    lookup = rules_from_policies({7: P()})
    r = decode(_event(source=0, rule_index=0, action=0), lookup)
    assert r.rule == str(rule)
    r = decode(_event(source=0, rule_index=3, generation=9), lookup)
    assert r.rule == "rule#3"
    doc = json.loads(json_line(r, 5))
    assert doc["rule"] == "rule#3" and doc["ipe_op"] == "EXECUTE" and doc["serial"] == 5

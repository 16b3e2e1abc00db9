"""The parser against docs/policy-language.md: the conformance vectors plus cases of our own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipe_bpf.errors import PolicyError
from ipe_bpf.policy.model import Action, BoolKey, BoolProperty, Digest, DigestKey, DigestProperty, Op
from ipe_bpf.policy.parser import format_policy, parse_policy

HEADER = b"policy_name=t policy_version=0.0.0\n"


VECTORS = Path(__file__).resolve().parent / "data" / "ipe-parser-vectors.json"


def _vectors() -> list[dict]:
    """Conformance cases of kernel IPE's parser: {name, policy (latin-1), valid, errno, note}."""
    return json.loads(VECTORS.read_text())


def test_vectors_cover_every_errno() -> None:
    vectors = _vectors()
    assert len(vectors) >= 50
    assert {v["errno"] for v in vectors} == {None, "EBADMSG", "EINVAL", "ERANGE"}


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_conformance_vector(vector: dict) -> None:
    data = vector["policy"].encode("latin-1")
    if vector["valid"]:
        parse_policy(data)
    else:
        with pytest.raises(PolicyError) as info:
            parse_policy(data)
        assert info.value.errno_name == vector["errno"]


def errno_of(data: bytes) -> str | None:
    try:
        parse_policy(data)
    except PolicyError as err:
        return err.errno_name
    return None


@pytest.mark.parametrize(
    ("text", "errno"),
    [
        # version components: kstrtou16 semantics, left to right
        (b"policy_name=t policy_version=70000x.0.0\nDEFAULT action=ALLOW", "EINVAL"),
        (b"policy_name=t policy_version=99999999999999999999x.0.0\nDEFAULT action=ALLOW", "ERANGE"),
        (b"policy_name=t policy_version=1..0\nDEFAULT action=ALLOW", "EINVAL"),
        (b"policy_name=t policy_version=++1.0.0\nDEFAULT action=ALLOW", "EINVAL"),
        (b"policy_name=t policy_version=-1.0.0\nDEFAULT action=ALLOW", "EINVAL"),
        (b"policy_name=t policy_version=1.0.x.0\nDEFAULT action=ALLOW", "EINVAL"),
        (b"policy_name=t policy_version=1.0.0 extra\nDEFAULT action=ALLOW", "EBADMSG"),
        (b"policy_name=t policy_version=1.0.99999 extra\nDEFAULT action=ALLOW", "ERANGE"),
        (b"policy_name=t policy_version=0065535.00.0\nDEFAULT action=ALLOW", None),
        # DEFAULT lines
        (HEADER + b"DEFAULT op=EXECUTE fsverity_digest=sha256:zz action=ALLOW\nDEFAULT action=DENY", "EINVAL"),
        (HEADER + b"DEFAULT op=EXECUTE action=ALLOW\nDEFAULT op=EXECUTE action=DENY\nDEFAULT action=DENY", "EBADMSG"),
        (HEADER + b"DEFAULT DEFAULT action=ALLOW", "EBADMSG"),
        (HEADER + b"DEFAULT op=EXECUTE\nDEFAULT action=DENY", "EBADMSG"),
        # rules
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE action=ALLOW", None),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE", "EBADMSG"),
        (HEADER + b"DEFAULT action=ALLOW\nop=execute action=ALLOW", "EBADMSG"),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest=:00 action=ALLOW", None),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest= action=ALLOW", "EBADMSG"),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest=sha256:00:11 action=ALLOW", "EINVAL"),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest=sha256:0g action=ALLOW", "EINVAL"),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE\x0b action=ALLOW", "EBADMSG"),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=ALLOW\xa0", None),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=ALLOW\xa0x", "EBADMSG"),
        (HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE action=ALLOW#op=BOGUS", None),
        (HEADER + b"DEFAULT action=ALLOW\rop=EXECUTE action=ALLOW", None),
        # a bad line wins over the missing-coverage check
        (HEADER + b"DEFAULT op=EXECUTE action=ALLOW\nop=EXECUTE fsverity_digest=sha256:0 action=ALLOW", "EINVAL"),
        (HEADER + b"DEFAULT op=EXECUTE action=ALLOW", "EBADMSG"),
        (b"", "EBADMSG"),
        (b"\0policy_name=t policy_version=0.0.0\nDEFAULT action=ALLOW", "EBADMSG"),
    ],
)
def test_grammar_cases(text: bytes, errno: str | None) -> None:
    assert errno_of(text) == errno


def test_every_op_default_is_enough() -> None:
    ops = b"".join(b"DEFAULT op=%s action=DENY\n" % op.name.encode() for op in Op if op is not Op.UNKNOWN)
    policy = parse_policy(HEADER + ops)
    assert policy.global_default is None
    assert policy.op_default(Op.X509_CERT) is Action.DENY


def test_model_of_a_policy() -> None:
    policy = parse_policy(
        b"# comment\npolicy_name=\xffname= policy_version=+1.02.3\n"
        b"op=KMODULE dmverity_roothash=SHA256:AbCd boot_verified=FALSE action=ALLOW\n"
        b"DEFAULT action=DENY\n"
        b"op=EXECUTE fsverity_digest=sha256: fsverity_signature=TRUE action=ALLOW\n"
    )
    assert policy.name == b"\xffname="
    assert policy.version == (1, 2, 3)
    assert policy.version_key == (1 << 32) | (2 << 16) | 3
    assert policy.global_default is Action.DENY
    first, second = policy.rules
    assert (first.op, first.action, first.line) == (Op.KMODULE, Action.ALLOW, 3)
    assert first.properties == (
        DigestProperty(DigestKey.DMVERITY_ROOTHASH, Digest(b"SHA256", b"\xab\xcd")),
        BoolProperty(BoolKey.BOOT_VERIFIED, False),
    )
    assert second.properties[0] == DigestProperty(DigestKey.FSVERITY_DIGEST, Digest(b"sha256", b""))
    assert second.line == 5


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (HEADER + b"DEFAULT action=ALLOW\n\n# c\nop=BOGUS action=ALLOW\n", 5),
        (b"policy_name=t policy_version=0.0.0\r\nDEFAULT action=ALLOW\r\nop=BOGUS action=ALLOW\r\n", 3),
        (b"policy_name=t policy_version=0.0.0\rDEFAULT action=ALLOW\r\rop=BOGUS action=ALLOW", 4),
        (b"\n\npolicy_name=t policy_version=0.0.x\n", 3),
    ],
)
def test_error_line_numbers_match_an_editor(text: bytes, line: int) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert info.value.line == line


def test_error_message_names_the_token() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(HEADER + b"DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest=sha256:zz action=ALLOW\n")
    assert "fsverity_digest=sha256:zz" in str(info.value)
    assert str(info.value).startswith("line 3: EINVAL: ")
    assert str(info.value.located("p.pol")).startswith("p.pol:3: EINVAL: ")


def test_format_is_canonical() -> None:
    text = (
        b"policy_name=x policy_version=01.0.0\n"
        b"op=EXECUTE\tfsverity_digest=sha256:ABCD action=DENY   # c\n"
        b"DEFAULT op=KMODULE action=ALLOW\nDEFAULT action=DENY\n"
    )
    assert format_policy(parse_policy(text)) == (
        b"policy_name=x policy_version=1.0.0\n"
        b"DEFAULT action=DENY\n"
        b"DEFAULT op=KMODULE action=ALLOW\n"
        b"op=EXECUTE fsverity_digest=sha256:abcd action=DENY\n"
    )

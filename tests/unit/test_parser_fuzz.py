"""Random bytes and mutations of valid policies: a Policy or a PolicyError, nothing else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipe_bpf.errors import PolicyError
from ipe_bpf.policy.parser import format_policy, parse_policy

SEED = (
    b"policy_name=fuzz policy_version=1.2.3\n"
    b"DEFAULT action=DENY\nDEFAULT op=KMODULE action=ALLOW\n"
    b"op=EXECUTE boot_verified=TRUE action=ALLOW\n"
    b"op=EXECUTE dmverity_roothash=sha256:00ff fsverity_signature=FALSE action=ALLOW\n"
    b"op=FIRMWARE fsverity_digest=sha512:abcd action=DENY\n"
)
ALPHABET = list(b" \t\r\n#=:.\0\x0b\xa0+-0123456789abcdefxyz") + [ord(c) for c in "DEFAULTopactionALLOWDENY"]


def _parse_or_error(data: bytes) -> None:
    try:
        policy = parse_policy(data)
    except PolicyError as err:
        assert err.errno_name in {"EBADMSG", "EINVAL", "ERANGE"}
        assert err.message
        return
    # anything that parses survives the canonical formatter unchanged
    assert parse_policy(format_policy(policy)) == policy


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _parse_or_error(data)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.sampled_from(ALPHABET + [draw(st.integers(0, 255))]))
        elif kind == "insert":
            data[at:at] = bytes(draw(st.lists(st.sampled_from(ALPHABET), max_size=4)))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            end = draw(st.integers(at, min(len(data), at + 40)))
            data[at:at] = data[at:end]
    return bytes(data)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_policies(data: bytes) -> None:
    _parse_or_error(data)

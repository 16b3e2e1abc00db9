"""The parser's and compiler's fast paths for one-digest rules decide exactly what the general
paths decide: same Policy, same line numbers, same errors, same tables, same packed bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipe_bpf.errors import PolicyError
from ipe_bpf.policy import compiler as compiler_module
from ipe_bpf.policy import parser
from ipe_bpf.policy.compiler import CompiledPolicy, compile_policy, encode
from ipe_bpf.policy.layout import load_header
from ipe_bpf.policy.model import DigestRow, Policy, RuleList
from ipe_bpf.policy.parser import format_policy, parse_policy

from .strategies import large_policies, policies

HEADER = "policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\n"
DIGEST = "ab" * 32


def parse_general(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Policy:
    """parse_policy with the one-digest fast path turned off."""
    class NeverMatches:
        fullmatch = staticmethod(lambda line: None)

    with monkeypatch.context() as m:
        m.setattr(parser, "_ONE_DIGEST_RULE", NeverMatches)
        return parse_policy(data)


def rows(policy: Policy) -> int:
    assert isinstance(policy.rules, RuleList)
    return sum(type(item) is DigestRow for item in policy.rules.rows())


def assert_same_parse(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Policy:
    try:
        general = parse_general(data, monkeypatch)
    except PolicyError as err:
        with pytest.raises(PolicyError) as fast_err:
            parse_policy(data)
        assert (fast_err.value.errno_name, fast_err.value.line, str(fast_err.value)) == (
            err.errno_name, err.line, str(err))
        return None  # type: ignore[return-value]
    fast = parse_policy(data)
    assert fast == general
    assert [r.line for r in fast.rules] == [r.line for r in general.rules]
    return fast


@pytest.mark.parametrize("line", [
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW",
    f"op=KMODULE dmverity_roothash=sha256:{DIGEST.upper()} action=DENY",
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST[:-1]} action=ALLOW",  # odd hex: EINVAL
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST}g0 action=ALLOW",  # bad hex: EINVAL
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW # comment",
    f"op=EXECUTE  fsverity_digest=sha256:{DIGEST}\taction=ALLOW ",
    f"op=EXECUTE fsverity_digest={'x' * 40}:{DIGEST} action=ALLOW",  # alg too long for the kernel
    f"op=EXECUTE fsverity_digest=:{DIGEST} action=ALLOW",  # empty alg
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW boot_verified=TRUE",
    f"op=UNKNOWN fsverity_digest=sha256:{DIGEST} action=ALLOW",
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=MAYBE",
    f"op=EXECUTE fsverity_digest=sha256:{DIGEST} fsverity_digest=sha256:{DIGEST} action=ALLOW",
])
@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_fast_parse_equals_general_parse(line: str, eol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (HEADER + line + "\n" + line + "\n").replace("\n", eol).encode()
    assert_same_parse(data, monkeypatch)


def test_canonical_lines_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (HEADER + f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW\n"
            f"op=EXECUTE boot_verified=TRUE action=ALLOW\n"
            f"op=FIRMWARE dmverity_roothash=sha256:{DIGEST} action=DENY\n").encode()
    assert rows(parse_policy(data)) == 2
    policy = assert_same_parse(data, monkeypatch)
    assert len(policy.rules) == 3
    assert [r.line for r in policy.rules] == [3, 4, 5]


def test_a_rule_line_before_the_header_is_the_header_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW\n{HEADER}".encode()
    with pytest.raises(PolicyError, match="expected policy_name"):
        parse_policy(data)
    assert_same_parse(data, monkeypatch)


def compiled_general(policy: Policy) -> CompiledPolicy:
    """The compiler on Rule objects only (a tuple of rules: no DigestRow fast path)."""
    return compile_policy(Policy(policy.name, policy.version, policy.global_default, policy.op_defaults,
                                 tuple(policy.rules)))


def assert_same_tables(policy: Policy) -> None:
    fast = compile_policy(policy)
    general = compiled_general(policy)
    assert dict(fast.digest_ids) == dict(general.digest_ids)
    assert list(fast.rule_entries.items()) == list(general.rule_entries.items())
    assert fast.defaults == general.defaults
    assert fast.tables == general.tables
    assert encode(fast, 1, generation=3) == encode(general, 1, generation=3)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(policies())
def test_fast_compile_equals_general_compile(policy: Policy) -> None:
    assert parse_policy(format_policy(policy)) == policy
    assert_same_tables(parse_policy(format_policy(policy)))


@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
@given(large_policies(min_rules=300, max_rules=800))
def test_fast_compile_equals_general_compile_large(policy: Policy) -> None:
    assert rows(parse_policy(format_policy(policy))) > 0
    assert_same_tables(parse_policy(format_policy(policy)))


def test_pack_columns_equals_the_packer() -> None:
    layout = load_header().struct("ipe_digest_key")
    rows_ = [(0, 1, 6, 2, b"sha256", b"\x01\x02"), (1, 2, 3, 3, b"sm3", b"\xff" * 3)]
    pack = layout.packer("slot", "kind", "alg_len", "len", "alg", "value")
    columns = dict(zip(("slot", "kind", "alg_len", "len", "alg", "value"), zip(*rows_)))
    assert layout.pack_columns(2, columns) == b"".join(pack(*r) for r in rows_)


@pytest.mark.parametrize("column", [{"kind": [256]}, {"kind": [-1]}, {"alg": [b"x" * 100]}, {"alg": ["text"]},
                                    {"kind": [1, 2]}])
def test_pack_columns_refuses_what_does_not_fit(column: dict[str, list[object]]) -> None:
    with pytest.raises(ValueError, match="ipe_digest_key"):
        load_header().struct("ipe_digest_key").pack_columns(1, column)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=1))
def test_rule_list_is_equal_to_and_hashed_like_its_tuple(slot: int) -> None:
    policy = parse_policy((HEADER + f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW\n").encode())
    as_tuple = tuple(parse_policy((HEADER + f"op=EXECUTE fsverity_digest=sha256:{DIGEST} action=ALLOW\n").encode())
                     .rules)
    assert policy.rules == as_tuple and as_tuple == policy.rules and hash(policy.rules) == hash(as_tuple)
    assert policy.rules[slot - 1] == as_tuple[slot - 1] and policy.rules[:1] == as_tuple[:1]


def test_the_compiler_runs_without_cyclic_gc_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    seen: list[bool] = []
    real = compiler_module.normalise
    monkeypatch.setattr(compiler_module, "normalise", lambda rule, abi: seen.append(gc.isenabled()) or real(rule, abi))
    policy = parse_policy((HEADER + "op=EXECUTE boot_verified=TRUE action=ALLOW\n").encode())
    assert gc.isenabled()
    compile_policy(policy)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        compile_policy(policy)
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()

"""The compiler's proof: the kernel tables decide exactly like the reference evaluator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipe_bpf.policy.compiler import (
    CompileError,
    CompiledPolicy,
    KernelMaps,
    compile_policy,
    encode,
    normalise,
)
from ipe_bpf.policy.lookup import lookup, lookup_maps
from ipe_bpf.policy.evaluate import Decision, Source, evaluate
from ipe_bpf.policy.layout import load_header
from ipe_bpf.policy.model import (
    NO_FILE,
    POLICY_OPS,
    Action,
    BoolKey,
    BoolProperty,
    Digest,
    DigestKey,
    DigestProperty,
    FileAttributes,
    Op,
    Policy,
    Rule,
)

from .strategies import ALG_MAX, DIGEST_MAX, file_attributes, large_policies, policies

HEADER = load_header()
SHA = Digest(b"sha256", bytes(range(32)))
OTHER = Digest(b"sha256", bytes(range(1, 33)))


def fsv(digest: Digest) -> DigestProperty:
    return DigestProperty(DigestKey.FSVERITY_DIGEST, digest)


def dmv(digest: Digest) -> DigestProperty:
    return DigestProperty(DigestKey.DMVERITY_ROOTHASH, digest)


def flag(key: BoolKey, value: bool = True) -> BoolProperty:
    return BoolProperty(key, value)


def policy_of(*rules: Rule, global_default: Action | None = Action.DENY, op_defaults=()) -> Policy:
    return Policy(b"t", (0, 0, 1), global_default, tuple(op_defaults), tuple(rules))


def assert_same(policy: Policy, compiled: CompiledPolicy, attrs: FileAttributes) -> None:
    for op in Op:
        expected = evaluate(policy, op, attrs)
        got = lookup(compiled, op, attrs)
        assert got == expected, f"op={op.name} attrs={attrs}\n kernel: {got}\n reference: {expected}"


# ---------------------------------------------------------------- the property


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_lookup_equals_evaluate(data: st.DataObject) -> None:
    policy = data.draw(policies(), label="policy")
    compiled = compile_policy(policy)
    for _ in range(12):
        assert_same(policy, compiled, data.draw(file_attributes(policy), label="attrs"))


@settings(max_examples=300, deadline=None)
@given(policies(max_rules=6, max_pool=2), st.data())
def test_lookup_equals_evaluate_small_pools(policy: Policy, data: st.DataObject) -> None:
    """Few distinct digests: rules collide on keys, so first-match order is what decides."""
    compiled = compile_policy(policy)
    for _ in range(12):
        assert_same(policy, compiled, data.draw(file_attributes(policy)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(large_policies(), st.data())
def test_lookup_equals_evaluate_large_policy(policy: Policy, data: st.DataObject) -> None:
    compiled = compile_policy(policy)
    assert len(compiled.rules) <= 8 * len(policy.rules)
    for _ in range(60):
        assert_same(policy, compiled, data.draw(file_attributes(policy)))


@settings(max_examples=200, deadline=None)
@given(policies(max_rules=20))
def test_table_size_is_linear(policy: Policy) -> None:
    compiled = compile_policy(policy)
    assert len(compiled.rules) <= 8 * len(policy.rules)
    assert len(compiled.digests) <= 2 * len(policy.rules)
    encoded = encode(compiled, 0)
    assert len(encoded.rules) == len(compiled.rules)
    assert len(encoded.digests) == len(compiled.digests)
    assert len(encoded.defaults) == 1


@settings(max_examples=100, deadline=None)
@given(policies(), policies(), st.data())
def test_two_slots_do_not_interfere(first: Policy, second: Policy, data: st.DataObject) -> None:
    """Both slots live in the same maps; each slot decides for its own policy."""
    a, b = compile_policy(first), compile_policy(second)
    maps = KernelMaps.from_encoded(a.abi, encode(a, 0), encode(b, 1, generation=7))
    for _ in range(8):
        attrs = data.draw(file_attributes(data.draw(st.sampled_from([first, second]))))
        for op in Op:
            for slot, policy in ((0, first), (1, second)):
                got = lookup_maps(maps, slot, int(op), attrs)
                want = evaluate(policy, op, attrs)
                assert (got.action, got.source) == (int(want.action), want.source)
                assert got.index is None or policy.rules[got.index] == want.rule


class CountingMap(Mapping[bytes, bytes]):
    """A map that records every key looked up."""

    def __init__(self, inner: Mapping[bytes, bytes]) -> None:
        self.inner = inner
        self.keys: list[bytes] = []

    def __getitem__(self, key: bytes) -> bytes:
        self.keys.append(key)
        return self.inner[key]

    def get(self, key, default=None):  # type: ignore[override]
        self.keys.append(key)
        return self.inner.get(key, default)

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("the hot path never iterates a map")

    def __len__(self) -> int:
        raise AssertionError("the hot path never sizes a map")


@settings(max_examples=100, deadline=None)
@given(policies(), st.data())
def test_lookup_is_bounded_and_only_asks_useful_keys(policy: Policy, data: st.DataObject) -> None:
    """At most 1 defaults, 2 digest and 4 rule lookups, whatever the policy; and a rule
    lookup only for a shape the policy has, with a non-zero id exactly where it tests one."""
    compiled = compile_policy(policy)
    kernel = compiled.kernel_maps
    rule_key = HEADER.struct("ipe_rule_key")
    by_shape = {HEADER.constant("IPE_SHAPE_ROOTHASH"): "roothash_id", HEADER.constant("IPE_SHAPE_FSVERITY"): "digest_id"}
    for _ in range(8):
        attrs = data.draw(file_attributes(policy))
        for op in Op:
            maps = KernelMaps(CountingMap(kernel.digests), CountingMap(kernel.rules), CountingMap(kernel.defaults), kernel.abi)
            lookup_maps(maps, 0, int(op), attrs)
            assert len(maps.defaults.keys) == 1
            if op is Op.UNKNOWN:  # step 1 decides before anything else is looked up
                assert not maps.digests.keys and not maps.rules.keys
            assert len(maps.digests.keys) <= 2
            assert len(maps.rules.keys) <= 4
            shapes = [rule_key.unpack(k) for k in maps.rules.keys]
            assert len({k["shape"] for k in shapes}) == len(shapes)
            for key in shapes:
                assert compiled.defaults.shapes & (1 << key["shape"])
                for bit, name in by_shape.items():
                    assert (key[name] != 0) == bool(key["shape"] & bit), key


# ---------------------------------------------------------------- cases by hand


def decide(policy: Policy, op: Op, attrs: FileAttributes) -> Decision:
    got = lookup(compile_policy(policy), op, attrs)
    assert got == evaluate(policy, op, attrs)
    return got


def test_first_match_wins_across_shapes() -> None:
    policy = policy_of(
        Rule(Op.EXECUTE, (flag(BoolKey.BOOT_VERIFIED),), Action.DENY),
        Rule(Op.EXECUTE, (fsv(SHA),), Action.ALLOW),
        Rule(Op.EXECUTE, (), Action.DENY),
    )
    both = FileAttributes(boot_verified=True, fsverity_digest=SHA)
    assert decide(policy, Op.EXECUTE, both).rule == policy.rules[0]
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=SHA)).rule == policy.rules[1]
    assert decide(policy, Op.EXECUTE, FileAttributes()).rule == policy.rules[2]


def test_first_match_wins_within_a_key() -> None:
    policy = policy_of(
        Rule(Op.EXECUTE, (fsv(SHA),), Action.ALLOW),
        Rule(Op.EXECUTE, (fsv(SHA), fsv(SHA)), Action.DENY),
    )
    compiled = compile_policy(policy)
    assert {v.index for v in compiled.rules.values()} == {0}
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=SHA)).action is Action.ALLOW


def test_contradictory_booleans_never_match() -> None:
    rule = Rule(Op.EXECUTE, (flag(BoolKey.FSVERITY_SIGNATURE), flag(BoolKey.FSVERITY_SIGNATURE, False)), Action.ALLOW)
    policy = policy_of(rule)
    assert normalise(rule, compile_policy(policy).abi) is None
    assert not compile_policy(policy).rules
    for attrs in (FileAttributes(fsverity_signature=True), FileAttributes(), NO_FILE):
        assert decide(policy, Op.EXECUTE, attrs).source is Source.GLOBAL_DEFAULT


def test_distinct_digests_of_one_kind_never_match() -> None:
    policy = policy_of(Rule(Op.EXECUTE, (dmv(SHA), dmv(OTHER)), Action.ALLOW), Rule(Op.EXECUTE, (fsv(SHA), fsv(OTHER)), Action.ALLOW))
    compiled = compile_policy(policy)
    assert not compiled.rules and not compiled.digests
    assert decide(policy, Op.EXECUTE, FileAttributes(dmverity_roothash=SHA, fsverity_digest=OTHER)).source is Source.GLOBAL_DEFAULT


def test_both_digest_kinds_in_one_rule() -> None:
    policy = policy_of(Rule(Op.KMODULE, (dmv(SHA), fsv(OTHER)), Action.ALLOW))
    assert decide(policy, Op.KMODULE, FileAttributes(dmverity_roothash=SHA, fsverity_digest=OTHER)).source is Source.RULE
    assert decide(policy, Op.KMODULE, FileAttributes(dmverity_roothash=OTHER, fsverity_digest=SHA)).source is not Source.RULE
    assert decide(policy, Op.KMODULE, FileAttributes(dmverity_roothash=SHA)).source is not Source.RULE


def test_digest_kinds_are_not_interchangeable() -> None:
    policy = policy_of(Rule(Op.EXECUTE, (dmv(SHA),), Action.ALLOW))
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=SHA)).source is Source.GLOBAL_DEFAULT


def test_algorithm_case_matters() -> None:
    policy = policy_of(Rule(Op.EXECUTE, (fsv(Digest(b"sha256", SHA.value)),), Action.ALLOW))
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=Digest(b"SHA256", SHA.value))).action is Action.DENY
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=Digest(b"sha256", SHA.value))).action is Action.ALLOW


def test_empty_hex_and_empty_algorithm() -> None:
    empty = Digest(b"sha256", b"")
    nothing = Digest(b"", b"")
    policy = policy_of(Rule(Op.EXECUTE, (fsv(empty),), Action.ALLOW), Rule(Op.EXECUTE, (dmv(nothing),), Action.ALLOW))
    for attrs in (FileAttributes(), FileAttributes(fsverity_digest=SHA), NO_FILE):
        assert decide(policy, Op.EXECUTE, attrs).source is Source.GLOBAL_DEFAULT
    # The model allows an empty file digest (no kernel reports one); the tables still agree.
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=empty)).rule == policy.rules[0]
    assert decide(policy, Op.EXECUTE, FileAttributes(dmverity_roothash=nothing)).rule == policy.rules[1]


def test_digests_the_kernel_cannot_hold_never_match() -> None:
    long_alg = Digest(b"a" * (ALG_MAX + 1), SHA.value)
    long_value = Digest(b"sha256", bytes(DIGEST_MAX + 1))
    longest = Digest(b"a" * ALG_MAX, bytes(DIGEST_MAX))
    policy = policy_of(
        Rule(Op.EXECUTE, (fsv(long_alg),), Action.ALLOW),
        Rule(Op.EXECUTE, (dmv(long_value),), Action.ALLOW),
        Rule(Op.EXECUTE, (fsv(longest),), Action.ALLOW),
    )
    compiled = compile_policy(policy)
    assert [e.alg for e in compiled.digests] == [longest.alg]
    assert decide(policy, Op.EXECUTE, FileAttributes(fsverity_digest=longest)).rule == policy.rules[2]
    # Documented divergence: a file digest no kernel key can hold is treated as absent.
    assert lookup(compiled, Op.EXECUTE, FileAttributes(fsverity_digest=long_alg)).source is Source.GLOBAL_DEFAULT


def test_no_file_events() -> None:
    policy = policy_of(
        Rule(Op.EXECUTE, (fsv(SHA),), Action.ALLOW),
        Rule(Op.EXECUTE, (flag(BoolKey.BOOT_VERIFIED, False), flag(BoolKey.DMVERITY_SIGNATURE, False)), Action.ALLOW),
        global_default=Action.DENY,
    )
    ghost = FileAttributes(has_file=False, boot_verified=True, fsverity_digest=SHA)
    assert decide(policy, Op.EXECUTE, ghost).rule == policy.rules[1]
    assert decide(policy, Op.EXECUTE, NO_FILE).rule == policy.rules[1]


def test_unknown_op() -> None:
    rule = Rule(Op.EXECUTE, (), Action.ALLOW)
    with_global = policy_of(rule, global_default=Action.DENY)
    assert decide(with_global, Op.UNKNOWN, FileAttributes()) == Decision(Action.DENY, Source.GLOBAL_DEFAULT, op=Op.UNKNOWN)
    per_op = policy_of(rule, global_default=None, op_defaults=[(op, Action.DENY) for op in POLICY_OPS])
    assert decide(per_op, Op.UNKNOWN, NO_FILE) == Decision(Action.ALLOW, Source.NONE, op=Op.UNKNOWN)
    # A rule for UNKNOWN (no parser produces one) is never consulted, as in the reference.
    odd = policy_of(Rule(Op.UNKNOWN, (), Action.ALLOW), global_default=Action.DENY)
    assert not compile_policy(odd).rules
    assert decide(odd, Op.UNKNOWN, FileAttributes()).action is Action.DENY


def test_defaults_only() -> None:
    per_op = [(op, Action(op % 2)) for op in POLICY_OPS]
    policy = policy_of(global_default=None, op_defaults=per_op)
    compiled = compile_policy(policy)
    assert not compiled.rules and compiled.defaults.shapes == 0
    for op, action in per_op:
        assert decide(policy, op, FileAttributes()) == Decision(action, Source.OP_DEFAULT, op=op)
    mixed = policy_of(global_default=Action.ALLOW, op_defaults=[(Op.KMODULE, Action.DENY)])
    assert decide(mixed, Op.KMODULE, NO_FILE).source is Source.OP_DEFAULT
    assert decide(mixed, Op.FIRMWARE, NO_FILE) == Decision(Action.ALLOW, Source.GLOBAL_DEFAULT, op=Op.FIRMWARE)


def test_uncovered_policy_is_refused() -> None:
    policy = policy_of(global_default=None, op_defaults=[(Op.EXECUTE, Action.ALLOW)])
    with pytest.raises(CompileError) as info:
        compile_policy(policy)
    assert info.value.errno_name == "EBADMSG"


def test_entries_per_rule() -> None:
    """A rule is entered once per value of the booleans it leaves free among those the policy
    tests at all: a digest allowlist (no booleans anywhere) makes one entry per rule."""
    free = Rule(Op.EXECUTE, (fsv(SHA), dmv(SHA)), Action.ALLOW)
    assert len(compile_policy(policy_of(free)).rules) == 1
    assert compile_policy(policy_of(free)).defaults.bool_mask == 0
    boot = Rule(Op.KMODULE, (flag(BoolKey.BOOT_VERIFIED),), Action.DENY)
    both = compile_policy(policy_of(free, boot))
    assert len(both.rules) == 2 + 1  # free: boot_verified TRUE or FALSE; boot: one value
    pinned = Rule(Op.EXECUTE, tuple(flag(k) for k in BoolKey), Action.ALLOW)
    assert len(compile_policy(policy_of(pinned)).rules) == 1
    assert len(compile_policy(policy_of(free, pinned)).rules) == 8 + 1
    compiled = compile_policy(policy_of(free))
    assert len(compiled.digests) == 2  # one digest, two kinds


def test_rule_texts_and_indexes_follow_the_file() -> None:
    rules = (
        Rule(Op.KMODULE, (), Action.DENY),
        Rule(Op.EXECUTE, (flag(BoolKey.BOOT_VERIFIED), flag(BoolKey.BOOT_VERIFIED, False)), Action.ALLOW),
        Rule(Op.EXECUTE, (fsv(SHA),), Action.ALLOW),
    )
    compiled = compile_policy(policy_of(*rules))
    assert compiled.rule_texts == tuple(str(r) for r in rules)
    # as kernel IPE's audit prints it (checked against the real kernel in tests/vm): quoted
    # algorithm, uppercase hex
    assert compiled.rule_texts[2] == f'op=EXECUTE fsverity_digest="sha256":{bytes(range(32)).hex().upper()} action=ALLOW'
    # rule 2 names one digest and nothing else: kept with the digest, not in the rules map
    assert {v.index for v in compiled.rules.values()} == {0}
    assert dict(compiled.inline_rules) == {1: (2, Op.EXECUTE, Action.ALLOW)}


def test_a_digest_named_by_one_rule_keeps_that_rule_and_one_named_twice_keeps_none() -> None:
    """The first rule naming a digest moves to the rules map (at its own index) as soon as
    another rule names the digest too, before that rule claims anything: first match wins."""
    rules = (
        Rule(Op.EXECUTE, (fsv(SHA),), Action.DENY),                                  # 0: SHA's first
        Rule(Op.EXECUTE, (fsv(SHA), flag(BoolKey.BOOT_VERIFIED)), Action.ALLOW),     # 1: SHA again
        Rule(Op.EXECUTE, (dmv(OTHER),), Action.ALLOW),                               # 2: OTHER's only
        Rule(Op.FIRMWARE, (fsv(OTHER),), Action.DENY),                               # 3: fs-verity OTHER, only
    )
    compiled = compile_policy(policy_of(*rules))
    assert {i: rule[0] for i, rule in compiled.inline_rules.items()} == {2: 2, 3: 3}
    sha_id = compiled.digest_ids[(compiled.abi.digest_fsverity, SHA.alg, SHA.value)]
    shadowed = [k for k, v in compiled.rules.items() if k.digest_id == sha_id]
    # rule 0 went to the rules map for every boolean value, before rule 1 could claim one
    assert shadowed and all(compiled.rules[k].index == 0 for k in shadowed)


def test_compile_is_deterministic() -> None:
    policy = policy_of(Rule(Op.EXECUTE, (fsv(SHA), flag(BoolKey.BOOT_VERIFIED)), Action.ALLOW), Rule(Op.FIRMWARE, (dmv(OTHER),), Action.DENY))
    assert compile_policy(policy) == compile_policy(policy)
    assert encode(compile_policy(policy), 1) == encode(compile_policy(policy), 1)


# ---------------------------------------------------------------- encoding


def test_encoded_entries_have_header_sizes_and_slot() -> None:
    policy = policy_of(Rule(Op.EXECUTE, (fsv(SHA), dmv(OTHER)), Action.ALLOW), op_defaults=[(Op.POLICY, Action.ALLOW)])
    compiled = compile_policy(policy)
    for slot in (0, 1):
        encoded = encode(compiled, slot, generation=42)
        digest_key, rule_key = HEADER.struct("ipe_digest_key"), HEADER.struct("ipe_rule_key")
        rule_value, defaults = HEADER.struct("ipe_rule_value"), HEADER.struct("ipe_policy_defaults")
        for key, value in encoded.digests:
            fields = digest_key.unpack(key)
            assert len(key) == digest_key.size and len(value) == HEADER.struct("ipe_digest_value").size
            assert fields["slot"] == slot
            alg, raw = fields["alg"], fields["value"]
            assert isinstance(alg, bytes) and isinstance(raw, bytes)
            assert Digest(alg[: fields["alg_len"]], raw[: fields["len"]]) in (SHA, OTHER)
        for key, value in encoded.rules:
            assert len(key) == rule_key.size and len(value) == rule_value.size
            assert rule_key.unpack(key)["slot"] == slot and rule_value.unpack(value)["index"] == 0
        [(key, value)] = encoded.defaults
        assert int.from_bytes(key, "little" if __import__("sys").byteorder == "little" else "big") == slot
        fields = defaults.unpack(value)
        assert fields["generation"] == 42 and fields["global_default"] == Action.DENY
        assert fields["op_default"] == bytes(
            Action.ALLOW if op is Op.POLICY else HEADER.constant("IPE_DEFAULT_NONE") for op in Op
        )
        assert fields["shapes"] == 1 << (HEADER.constant("IPE_SHAPE_ROOTHASH") | HEADER.constant("IPE_SHAPE_FSVERITY"))
        assert encoded.byte_size == sum(len(k) + len(v) for t in (encoded.digests, encoded.rules, encoded.defaults) for k, v in t)


def test_encode_rejects_a_bad_slot() -> None:
    compiled = compile_policy(policy_of())
    with pytest.raises(ValueError):
        encode(compiled, HEADER.constant("IPE_SLOTS"))


def test_lookup_rejects_a_bad_op() -> None:
    compiled = compile_policy(policy_of())
    with pytest.raises(ValueError):
        lookup_maps(compiled.kernel_maps, 0, HEADER.constant("IPE_NR_OPS"), FileAttributes())


def test_policy_replace_keeps_rule_identity() -> None:
    """Decision.rule is the policy's own Rule (the audit layer renders it)."""
    policy = policy_of(Rule(Op.EXECUTE, (), Action.ALLOW, line=7))
    got = lookup(compile_policy(policy), Op.EXECUTE, FileAttributes())
    assert got.rule is policy.rules[0] and got.rule.line == 7
    assert replace(got, rule=None).rule_text.startswith("DEFAULT")
